"""Label stage under failure and on a cluster: a run killed with SIGKILL mid-stage and rerun gives the
rows of an uninterrupted run; a two-node Ray cluster on loopback writes the same files as a local run."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.layout import RunLayout
from stages import label, proposals
from tests.faultkit import kill_process_tree, wait_until_ray_is_idle
from tests.labelkit import concepts_from_regions, manifest_body, prepare_run, read_rows, rpn_loader

pytestmark = pytest.mark.slow   # runs whole stages or kills processes: not in the fast tier

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    """One prepared run (shards, proposals, teacher, concepts) copied three times before labelling."""
    from pipeline.config import load_manifest

    root = tmp_path_factory.mktemp("precompute")
    # 10 shards of 4 images (2 label batches each): a window to kill in that a fast machine does not close
    body = manifest_body(num_images=40, per_shard=4)
    (root / "a").mkdir()
    (root / "a" / "m.yaml").write_text("name: t\noutput_dir: out\nray: {num_cpus: 2}\n" + body)
    manifest = load_manifest(root / "a" / "m.yaml")
    layout = prepare_run(manifest)
    proposals.run(manifest, rpn_loader=rpn_loader())
    concepts_from_regions(layout)
    for name in ("killed", "cluster"):
        shutil.copytree(root / "a", root / name)
    label.run(manifest)
    return root, manifest, layout


def _label_files(layout: RunLayout) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(layout.labels.root.iterdir())
            if p.suffix in (".parquet", ".faiss") or p.name == "codec.json"}


def test_sigkill_mid_stage_then_rerun_gives_the_uninterrupted_rows(runs, ray_local, capsys):
    root, _, reference = runs
    layout = RunLayout(root / "killed" / "out")
    cmd = [sys.executable, "-m", "stages.cli", "label", str(root / "killed" / "m.yaml")]
    # The killed run joins the session's Ray (its actors die with its driver): no Ray start of its own.
    env = {**ENV, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    log = root / "killed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=out,
                                stderr=subprocess.STDOUT)
    rng = random.Random(1234)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list(layout.labels.root.glob("*_stats.json")):
            if proc.poll() is not None:
                pytest.fail(f"the label run ended (exit {proc.returncode}) before it could be killed:\n"
                            + log.read_text(errors="replace")[-3000:])
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.05))   # a seeded moment just after the first shard is done
    finally:
        kill_process_tree(proc)
    wait_until_ray_is_idle()
    done_at_kill = len(list(layout.labels.root.glob("*_stats.json")))
    print(f"label shards done when killed: {done_at_kill} of 10", file=sys.stderr)
    assert 0 < done_at_kill < 10, f"{done_at_kill} shards were done when the run was killed"
    assert json.loads(layout.labels.manifest.read_text())["status"] == "running"   # never read as done
    # The rerun in this process (the test's Ray is up): the same code path as a new process, faster.
    from pipeline.config import load_manifest

    label.run(load_manifest(root / "killed" / "m.yaml"))
    assert f"({10 - done_at_kill} to do)" in capsys.readouterr().out
    assert read_rows(layout.labels) == read_rows(reference.labels)
    assert _label_files(layout) == _label_files(reference)
    assert not list(layout.labels.root.glob(".tmp-*"))


CLUSTER_SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from pipeline.config import load_manifest
    from stages import label

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        manifest = load_manifest(sys.argv[1], [f"ray.address={cluster.address}"])
        result = label.run(manifest)
        print("NODES", json.dumps({"alive": len([n for n in ray.nodes() if n["Alive"]]),
                                   "used": result["ray_nodes"]}))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def test_two_node_loopback_cluster_writes_the_local_outputs(runs, tmp_path):
    import json

    root, _, reference = runs
    layout = RunLayout(root / "cluster" / "out")
    script = tmp_path / "cluster_label.py"
    script.write_text(CLUSTER_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(root / "cluster" / "m.yaml")], cwd=REPO, env=ENV,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=400)
    finally:
        kill_process_tree(proc)
    assert proc.returncode == 0, err[-3000:]
    nodes = json.loads(out.split("NODES", 1)[1].strip().splitlines()[0])
    assert nodes["alive"] == 2
    # Which node runs which actor is Ray's scheduling choice (it may place both on one node), so
    # only the outputs are compared, not where they were computed.
    assert 1 <= len(nodes["used"]) <= 2
    assert _label_files(layout) == _label_files(reference)
