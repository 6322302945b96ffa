"""`regionclip verify`: every damage to a run's outputs is found and named, and after `--repair` the
next run redoes exactly the damaged shards (byte-identical files; intact shards are not rewritten)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import load_manifest
from pipeline.io import sha256_file
from pipeline.layout import RunLayout
from pipeline.verify import CHECKSUM, MISSING, SIZE, UNREADABLE
from pipeline.verify import verify_run as verify_stages
from stages.stage_list import stage_names
from tests.corpora import jpeg_bytes

CAPTIONS = ["two dogs and a red kite on the beach", "a cat sleeping on a sofa", "a boat near a bridge",
            "three apples and a banana on a table", "a dog chasing a ball", "a man holding a kite"]


def make_run(tmp_path: Path, n: int = 12, per_shard: int = 3) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(n):
        (corpus / f"{i:03d}.jpg").write_bytes(jpeg_bytes(40, 32, seed=i))
        (corpus / f"{i:03d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])
    path = tmp_path / "run.yaml"
    path.write_text(f"name: v\noutput_dir: out\nray: {{num_cpus: 2}}\n"
                    f"corpus: {{format: folder, path: {corpus}}}\nshard: {{samples_per_shard: {per_shard}}}\n"
                    "concepts: {parser: lookups, min_count: 1}\n")
    return path


def verify_run(manifest, full: bool = True):
    return verify_stages(manifest, stage_names(), full=full)


def data_files(snap: dict) -> dict[str, str]:
    """Checksums of the data files (markers and manifests hold timings, so they differ run to run)."""
    return {k: v[0] for k, v in snap.items() if not k.endswith(("_stats.json", "manifest.json"))}


def snapshot(layout: RunLayout) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, mtime_ns) of every output file (not quarantined copies)."""
    return {str(p.relative_to(layout.root)): (sha256_file(p), p.stat().st_mtime_ns)
            for p in sorted(layout.root.rglob("*")) if p.is_file() and not p.name.endswith(".damaged")
            and "synth" not in p.parts}


def run_stages(path: Path) -> None:
    from stages import concepts, shard

    manifest = load_manifest(path)
    shard.run(manifest)
    concepts.run(manifest)


@pytest.fixture
def run_dir(ray_local, tmp_path):
    path = make_run(tmp_path)
    run_stages(path)
    return path


def damage(layout: RunLayout) -> None:
    tar = layout.shard_tar(0)                                  # truncate a tar
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    layout.caption_concepts.parquet(1).unlink()                # delete a sidecar
    pqt = layout.shards.parquet(2)                             # alter one byte of a Parquet
    data = bytearray(pqt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pqt.write_bytes(bytes(data))
    for suffix in (".tar", ".parquet", "_stats.json"):         # a whole shard gone
        layout.shards.shard_file(3, suffix).unlink()


def test_verify_names_each_damage_and_the_rerun_redoes_exactly_those_shards(run_dir, capsys):
    from stages.cli import main

    manifest = load_manifest(run_dir)
    layout = RunLayout.of(manifest)
    assert verify_run(manifest) == []
    assert main(["verify", str(run_dir)]) == 0
    before = snapshot(layout)
    damage(layout)

    found = {(d.stage, d.shard, d.file, d.problem.split(":")[0]) for d in verify_run(manifest)}
    assert found == {
        ("shard", "00000", "shards/00000.tar", SIZE),
        ("concepts", "00001", "concepts/captions/00001.parquet", MISSING),
        ("shard", "00002", "shards/00002.parquet", CHECKSUM),
        ("shard", "00003", "shards/00003_stats.json", MISSING),
        ("shard", "00003", "shards/00003.tar", MISSING),
        ("shard", "00003", "shards/00003.parquet", MISSING),
    }
    # quick mode (sizes only) misses the same-size alteration, nothing else
    quick = {(d.file, d.problem.split(":")[0]) for d in verify_run(manifest, full=False)}
    assert ("shards/00002.parquet", CHECKSUM) not in quick and len(quick) == 5

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["verify", str(run_dir)])                         # report only: nothing changes
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    for name in ("shards/00000.tar", "concepts/captions/00001.parquet", "shards/00002.parquet",
                 "shards/00003.tar", "size mismatch", "checksum mismatch", "missing"):
        assert name in out
    assert len(verify_run(manifest)) == 6
    with pytest.raises(SystemExit):
        main(["verify", str(run_dir), "--repair"])
    assert json.loads(layout.shards.manifest.read_text())["status"] == "damaged"
    assert layout.shards.shard_file(2, "_stats.json.damaged").exists()

    run_stages(run_dir)
    after = snapshot(layout)
    assert after.keys() == before.keys()
    assert data_files(after) == data_files(before), "not byte-identical"
    rewritten = {k for k in after if after[k][1] != before[k][1]}
    redone = {"shards/00000.tar", "shards/00000.parquet", "shards/00000_stats.json",
              "shards/00002.tar", "shards/00002.parquet", "shards/00002_stats.json",
              "shards/00003.tar", "shards/00003.parquet", "shards/00003_stats.json",
              "concepts/captions/00001.parquet", "concepts/captions/00001_stats.json"}
    stage_level = {"shards/manifest.json", "shards/sizes.json", "concepts/manifest.json",
                   "concepts/concepts.parquet"}
    assert redone <= rewritten <= redone | stage_level, sorted(rewritten ^ redone)
    assert verify_run(manifest) == []
    assert main(["verify", str(run_dir)]) == 0


