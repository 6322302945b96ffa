"""The GPU stages on a simulated cluster of real Ray processes (ray.cluster_utils.Cluster): a head of 4 CPUs
without GPUs and a worker node of 2 CPUs that declares one GPU, which does not exist on this machine.

- Planning reads the alive nodes: an actor gets the CPUs per GPU of the GPU nodes (the CPU-only head does not
  count), and a shape that no node can hold is an error within seconds, naming the resources.
- An actor's device is Ray's assignment: an actor given no GPU runs on the CPU even where CUDA is visible; an
  actor given a GPU that PyTorch cannot use fails at once, naming the driver and torch's CUDA version.
- So with default settings proposals and label are planned onto the GPU node and fail fast; with
  `num_gpus_per_actor: 0` they run on the CPUs to the end.

One cluster for the module (a node starts in seconds). This process can be connected to one Ray only: the
session's local Ray (tests/conftest.py) is stopped for the module and started again after it.
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch

from pipeline.ray_runtime import (ActorPlan, ActorShapeError, NodeResources, alive_nodes, cuda_index, plan_actor_pool,
                                  plan_actors)
from pipeline.sidecars import written_keys
from tests.labelkit import concepts_from_regions, manifest_body, prepare_run, read_rows, rpn_loader

HEAD = {"num_cpus": 4, "num_gpus": 0}
GPU_NODE = {"num_cpus": 2, "num_gpus": 1}        # the GPU it declares does not exist
# The declared GPU must not exist for the fail-fast tests: on a machine with CUDA, Ray would hand the actor a
# real one.
no_real_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a real GPU for the "
                                 "simulated node's declared one")
STAGE_LIMIT_S = 120   # a stage still running after this is stuck (the original planner waits forever)


class SimCluster:
    """A Ray cluster on this machine: a fixed head and worker nodes of the shapes a test asks for."""

    def __init__(self):
        from ray.cluster_utils import Cluster

        # No workers started ahead for the first driver (one per CPU on every node: 6 Python processes at
        # once on a small test machine); the tests' few tasks and actors start theirs.
        self.cluster = Cluster(initialize_head=True, head_node_args={
            **HEAD, "include_dashboard": False, "_system_config": {"prestart_worker_first_driver": False}})
        self.workers: list[tuple[dict, object]] = []

    @property
    def address(self) -> str:
        return self.cluster.address

    def workers_are(self, *shapes: dict) -> None:
        """Make the worker nodes exactly `shapes` (num_cpus, num_gpus), keeping the ones already there."""
        wanted, kept = list(shapes), []
        for shape, node in self.workers:
            if shape in wanted:
                wanted.remove(shape)
                kept.append((shape, node))
            else:
                self.cluster.remove_node(node)
        self.workers = kept + [(shape, self.cluster.add_node(**shape)) for shape in wanted]
        self.cluster.wait_for_nodes()
        deadline = time.monotonic() + 30   # the driver's view of the nodes catches up
        while len(alive_nodes()) != 1 + len(shapes) and time.monotonic() < deadline:
            time.sleep(0.2)

    def node_id(self, shape: dict) -> str:
        return next(node.node_id for s, node in self.workers if s == shape)

    def shutdown(self) -> None:
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def tiny_run(ray_local, tmp_path_factory):
    """A tiny run folder (2 shards of 4 images, an RPN, a teacher), made on the session's local Ray (whose
    workers are warm) before the cluster takes over: (manifest path, layout)."""
    from pipeline.config import load_manifest

    path = tmp_path_factory.mktemp("cluster-sim") / "m.yaml"
    path.write_text("name: t\noutput_dir: out\n" + manifest_body(num_images=8, per_shard=4))
    return path, prepare_run(load_manifest(path))


@pytest.fixture(scope="module")
def cluster(tiny_run):
    """The simulated cluster, this process connected to it; the session's local Ray is back afterwards."""
    import ray

    from tests.conftest import start_local_ray

    ray.shutdown()
    sim = SimCluster()
    try:
        ray.init(address=sim.address, log_to_driver=False)
        sim.workers_are(GPU_NODE)
        yield sim
    finally:
        ray.shutdown()
        sim.shutdown()
        start_local_ray()


