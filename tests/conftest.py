"""Shared fixtures: one local Ray for the whole test session (starting Ray costs seconds), and the
demo-small run of tests/test_demo_direction.py, started in the background when the session starts.

The suite runs PyTorch on one thread (OMP_NUM_THREADS=1 unless set): its models are tiny, and the other
core is left to the demo-small run, which keeps PyTorch's default threads so that its figures are
those of `make demo`-style runs on this machine."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

THREADS_OF_A_PLAIN_RUN = os.environ.get("OMP_NUM_THREADS")   # None: PyTorch's default (one per core)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


DEMO_SMALL_TESTS = ("tests/test_demo_direction.py", "tests/test_demo_tools.py")   # they read its run


def pytest_collection_modifyitems(items):
    """A test that needs Ray (directly or through a fixture) runs whole stages: it is in the slow tier.
    The demo-small tests go last: their run works in the background while the rest of the suite runs."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    skip_gpu_tests_without_cuda(items)
    items.sort(key=lambda item: item.nodeid.startswith(DEMO_SMALL_TESTS))   # stable: only moves those


def skip_gpu_tests_without_cuda(items) -> None:
    """Tests marked `gpu` need CUDA (`make gpu-check` runs them with `pytest -m gpu`); elsewhere they are
    skipped, saying why. torch is imported only when such a test was collected."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False); make gpu-check runs it")
    for item in gpu_items:
        item.add_marker(skip)


class BackgroundRun:
    """`regionclip run MANIFEST --set output_dir=...` in a child process of its own session, with its
    output in a log file next to the run folder."""

    def __init__(self, manifest: Path, output_dir: Path):
        self.output_dir = output_dir
        self.log = output_dir.parent / "run.log"
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO),
               # the threads of a plain run; passive: a thread that waits sleeps instead of spinning on a
               # core the rest of the suite is using (it changes no result)
               "OMP_WAIT_POLICY": "PASSIVE"}
        env.pop("RAY_ADDRESS", None)
        env.pop("OMP_NUM_THREADS", None)
        if THREADS_OF_A_PLAIN_RUN is not None:
            env["OMP_NUM_THREADS"] = THREADS_OF_A_PLAIN_RUN
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "stages.cli", "run", str(manifest), "--set", f"output_dir={output_dir}"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        """Stop the run if it is still going (an interrupted session), with its Ray daemons."""
        from tests.faultkit import kill_process_tree

        if self.process.poll() is None:
            kill_process_tree(self.process)


_demo_small_key = pytest.StashKey[BackgroundRun]()


def pytest_collection_finish(session):
    """Start demo-small now if its test was selected: it takes about three minutes on two cores, and
    the rest of the suite leaves a core idle most of the time (one PyTorch thread, process and Ray
    start-ups, waits on children)."""
    if any(item.nodeid.startswith(DEMO_SMALL_TESTS) for item in session.items):
        root = Path(tempfile.mkdtemp(prefix="regionclip-demo-small-"))
        session.config.stash[_demo_small_key] = BackgroundRun(REPO / "manifests" / "demo-small.yaml",
                                                               root / "run")


def pytest_sessionfinish(session):
    run = session.config.stash.get(_demo_small_key, None)
    if run is not None:
        run.stop()
        shutil.rmtree(run.output_dir.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_small_run(request) -> BackgroundRun:
    """The demo-small run started with the session (pytest_collection_finish)."""
    return request.config.stash[_demo_small_key]


def start_local_ray() -> None:
    """The session's local Ray (2 CPUs), unless this process is already connected to a Ray."""
    import ray

    if not ray.is_initialized():
        # address="local": never join a cluster that a `ray start` on this machine left in /tmp/ray
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})


@pytest.fixture(scope="session")
def ray_local():
    import ray

    start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture
def write_manifest(tmp_path):
    """Write a YAML run manifest into tmp_path and load it: write_manifest('''corpus: ...''')."""
    from pipeline.config import load_manifest

    def make(body: str = "", name: str = "t") -> "object":
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"name: {name}\noutput_dir: out\nray: {{num_cpus: 2}}\n" + textwrap.dedent(body))
        return load_manifest(path)

    return make
