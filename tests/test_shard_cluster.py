"""The shard stage on a Ray cluster reached by address (a head and a worker node on loopback) writes
the same shards as the local run."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pipeline.config import load_manifest
from pipeline.io import sha256_file
from pipeline.layout import RunLayout
from stages import shard
from tests.corpora import make_folder_corpus

pytestmark = pytest.mark.slow   # runs whole stages or kills processes: not in the fast tier

CLUSTER_SCRIPT = textwrap.dedent("""
    import sys
    from ray.cluster_utils import Cluster
    from stages.cli import main

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        import ray
        code = main(["shard", sys.argv[1], "--set", f"ray.address={cluster.address}"])
        nodes = len([n for n in ray.nodes() if n["Alive"]])
        print("ALIVE_NODES", nodes)
    finally:
        import ray
        ray.shutdown()
        cluster.shutdown()
    sys.exit(code)
""")


def test_cluster_by_address_writes_identical_shards(ray_local, tmp_path):
    make_folder_corpus(tmp_path / "corpus", n_good=10, hostile=True)
    manifests = {}
    for name in ("local", "cluster"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"name: {name}\noutput_dir: {tmp_path / name}\n"
                        f"corpus: {{format: folder, path: {tmp_path / 'corpus'}}}\n"
                        "shard: {samples_per_shard: 4, max_pixels: 10000000}\n")
        manifests[name] = path
    shard.run(load_manifest(manifests["local"]))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([sys.executable, "-c", CLUSTER_SCRIPT, str(manifests["cluster"])], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ALIVE_NODES 2" in result.stdout

    def files(name):
        root = RunLayout.of(load_manifest(manifests[name])).shards.root
        return {p.name: sha256_file(p) for p in sorted(root.glob("[0-9]*")) if p.suffix in (".tar", ".parquet")}

    local, cluster = files("local"), files("cluster")
    assert len(local) == 2 * 6 and local == cluster