@pytest.fixture(scope="module")
def run_folder(cluster, tiny_run):
    """A manifest loader for the tiny run that joins the cluster by address (as `ray job submit` does), and
    the run's layout."""
    from pipeline.config import load_manifest

    path, layout = tiny_run

    def manifest(*overrides: str):
        return load_manifest(path, [f"ray.address={cluster.address}", *overrides])

    return manifest, layout


class InThread:
    """fn(*args, **kwargs) running in a thread (this one stays free: Ray adds nodes from the main thread only)."""

    def __init__(self, fn, *args, **kwargs):
        self.name, self.box = getattr(fn, "__name__", str(fn)), {}
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)
        self.thread.start()

    def _run(self, fn, args, kwargs):
        try:
            self.box["result"] = fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            self.box["error"] = err
        self.box["seconds"] = time.monotonic() - self.started

    def outcome(self, limit_s: float):
        """(result, error, seconds); the test fails if it still runs `limit_s` seconds after it started (a stage
        waiting for a node that never comes)."""
        self.thread.join(max(0.0, limit_s - (time.monotonic() - self.started)))
        if self.thread.is_alive():
            pytest.fail(f"{self.name} still running after {limit_s} s")
        return self.box.get("result"), self.box.get("error"), self.box["seconds"]


def run_within(limit_s: float, fn, *args, **kwargs):
    """(result, error, seconds) of fn(*args, **kwargs); the test fails if it runs longer than `limit_s`."""
    return InThread(fn, *args, **kwargs).outcome(limit_s)


def every_written_key(layout) -> set[str]:
    return {row["key"] for s in (0, 1) for row in written_keys(layout.shards, s)}


# -- planning from the nodes (no Ray) ---------------------------------------------------------------------------

def nodes(*shapes: tuple[float, float]) -> list[NodeResources]:
    return [NodeResources(f"node{i}", cpus, gpus) for i, (cpus, gpus) in enumerate(shapes)]


@pytest.mark.parametrize("shapes, gpus_per_actor, cpus_setting, expected", [
    # (CPUs, GPUs) per node -> (actors, CPUs and GPUs each, decode threads)
    ([(4, 0), (4, 1)], 1.0, None, (1, 4, 1.0, 4)),         # the CPU head does not count: 4, not 8
    ([(4, 0), (2, 1)], 1.0, None, (1, 2, 1.0, 2)),         # the simulated cluster
    ([(64, 8)], 1.0, None, (8, 8, 1.0, 8)),                 # 8 CPUs per GPU at most (GPU_ACTOR_CPUS)
    ([(16, 4), (4, 0)], 1.0, None, (4, 4, 1.0, 4)),         # never more CPUs than a GPU node has per GPU
    ([(8, 1), (32, 2)], 1.0, None, (3, 8, 1.0, 8)),         # actors counted node by node
    ([(64, 8)], 0.5, None, (16, 4, 0.5, 4)),                # two actors per GPU
    ([(64, 8)], 1.0, 6, (8, 6, 1.0, 6)),                    # the setting wins
    ([(2, 0)], 1.0, None, (2, 1, 0.0, 1)),                  # no GPU anywhere: one CPU per actor
    ([(32, 0)], 1.0, 16, (2, 16, 0.0, 2)),                  # a CPU actor's model threads keep most CPUs
    ([(4, 0), (64, 8)], 0.0, 8, (8, 8, 0.0, 1)),            # num_gpus_per_actor 0: the model on CPUs everywhere
])
def test_the_plan_of_a_set_of_nodes(shapes, gpus_per_actor, cpus_setting, expected):
    plan = plan_actors("label", nodes(*shapes), num_gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_setting)
    assert (plan.num_actors, plan.num_cpus, plan.num_gpus, plan.decode_threads) == expected


@pytest.mark.parametrize("gpus_per_actor, cpus_setting, asked, fix", [
    (1.0, 3, "{CPU: 3, GPU: 1}", "set label.cpus_per_actor to at most 2"),
    (2.0, None, "GPU: 2}", "set label.num_gpus_per_actor to at most 1"),
    (0.0, 5, "{CPU: 5, GPU: 0}", "set label.cpus_per_actor to at most 4"),
])
def test_a_shape_no_node_holds_is_an_error_naming_the_resources(gpus_per_actor, cpus_setting, asked, fix):
    with pytest.raises(ActorShapeError) as err:
        plan_actors("label", nodes((4, 0), (2, 1)), num_gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_setting)
    message = str(err.value)
    assert asked in message and fix in message
    assert "node0 {CPU: 4, GPU: 0}, node1 {CPU: 2, GPU: 1}" in message


