"""Links and names in the run folder (round three): a folder of the run folder that is a symbolic link is
refused before anything is written through it or cleaned up in it; the cleanup of temporaries never
follows a link and removes only the names atomic_path gives; a user's file named like the lock's side
file (run.lock.json) is never overwritten nor removed."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.io import atomic_path, remove_stale_temporaries, write_json
from pipeline.layout import LinkedFolder, RunLayout
from pipeline.runner import ForeignLockFile, Stage, run_lock, run_stage


@pytest.fixture
def elsewhere(tmp_path):
    """A user's folder outside the run folder, with a file named like a temporary and a plain one."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    files = {folder / ".tmp-123-notes.txt": b"a user's notes", folder / "important.txt": b"keep me"}
    for path, data in files.items():
        path.write_bytes(data)
    before = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in files}
    yield folder
    assert {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in files} == before
    assert sorted(p.name for p in folder.iterdir()) == [".tmp-123-notes.txt", "important.txt"], "nothing new there"


def writing_stage(name: str) -> Stage:
    """A stage whose work writes one file into its folder (the runner's bookkeeping, without Ray)."""
    return Stage(name=name, help="test", work=lambda run: write_json(run.stage_dir.root / "out.json", {"x": 1}))


@pytest.mark.parametrize("linked", ["proposals", "checkpoints", "checkpoints/rpn"])
def test_a_linked_stage_folder_is_refused_before_anything_is_written_or_cleaned(tmp_path, write_manifest, elsewhere,
                                                                                linked):
    manifest = write_manifest("corpus: {format: synthetic}\n")
    layout = RunLayout.of(manifest)
    (layout.root / linked).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(elsewhere, layout.root / linked, target_is_directory=True)
    stage = writing_stage("proposals" if linked == "proposals" else "train-rpn")
    with pytest.raises(LinkedFolder) as err:
        run_stage(stage, manifest)
    assert f"{layout.root / linked} -> {elsewhere}" in str(err.value) and "Remove the link" in str(err.value)


def test_a_link_deeper_in_the_run_folder_or_a_dangling_stage_folder_is_refused(tmp_path, write_manifest, elsewhere):
    manifest = write_manifest("corpus: {format: synthetic}\n")
    layout = RunLayout.of(manifest)
    (layout.root / "concepts" / "captions").mkdir(parents=True)
    os.symlink(elsewhere, layout.root / "concepts" / "captions" / "more", target_is_directory=True)
    with pytest.raises(LinkedFolder, match="captions/more"):
        run_stage(writing_stage("proposals"), manifest)
    os.unlink(layout.root / "concepts" / "captions" / "more")
    os.symlink(tmp_path / "nowhere", layout.root / "proposals")                 # a link to nothing
    with pytest.raises(LinkedFolder, match="proposals -> "):
        run_stage(writing_stage("proposals"), manifest)
    os.unlink(layout.root / "proposals")
    run_stage(writing_stage("proposals"), manifest)                            # real folders: it runs
    assert json.loads((layout.root / "proposals" / "out.json").read_text()) == {"x": 1}


def test_the_run_lock_refuses_a_run_folder_holding_a_linked_folder(tmp_path, write_manifest, elsewhere):
    layout = RunLayout.of(write_manifest("corpus: {format: synthetic}\n"))
    layout.root.mkdir()
    os.symlink(elsewhere, layout.root / "eval", target_is_directory=True)
    with pytest.raises(LinkedFolder, match="eval -> "):
        with run_lock(layout, "regionclip evaluate m.yaml"):
            pass
    assert not layout.run_lock_holder.exists()


def test_the_cleanup_of_temporaries_never_follows_a_link_and_removes_only_their_names(tmp_path, elsewhere):
    folder = tmp_path / "shards"
    (folder / "sub").mkdir(parents=True)
    ours = [folder / ".tmp-4242-00000.tar", folder / "sub" / ".tmp-7-00000.parquet"]
    for path in ours:
        path.write_bytes(b"half written")
    (folder / ".tmp-notes").write_text("not a name atomic_path gives")
    os.symlink(elsewhere, folder / "linked", target_is_directory=True)
    os.symlink(elsewhere / "important.txt", folder / ".tmp-99-planted")          # a link named like ours
    assert remove_stale_temporaries(folder) == 3
    assert not any(p.exists() for p in ours) and not os.path.lexists(folder / ".tmp-99-planted")
    assert (folder / ".tmp-notes").exists()
    assert remove_stale_temporaries(folder / "linked") == 0                    # a link itself is not entered


def test_a_link_planted_at_a_temporary_name_is_not_written_through(tmp_path, elsewhere):
    target = tmp_path / "run" / "shards" / "sizes.json"
    target.parent.mkdir(parents=True)
    os.symlink(elsewhere / "important.txt", target.with_name(f".tmp-{os.getpid()}-sizes.json"))
    write_json(target, {"00000.tar": 3})
    assert json.loads(target.read_text()) == {"00000.tar": 3} and not target.is_symlink()


# -- the lock's side file -------------------------------------------------------------------------------------

def test_a_users_file_named_like_the_lock_side_file_is_never_overwritten_nor_removed(tmp_path, write_manifest):
    layout = RunLayout.of(write_manifest("corpus: {format: synthetic}\n"))
    layout.root.mkdir()
    for content in (b"my own notes\n", b'{"pid": 1}', b"[]"):
        layout.run_lock_holder.write_bytes(content)
        with pytest.raises(ForeignLockFile, match="run.lock.json was not written by regionclip"):
            with run_lock(layout, "regionclip shard m.yaml"):
                pass
        assert layout.run_lock_holder.read_bytes() == content
    layout.run_lock_holder.unlink()
    os.symlink(tmp_path / "elsewhere.json", layout.run_lock_holder)            # a link is not ours either
    with pytest.raises(ForeignLockFile):
        with run_lock(layout, "regionclip shard m.yaml"):
            pass
    assert os.path.islink(layout.run_lock_holder) and not (tmp_path / "elsewhere.json").exists()


def test_a_stale_side_file_of_a_killed_run_is_taken_over_and_removed(tmp_path, write_manifest):
    layout = RunLayout.of(write_manifest("corpus: {format: synthetic}\n"))
    layout.root.mkdir()
    for stale in ({"written_by": "regionclip run lock", "pid": 1, "command": "x", "started_at": "t", "host": "h",
                   "token": "0"}, {"pid": 1, "command": "x", "started_at": "t", "host": "h"}):
        layout.run_lock_holder.write_text(json.dumps(stale))
        with run_lock(layout, "regionclip shard m.yaml"):
            assert json.loads(layout.run_lock_holder.read_text())["pid"] == os.getpid()
        assert not layout.run_lock_holder.exists()


def test_a_side_file_replaced_during_the_run_is_left_in_place(tmp_path, write_manifest):
    layout = RunLayout.of(write_manifest("corpus: {format: synthetic}\n"))
    with run_lock(layout, "regionclip shard m.yaml"):
        layout.run_lock_holder.write_text("the user's file now")
    assert layout.run_lock_holder.read_text() == "the user's file now"


def test_the_cli_says_so_in_one_line(tmp_path, write_manifest, capsys):
    from stages.cli import main

    manifest = write_manifest("corpus: {format: synthetic}\n")
    layout = RunLayout.of(manifest)
    layout.root.mkdir()
    layout.run_lock_holder.write_text("my notes")
    assert main(["synth", str(manifest.source_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "run.lock.json was not written by regionclip" in err
    assert "Traceback" not in err and layout.run_lock_holder.read_text() == "my notes"
    assert not Path(layout.root / "synth").exists()
