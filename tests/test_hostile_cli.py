"""The command line's error boundary (round three): every error a user can cause ends the command with
one line on stderr and exit status 1, never a traceback; `--debug` prints the traceback. Errors Ray
wrapped (a task's, a Ray Data actor's) read as the error the task raised: a full disk says so and how to
resume. A crafted stage manifest in the run folder is unreadable to every reader: `status` shows it,
`verify` reports it, the runner refuses it upstream."""
from __future__ import annotations

import errno
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.layout import RunLayout
from stages.cli import main
from stages.errors import error_line, exit_code_for

FULL_DISK = OSError(errno.ENOSPC, "No space left on device", "/runs/demo/shards/.tmp-7-00003.tar")

# The text of a RayTaskError(UserCodeException) as Ray Data raises it when an actor fails (abridged from
# a real one: the actor's own error survives only as the last line before the separator).
RAY_DATA_TEXT = """\x1b[36mray::MapWorker(MapBatches(LabelActor)).submit()\x1b[39m (pid=30542, ip=192.0.2.2)
  File "/usr/lib/python3.11/concurrent/futures/thread.py", line 58, in run
    result = self.fn(*self.args, **self.kwargs)
  File "/app/stages/label.py", line 90, in __call__
    raise OSError(errno.ENOSPC, "No space left on device", "/runs/demo/labels/00000.parquet")
OSError: [Errno 28] No space left on device: '/runs/demo/labels/00000.parquet'

The above exception was the direct cause of the following exception:

\x1b[36mray::MapWorker(MapBatches(LabelActor)).submit()\x1b[39m (pid=30542, ip=192.0.2.2)
ray.exceptions.UserCodeException: UDF failed to process a data block.
Failed to apply UDF transform after 1/1 attempts (total backoff 0.0s)."""


def ray_task_error(cause: BaseException, text: str = "Traceback (most recent call last):\n" * 76):
    from ray.exceptions import RayTaskError

    return RayTaskError("write_shard", text, cause).as_instanceof_cause()