def test_the_cuda_index_of_a_ray_gpu_id(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")         # Ray shows a worker its own GPUs: the first is cuda:0
    assert cuda_index("3") == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert cuda_index("3") == 1
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")              # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES
    assert cuda_index("3") == 3


def test_the_gpu_wait_setting_is_checked(tmp_path):
    from pipeline.config import ManifestError, load_manifest

    path = tmp_path / "m.yaml"
    path.write_text("name: t\noutput_dir: out\n")
    assert load_manifest(path).ray.gpu_wait_s == 0
    assert load_manifest(path, ["ray.gpu_wait_s=900"]).ray.gpu_wait_s == 900
    for bad in ("-1", "soon"):
        with pytest.raises(ManifestError, match="ray.gpu_wait_s"):
            load_manifest(path, [f"ray.gpu_wait_s={bad}"])


# -- planning on the simulated cluster --------------------------------------------------------------------------

def settings(section: str, manifest):
    """A section's actor settings (num_actors left to the plan) and the ray section."""
    return getattr(manifest, section).model_copy(update={"num_actors": None}), manifest.ray


@pytest.mark.slow
def test_the_stages_are_planned_onto_the_gpu_node(cluster, run_folder):
    manifest, _ = run_folder
    cluster.workers_are(GPU_NODE)
    shapes = sorted((n.cpus, n.gpus) for n in alive_nodes())
    assert shapes == [(2.0, 1.0), (4.0, 0.0)]
    for section in ("proposals", "label"):
        # 2 CPUs (the GPU node's), not the cluster's 6 CPUs per GPU, which no node has
        assert plan_actor_pool(section, *settings(section, manifest())) == ActorPlan(1, 2, 1.0, 2)
        assert plan_actor_pool(section, *settings(section, manifest(f"{section}.num_gpus_per_actor=0"))).num_gpus == 0


@pytest.mark.slow
def test_an_impossible_shape_fails_within_seconds_before_any_work(cluster, run_folder):
    from stages import proposals

    manifest, layout = run_folder
    cluster.workers_are(GPU_NODE)
    _, error, seconds = run_within(STAGE_LIMIT_S, proposals.run, manifest("proposals.cpus_per_actor=3"),
                                   rpn_loader=rpn_loader())
    assert isinstance(error, ActorShapeError), error
    assert "{CPU: 3, GPU: 1}" in str(error) and "{CPU: 2, GPU: 1}" in str(error)
    assert seconds < 20, seconds
    assert not list(layout.proposals.root.glob("*.parquet"))


# -- the device an actor picks ------------------------------------------------------------------------------------

def recording_rpn(checkpoint, device):
    """An RPN loader for ProposalShardWorker that only keeps the device it was given."""
    return {"device": str(device)}


class _ProposalWorkerProbe:
    """A ProposalShardWorker built in an actor whose PyTorch sees two CUDA devices."""

    def __init__(self, job):
        torch.cuda.is_available = lambda: True
        torch.cuda.device_count = lambda: 2
        from trainer.offline.proposals import ProposalShardWorker

        self.worker = ProposalShardWorker(job)

    def device(self) -> tuple[str, str]:
        return self.worker.proposer.rpn["device"], os.environ.get("CUDA_VISIBLE_DEVICES", "unset")


@pytest.mark.slow
def test_an_actor_uses_the_device_ray_assigned_even_where_cuda_is_visible(cluster, run_folder):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from stages.proposals import proposal_job

    manifest, _ = run_folder
    cluster.workers_are(GPU_NODE)
    job = proposal_job(manifest(), "unused.pt", rpn_loader=f"{__name__}:recording_rpn")
    on_gpu_node = NodeAffinitySchedulingStrategy(cluster.node_id(GPU_NODE), soft=False)
    probes = [ray.remote(num_cpus=1, num_gpus=gpus, scheduling_strategy=on_gpu_node)(_ProposalWorkerProbe).remote(job)
              for gpus in (0, 1)]
    try:
        (cpu_actor, _), (gpu_actor, visible) = ray.get([p.device.remote() for p in probes], timeout=90)
    finally:
        for p in probes:
            ray.kill(p)
    assert cpu_actor == "cpu"                        # given no GPU: never a GPU, though CUDA is visible to it
    assert (gpu_actor, visible) == ("cuda:0", "0")   # given GPU 0, which Ray shows it as its first


# -- the stages end to end ----------------------------------------------------------------------------------------

@no_real_gpu
@pytest.mark.slow
def test_default_settings_fail_fast_on_the_missing_gpu_and_cpu_actors_write_every_row(cluster, run_folder):
    from stages import label, proposals

    manifest, layout = run_folder
    cluster.workers_are(GPU_NODE)
    keys = every_written_key(layout)
    assert len(keys) == 8

    _, error, seconds = run_within(STAGE_LIMIT_S, proposals.run, manifest("proposals.num_actors=null"),
                                   rpn_loader=rpn_loader())
    print(f"\nproposals, default settings: failed after {seconds:.1f} s: {str(error)[-400:]}")
    message = str(error)
    assert "proposals: Ray assigned GPU 0" in message and "PyTorch finds no usable CUDA device" in message
    assert "NVIDIA driver: no NVIDIA driver found" in message and f"built for CUDA {torch.version.cuda}" in message
    assert seconds < 45

    _, error, _ = run_within(STAGE_LIMIT_S, proposals.run,
                             manifest("proposals.num_gpus_per_actor=0", "proposals.num_actors=1"),
                             rpn_loader=rpn_loader())
    assert error is None, error
    assert {row["key"] for row in read_rows(layout.proposals)} == keys

    concepts_from_regions(layout)
    _, error, seconds = run_within(STAGE_LIMIT_S, label.run, manifest("label.num_actors=null"))
    print(f"label, default settings: failed after {seconds:.1f} s: {str(error)[-400:]}")
    assert "label: Ray assigned GPU 0" in str(error) and "no NVIDIA driver found" in str(error)
    assert seconds < 45

    # fp16 codes: no PQ sample task to start (the cluster test of test_precompute_ray.py trains one on CPUs)
    _, error, _ = run_within(STAGE_LIMIT_S, label.run, manifest("label.num_gpus_per_actor=0", "label.num_actors=1",
                                                                 "label.codec=fp16"))
    assert error is None, error
    boxes = {row["key"]: row["num_boxes"] for row in read_rows(layout.proposals)}
    rows = read_rows(layout.labels)
    assert {row["key"]: row["num_regions"] for row in rows} == boxes and sum(boxes.values()) > 0
    assert np.isfinite([p for row in rows for p in row["pseudo_prob"]]).all()


# -- nodes that change (last: each changes the cluster's nodes) ----------------------------------------------------

@pytest.mark.slow
def test_a_stage_waits_for_a_gpu_node_then_plans_onto_it(cluster, run_folder):
    manifest, _ = run_folder
    cluster.workers_are()
    # None comes: a clear error once ray.gpu_wait_s has passed.
    _, error, seconds = run_within(30, plan_actor_pool, "label", *settings("label", manifest("ray.gpu_wait_s=1")))
    assert "no Ray node with a GPU joined within ray.gpu_wait_s=1 s" in str(error), error
    assert "label.num_gpus_per_actor: 0" in str(error) and 1 <= seconds < 15
    # Without a wait, planning goes by the nodes alive now: the head's CPUs.
    assert plan_actor_pool("label", *settings("label", manifest())).num_gpus == 0
    # A GPU node that joins during the wait is planned onto.
    waiting = InThread(plan_actor_pool, "label", *settings("label", manifest("ray.gpu_wait_s=60")))
    time.sleep(1.0)
    assert waiting.thread.is_alive()
    cluster.workers_are(GPU_NODE)
    plan, error, _ = waiting.outcome(90)
    assert error is None and plan == ActorPlan(1, 2, 1.0, 2), error


def _node_of_this_worker() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


@pytest.mark.slow
def test_a_4_cpu_head_and_a_4_cpu_gpu_node_plan_4_cpus_and_the_work_starts(cluster, run_folder):
    import ray

    manifest, _ = run_folder
    four = {"num_cpus": 4, "num_gpus": 1}
    cluster.workers_are(four)
    plan = plan_actor_pool("label", *settings("label", manifest()))
    assert (plan.num_actors, plan.num_cpus, plan.num_gpus) == (1, 4, 1.0)
    # Work of that shape is placed at once (8 CPUs and a GPU would wait for a node forever).
    on_node = ray.remote(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus)(_node_of_this_worker).remote()
    assert ray.get(on_node, timeout=60) == cluster.node_id(four)