def test_a_truncated_or_deleted_file_is_redone_even_without_verify(run_dir):
    """The stage machinery's own cheap check: a marker whose files changed size is not done."""
    from stages import shard

    manifest = load_manifest(run_dir)
    layout = RunLayout.of(manifest)
    before = snapshot(layout)
    tar = layout.shard_tar(1)
    tar.write_bytes(tar.read_bytes()[:1000])
    layout.shards.parquet(3).unlink()
    shard.run(manifest)
    after = snapshot(layout)
    assert after.keys() == before.keys() and data_files(after) == data_files(before)
    rewritten = {k for k in after if after[k][1] != before[k][1]}
    assert {k for k in rewritten if k.startswith("shards/0")} == {
        "shards/00001.tar", "shards/00001.parquet", "shards/00001_stats.json",
        "shards/00003.tar", "shards/00003.parquet", "shards/00003_stats.json"}


def test_unreadable_marker_and_manifest_are_named(run_dir):
    manifest = load_manifest(run_dir)
    layout = RunLayout.of(manifest)
    layout.shards.stats(1).write_bytes(b"\xff\xfe not json")
    layout.stage("concepts").manifest.write_text("{")
    found = {(d.stage, d.file, d.problem.split(":")[0]) for d in verify_run(manifest)}
    assert found == {("shard", "shards/00001_stats.json", UNREADABLE),
                     ("concepts", "concepts/manifest.json", UNREADABLE)}


def test_a_shard_to_redo_loses_its_old_marker_before_its_files_are_replaced(tmp_path):
    """Settings changed: the old marker must go before the new files land, or a kill between the new
    files and the new marker leaves a marker vouching for bytes it never saw."""
    from pipeline.layout import StageDir
    from pipeline.stage import ShardMarkers, fingerprint_of

    folder = StageDir(tmp_path / "stage")
    folder.root.mkdir()
    old = ShardMarkers(folder, fingerprint_of("demo", {"quality": 90}, {}))
    for shard_id in (0, 1):
        (folder.root / f"{shard_id:05d}.bin").write_bytes(b"old")
        old.mark_done(shard_id, {"rows": 1}, [folder.root / f"{shard_id:05d}.bin"])

    assert old.start_pending([0, 1]) == []  # done under its own settings: markers kept
    new = ShardMarkers(folder, fingerprint_of("demo", {"quality": 95}, {}))
    assert new.pending([0, 1]) == [0, 1]
    assert folder.stats(0).exists() and folder.stats(1).exists()  # asking does not change anything
    assert new.start_pending([0, 1]) == [0, 1]
    assert not folder.stats(0).exists() and not folder.stats(1).exists()
