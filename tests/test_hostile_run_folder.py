"""Hostile run folders: every file name read back from a run folder (shard markers, stage manifests,
codec.json, sizes.json) resolves inside it or is refused, and nothing outside is read, renamed or
written. (Corpus input is tests/test_hostile_corpus.py's.)"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.layout import RunLayout, UnsafeName, inside
from pipeline.stage import ShardMarkers
from pipeline.verify import UNSAFE, quarantine, verify_run


class Outside:
    """A file beside the run folder that no test may read, rename or change."""

    def __init__(self, folder: Path, name: str = "victim.txt"):
        self.path = folder / name
        self.path.write_text("precious, not part of any run")
        self.stat = self.path.stat()

    def assert_untouched(self) -> None:
        assert self.path.read_text() == "precious, not part of any run"
        assert self.path.stat().st_mtime_ns == self.stat.st_mtime_ns
        assert not self.path.with_name(self.path.name + ".damaged").exists()


def run_with_marker(tmp_path: Path, files: dict) -> RunLayout:
    """A run folder whose shard stage lists shard 0, with a marker recording `files`."""
    layout = RunLayout(tmp_path / "run")
    layout.shards.root.mkdir(parents=True)
    (layout.shards.root / "00000.tar").write_bytes(b"x" * 10)
    layout.shards.manifest.write_text(json.dumps({"stage": "shard", "status": "done", "fingerprint": "f",
                                                  "shards": {"00000": {"files": {}}}}))
    layout.shards.stats(0).write_text(json.dumps({"fingerprint": "f", "counts": {"in": 1}, "files": files}))
    return layout


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "link_out"])
def test_a_marker_naming_a_file_outside_is_the_damage_and_repair_renames_only_the_marker(tmp_path, kind):
    victim = Outside(tmp_path)
    if kind == "dotdot":
        name = "../../victim.txt"
    elif kind == "absolute":
        name = str(victim.path)
    else:  # a link inside the run folder that leads out
        name = "link.tar"
    layout = run_with_marker(tmp_path, {name: {"bytes": 1, "sha256": "0" * 64},
                                        "00000.tar": {"bytes": 10}})
    if kind == "link_out":
        os.symlink(victim.path, layout.shards.root / "link.tar")

    damages = verify_run(layout, ["shard"])
    assert [(d.file, d.problem.split(":")[0]) for d in damages] == [("shards/00000_stats.json", UNSAFE)]
    assert not ShardMarkers(layout.shards, "f").shard_stats(0), "a marker naming a file outside vouches for nothing"
    moved = quarantine(layout, damages)
    assert moved["moved"] == ["shards/00000_stats.json"]
    assert (layout.shards.root / "00000_stats.json.damaged").exists()
    assert (layout.shards.root / "00000.tar").read_bytes() == b"x" * 10
    victim.assert_untouched()


def test_a_stage_manifest_naming_outputs_outside_is_refused(tmp_path):
    victim = Outside(tmp_path)
    layout = RunLayout(tmp_path / "run")
    layout.stage("concepts").root.mkdir(parents=True)
    layout.stage("concepts").manifest.write_text(json.dumps({
        "stage": "concepts", "status": "done",
        "outputs": {"../../victim.txt": {"bytes": 1}, str(victim.path): {"bytes": 1}}}))
    damages = verify_run(layout, ["concepts"])
    assert [(d.file, d.problem.split(":")[0]) for d in damages] == [("concepts/manifest.json", UNSAFE)]
    quarantine(layout, damages)
    assert (layout.stage("concepts").root / "manifest.json.damaged").exists()
    victim.assert_untouched()


def test_quarantine_refuses_a_damage_that_names_a_file_outside(tmp_path):
    from pipeline.verify import Damage

    victim = Outside(tmp_path)
    layout = RunLayout(tmp_path / "run")
    layout.root.mkdir()
    for name in ("../victim.txt", str(victim.path)):
        with pytest.raises(UnsafeName):
            quarantine(layout, [Damage("shard", "00000", name, "missing")])
    victim.assert_untouched()


def test_inside_resolves_names_in_their_folder_only(tmp_path):
    (tmp_path / "run" / "shards").mkdir(parents=True)
    folder = tmp_path / "run" / "shards"
    assert inside(folder, "00000.tar") == folder / "00000.tar"
    assert inside(folder, "sub/00000.tar") == folder / "sub" / "00000.tar"
    for name in ("../x", "/etc/passwd", "a/../../x", "", None, 3, "a\0b"):
        with pytest.raises(UnsafeName):
            inside(folder, name)
    os.symlink(tmp_path, folder / "up")
    with pytest.raises(UnsafeName, match="through a link"):
        inside(folder, "up/x")
    os.symlink(tmp_path / "elsewhere", folder / "dangling")
    with pytest.raises(UnsafeName):
        inside(folder, "dangling")
    assert inside(folder, "dangling", entry_only=True) == folder / "dangling"  # renaming the entry is safe


def test_a_codec_description_naming_files_outside_is_refused(tmp_path):
    from trainer.offline.codecs import TopKCodec, load_codec

    victim = Outside(tmp_path)
    layout = RunLayout(tmp_path / "run")
    codec = TopKCodec(2, np.eye(4, dtype=np.float32), 0.01)
    codec.save(layout.labels_codec)
    assert load_codec(layout.labels.root).kind == "topk"
    desc = json.loads(layout.labels_codec.read_text())
    for hostile in ("../../victim.txt", str(victim.path)):
        layout.labels_codec.write_text(json.dumps({**desc, "files": {"concepts": hostile}, "sha256": {}}))
        with pytest.raises(UnsafeName):
            load_codec(layout.labels.root)
        layout.labels_codec.write_text(json.dumps({**desc, "sha256": {hostile: "0" * 64}}))
        with pytest.raises(UnsafeName):
            load_codec(layout.labels.root)
    victim.assert_untouched()


def test_sizes_json_naming_a_tar_outside_is_refused_before_it_is_read(tmp_path, write_manifest):
    from stages.train_teacher import train

    victim = Outside(tmp_path, "victim.tar")
    manifest = write_manifest("corpus: {format: folder, path: .}\n")
    layout = RunLayout.of(manifest)
    layout.shards.root.mkdir(parents=True)
    layout.sizes_json.write_text(json.dumps({"../../victim.tar": 5}))
    with pytest.raises(UnsafeName, match="victim.tar"):
        train(SimpleNamespace(manifest=manifest, layout=layout))
    victim.assert_untouched()