def run_cli(argv, capsys):
    """(exit status, stderr) of `regionclip ARGV` (some commands end with SystemExit, as a script does)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.err


@pytest.fixture
def manifest_path(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("name: t\noutput_dir: out\ncorpus: {format: synthetic}\nsynth: {num_images: 4, num_val_images: 0}\n")
    return path


# -- one line for each kind ----------------------------------------------------------------------------------

@pytest.mark.parametrize("raised,expected", [
    (FULL_DISK, "error: No space left on device: /runs/demo/shards/.tmp-7-00003.tar; free some space, then run "
                "the same command again: it resumes where it stopped"),
    (PermissionError(errno.EACCES, "Permission denied", "/runs/x"), "error: Permission denied: /runs/x; check"),
    (json.JSONDecodeError("Expecting value", "{x", 1), "error: not valid JSON: Expecting value: line 1 column 2"),
    (pa.ArrowInvalid("Parquet magic bytes not found in footer"), "error: ArrowInvalid: Parquet magic bytes"),
    (KeyError("boxes"), "error: unexpected KeyError: 'boxes' (a bug: run again with --debug and report"),
])
def test_each_error_is_one_line_and_exit_status_1(monkeypatch, manifest_path, capsys, raised, expected):
    from stages import synth

    def fail(stage, manifest, **options):
        raise raised
    monkeypatch.setattr(type(synth.STAGE), "run", fail)
    code, err = run_cli(["synth", str(manifest_path)], capsys)
    assert code == 1 and err.startswith(expected) and err.count("\n") == 1 and "Traceback" not in err


def test_debug_prints_the_traceback_and_is_passed_to_stage_processes(monkeypatch, manifest_path, capsys):
    from stages import synth

    monkeypatch.setenv("REGIONCLIP_DEBUG", "0")          # restored (unset) after the test
    def fail(stage, manifest, **options):
        raise FULL_DISK
    monkeypatch.setattr(type(synth.STAGE), "run", fail)
    code, err = run_cli(["synth", str(manifest_path), "--debug"], capsys)
    assert code == 1 and "Traceback (most recent call last)" in err and err.rstrip().splitlines()[-1].startswith(
        "error: No space left on device")
    assert os.environ["REGIONCLIP_DEBUG"] == "1"          # `regionclip run` starts its stages with it


def test_errors_ray_wrapped_read_as_the_error_the_task_raised():
    task = ray_task_error(FULL_DISK)
    assert error_line(task).startswith("No space left on device: /runs/demo/shards/.tmp-7-00003.tar; free some space")
    from pipeline.readers import CorpusError
    assert error_line(ray_task_error(CorpusError("corpus.path: 'x' holds no rows"))) == "corpus.path: 'x' holds no rows"
    from ray.exceptions import UserCodeException
    data = ray_task_error(UserCodeException("UDF failed to process a data block."), RAY_DATA_TEXT)
    assert error_line(data) == ("OSError: [Errno 28] No space left on device: '/runs/demo/labels/00000.parquet'; "
                                "free some space, then run the same command again: it resumes where it stopped")


def test_a_refused_checkpoint_is_one_line(tmp_path, manifest_path, capsys):
    bad = tmp_path / "RN50.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip" * 10)
    code, err = run_cli(["convert-teacher", str(manifest_path), "--checkpoint", str(bad)], capsys)
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and str(bad) in err
    assert "Traceback" not in err


def test_a_manifest_error_and_an_unreadable_manifest_are_one_clear_error(tmp_path, capsys):
    path = tmp_path / "m.yaml"
    path.write_bytes(b"name: t\noutput_dir: out\nshard: {max_side: 640}\nshard: {min_side: 4}\n")
    code, err = run_cli(["status", str(path)], capsys)
    assert code == 2 and "shard is written twice (lines 3 and 4)" in err and "Traceback" not in err
    path.write_bytes(b"name: t\noutput_dir: \xff\n")
    code, err = run_cli(["status", str(path)], capsys)
    assert code == 2 and "cannot be read as UTF-8 text" in err and "Traceback" not in err


# -- a crafted stage manifest in the run folder -----------------------------------------------------------------

CRAFTED = {
    "a list": [1, 2],
    "shards of text": {"status": "done", "fingerprint": "x", "shards": "abc", "counts": [1]},
    "counts a list": {"status": "done", "fingerprint": "x", "counts": [1, 2]},
    "a number for status": {"status": 5, "fingerprint": "x"},
    "upstream leading out": {"status": "done", "fingerprint": "x", "upstream": {"../../elsewhere": "y"}},
    "outputs without records": {"status": "done", "fingerprint": "x", "outputs": {"sizes.json": "big"}},
    "a shard with a text name": {"status": "done", "fingerprint": "x", "shards": {"zero": {"files": {}}}},
}


@pytest.mark.parametrize("content", list(CRAFTED.values()), ids=list(CRAFTED))
def test_a_crafted_stage_manifest_is_unreadable_to_status_verify_and_the_runner(manifest_path, capsys, content):
    from pipeline.config import load_manifest
    from pipeline.runner import require_current
    from pipeline.stage import StageInputError

    layout = RunLayout.of(load_manifest(manifest_path))
    layout.shards.root.mkdir(parents=True)
    layout.shards.manifest.write_text(json.dumps(content))
    code, err = run_cli(["status", str(manifest_path)], capsys)
    assert code == 0 and "Traceback" not in err
    code, err = run_cli(["verify", str(manifest_path)], capsys)
    assert code == 1 and "Traceback" not in err            # damage found: never "intact"
    with pytest.raises(StageInputError, match="is not a stage manifest"):
        require_current(layout, ["shard"])


def test_status_shows_the_unreadable_stage(manifest_path, capsys):
    from pipeline.config import load_manifest

    layout = RunLayout.of(load_manifest(manifest_path))
    layout.shards.root.mkdir(parents=True)
    layout.shards.manifest.write_text(json.dumps(CRAFTED["shards of text"]))
    main(["status", str(manifest_path)])
    out = capsys.readouterr().out
    assert any(line.split()[:2] == ["shard", "unreadable"] for line in out.splitlines()), out


def test_a_manifest_naming_itself_upstream_is_refused_not_a_recursion(manifest_path):
    from pipeline.config import load_manifest
    from pipeline.runner import require_current
    from pipeline.stage import StageInputError

    layout = RunLayout.of(load_manifest(manifest_path))
    layout.shards.root.mkdir(parents=True)
    layout.shards.manifest.write_text(json.dumps({"status": "done", "fingerprint": "x", "upstream": {"shard": "x"}}))
    with pytest.raises(StageInputError, match="names itself upstream"):
        require_current(layout, ["shard"])


def test_a_damaged_parquet_read_by_a_command_is_one_line(tmp_path):
    bad = tmp_path / "00000.parquet"
    bad.write_bytes(b"PAR1" + b"\0" * 20)
    with pytest.raises(pa.ArrowException) as err:
        pq.read_table(bad)
    assert exit_code_for(err.value) == 1


@pytest.mark.slow
def test_a_full_disk_in_a_ray_task_and_a_ray_data_actor_is_one_line(ray_local, capsys):
    """The errors as Ray itself raises them (the session's local Ray)."""
    from pipeline.ray_runtime import ActorPlan, map_with_actor_pool, run_tasks

    with pytest.raises(Exception) as task:
        list(run_tasks(_full_disk, [(1,)]))
    with pytest.raises(Exception) as data:
        list(map_with_actor_pool(_FullDiskActor, [{"shard": 0}], ActorPlan(1, 1, 0, 1)))
    capsys.readouterr()
    for err, name in ((task.value, "shards/00000.tar"), (data.value, "labels/00000.parquet")):
        assert exit_code_for(err) == 1
        line = capsys.readouterr().err
        assert line.count("\n") == 1 and "No space left on device" in line and name in line
        assert "resumes where it stopped" in line and "Traceback" not in line


def _full_disk(x):
    raise OSError(errno.ENOSPC, "No space left on device", "/runs/demo/shards/00000.tar")


class _FullDiskActor:
    def __call__(self, batch):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/demo/labels/00000.parquet")


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[1, 2]", b'{"results_table": 5}'])
def test_status_reads_past_a_damaged_summary(manifest_path, capsys, content):
    from pipeline.config import load_manifest

    layout = RunLayout.of(load_manifest(manifest_path))
    layout.summary_json.parent.mkdir(parents=True)
    layout.summary_json.write_bytes(content)
    code = main(["status", str(manifest_path)])
    out = capsys.readouterr()
    assert code == 0 and "Traceback" not in out.err and "stage" in out.out and str(layout.summary_json) in out.out
