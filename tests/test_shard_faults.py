"""Killing the shard stage with SIGKILL at random moments never corrupts a run: a rerun gives exactly
the keys and bytes of an uninterrupted run, and no half-written file ever counts as done."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.io import sha256_file
from pipeline.layout import RunLayout
from stages import shard
from tests.corpora import jpeg_bytes
from tests.faultkit import markers_truthful, wait_until_ray_is_idle

pytestmark = pytest.mark.slow   # runs whole stages or kills processes: not in the fast tier

KILL_SEED = 1234
IMAGES, PER_SHARD = 24, 3
SHARDS = IMAGES // PER_SHARD


def make_corpus(root: Path, n: int = IMAGES) -> None:
    root.mkdir(parents=True)
    for i in range(n):
        # Oversized images force a decode-resize-encode per sample, so shards take measurable time.
        (root / f"{i:03d}.jpg").write_bytes(jpeg_bytes(1200, 900, seed=i))
        (root / f"{i:03d}.txt").write_text(f"picture number {i} of a kite")


def write_yaml(path: Path, corpus: Path, out: Path) -> Path:
    path.write_text(f"name: kill\noutput_dir: {out}\ncorpus: {{format: folder, path: {corpus}}}\n"
                    "ray: {num_cpus: 2}\n"
                    f"shard: {{samples_per_shard: {PER_SHARD}, max_side: 320}}\n")
    return path


def outputs(layout: RunLayout) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(layout.shards.root.glob("[0-9]*"))
            if not p.name.endswith("_stats.json")}


def test_sigkill_at_random_moments_then_rerun_is_exact(ray_local, tmp_path):
    corpus = tmp_path / "corpus"
    make_corpus(corpus)
    reference = write_yaml(tmp_path / "ref.yaml", corpus, tmp_path / "ref")
    from pipeline.config import load_manifest

    shard.run(load_manifest(reference))
    expected = outputs(RunLayout.of(load_manifest(reference)))

    rng = random.Random(KILL_SEED)
    manifest_path = write_yaml(tmp_path / "killed.yaml", corpus, tmp_path / "killed")
    layout = RunLayout.of(load_manifest(manifest_path))
    # Each run joins the session's Ray (a killed driver's tasks die with it) rather than starting its own.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    done_after_kill = []
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "stages.cli", "shard", str(manifest_path)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        # Kill once a seeded number of further shards is done, plus a seeded fraction of a shard:
        # the moments spread over the run whatever the machine's speed.
        done_now = len(list(layout.shards.root.glob("*_stats.json")))
        target, extra_delay = min(done_now + rng.randint(0, 2), SHARDS - 2), rng.uniform(0.0, 0.3)
        while proc.poll() is None and len(list(layout.shards.root.glob("*_stats.json"))) < target:
            time.sleep(0.01)
        time.sleep(extra_delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        wait_until_ray_is_idle()
        assert markers_truthful(layout.root) == []
        done_after_kill.append(len(list(layout.shards.root.glob("*_stats.json"))))
    shard.run(load_manifest(manifest_path))
    assert outputs(layout) == expected
    assert not list(layout.shards.root.glob(".tmp-*"))
    # the kills landed at different stages of progress (not all before or all after the work)
    assert len(set(done_after_kill)) >= 2, done_after_kill
    assert done_after_kill[-1] < SHARDS, "the last kill must interrupt work, not a finished run"
