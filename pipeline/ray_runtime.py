"""The Ray adapter: the one place that starts or joins Ray and touches its changing APIs.

Without an address a local Ray starts inside this process (the embedded default); with
`ray.address` in the manifest (or RAY_ADDRESS) the same stage runs on an existing cluster, e.g.
under `ray job submit`. The embedded local Ray listens on loopback only (its servers and, when asked for,
its dashboard); a cluster is joined only through `ray.address` or RAY_ADDRESS.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

from tqdm import tqdm

log = logging.getLogger(__name__)


def init_ray(cfg) -> None:
    """Start (or join) Ray per the manifest's `ray` section; a no-op when Ray is already up."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    common = dict(log_to_driver=True, logging_level=logging.WARNING, configure_logging=True)
    if address and address != "local":
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, **common)
    else:
        # address="local": always a new local instance, even when a `ray start` cluster on this machine
        # left /tmp/ray/ray_current_cluster (plain ray.init() would join it and reject num_cpus).
        _local_ray_on_loopback()
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=cfg.include_dashboard,
                 dashboard_host=cfg.dashboard_host, _node_ip_address=LOOPBACK, **common)


# The embedded local Ray serves this machine alone, so nothing of it listens on the network: its node
# address is the loopback one, and Ray binds each server (GCS, raylet, object manager, workers, agents) to
# the node address. Ray itself takes loopback when clusters are off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
# its switch on macOS and Windows, read when ray is imported; otherwise it turns 127.0.0.1 into the
# machine's network address). A cluster is joined only through ray.address / RAY_ADDRESS.
LOOPBACK = "127.0.0.1"


def _local_ray_on_loopback() -> None:
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"     # the processes the local Ray starts
    ray_constants.ENABLE_RAY_CLUSTER = False                         # this one, which imported ray already


def cluster_resources() -> dict:
    import ray

    return dict(ray.cluster_resources())


def run_tasks(fn: Callable[..., Any], arg_list: Iterable[tuple], *, num_cpus: float = 1,
              num_gpus: float = 0, max_in_flight: Optional[int] = None, desc: str = "",
              unit: str = "shard", ray_options: Optional[dict] = None) -> Iterator[Any]:
    """Run `fn(*args)` as Ray tasks, one per args tuple, yielding results as they finish.

    At most `max_in_flight` tasks are queued at once (backpressure: a million-row corpus does not
    put a million task specs in the object store). A progress bar shows rate and ETA. `ray_options` go to
    `ray.remote` as they are (e.g. model_process_env's runtime_env).
    """
    import ray

    arg_list = list(arg_list)
    if not arg_list:
        return
    if max_in_flight is None:
        max_in_flight = max(2, 2 * int(cluster_resources().get("CPU", 1) / max(num_cpus, 1e-3)))
    remote_fn = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=2, **(ray_options or {}))(fn)
    pending, queue = [], iter(arg_list)
    with tqdm(total=len(arg_list), desc=desc, unit=unit, dynamic_ncols=True,
              disable=None if os.isatty(2) else False, mininterval=1.0) as bar:
        while True:
            while len(pending) < max_in_flight:
                args = next(queue, None)
                if args is None:
                    break
                pending.append(remote_fn.remote(*args))
            if not pending:
                break
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(1)
            yield ray.get(done[0])


# CPUs per GPU actor by default: enough decode threads to keep one GPU fed (an H100 labels several hundred
# 800-px images per second; one thread decodes and resizes about 30-60 of them).
GPU_ACTOR_CPUS = 8

# On a CPU-only actor the model's own threads use every CPU it holds, and decoding is a small part of a CPU
# model's time (about 30 ms for a 1333x1000 JPEG against seconds for an RN50 at 800 px): more decode threads
# would only take cores from the model (measured on 2 CPUs: 0.82 of a pre-decoded loop with 2 decode
# threads, 0.96 with 1). With a GPU the CPUs are the decoders'.
CPUS_PER_DECODE_THREAD_WITHOUT_GPU = 8

# How often a stage waiting for a GPU node looks at the cluster again, and says it is still waiting.
GPU_WAIT_POLL_S = 2.0
GPU_WAIT_MESSAGE_EVERY_S = 60.0


@dataclass(frozen=True)
class NodeResources:
    """An alive Ray node's CPUs and GPUs (its `Resources` in ray.nodes())."""
    name: str
    cpus: float
    gpus: float

    def __str__(self) -> str:
        return f"{self.name} {{CPU: {self.cpus:g}, GPU: {self.gpus:g}}}"


@dataclass(frozen=True)
class ActorPlan:
    """What each model-holding actor of a stage asks Ray for, how many actors at most, and how many
    threads decode in each. `num_gpus` 0: the model runs on the CPU."""
    num_actors: int
    num_cpus: int
    num_gpus: float
    decode_threads: int

    def __str__(self) -> str:
        return (f"{self.num_actors} actor(s) of {{CPU: {self.num_cpus}, GPU: {self.num_gpus:g}}}, "
                f"{self.decode_threads} decode thread(s) each")


class ActorShapeError(RuntimeError):
    """No alive node can hold one actor of the planned shape (Ray would wait for one forever)."""


def alive_nodes() -> list[NodeResources]:
    """The cluster's alive nodes and their CPUs and GPUs (nodes that left are listed by Ray as not Alive)."""
    import ray

    return [NodeResources(f"node {n['NodeID'][:8]} ({n.get('NodeManagerAddress', '?')})",
                          float(n["Resources"].get("CPU", 0.0)), float(n["Resources"].get("GPU", 0.0)))
            for n in ray.nodes() if n.get("Alive")]


def _slots(node: NodeResources, gpus_per_actor: float) -> int:
    """How many actors of `gpus_per_actor` GPUs the node's GPUs hold (fractions allowed: 0.5 -> 2 per GPU)."""
    return math.floor(node.gpus / gpus_per_actor + 1e-9)


def plan_actors(section: str, nodes: list[NodeResources], *, num_gpus_per_actor: float,
                cpus_per_actor: Optional[int] = None, num_actors: Optional[int] = None) -> ActorPlan:
    """The actor plan of a GPU stage (`section`: its manifest section, named in messages) on these nodes.

    With a GPU on any node (and `num_gpus_per_actor` > 0) each actor asks for `num_gpus_per_actor` GPUs and,
    unless `cpus_per_actor` says otherwise, the CPUs per GPU slot of the GPU nodes (the smallest of them,
    so every GPU gets an actor; at most GPU_ACTOR_CPUS): a CPU-only head does not count. Otherwise the
    model runs on the CPU and an actor asks for `cpus_per_actor` CPUs (default 1). The pool has as many
    actors as the nodes hold, counted node by node (`num_actors` pins it). A shape that no node can hold
    is an ActorShapeError naming the resources (Ray would wait for such a node forever)."""
    gpus = num_gpus_per_actor if num_gpus_per_actor > 0 and any(n.gpus > 0 for n in nodes) else 0.0
    if gpus:
        hosts = [n for n in nodes if _slots(n, gpus) >= 1]
        per_slot = [int(n.cpus // _slots(n, gpus)) for n in hosts]
        cpus = int(cpus_per_actor or max(1, min([GPU_ACTOR_CPUS, *per_slot])))
        holds = [min(_slots(n, gpus), int(n.cpus // cpus)) for n in hosts]
    else:
        hosts = list(nodes)
        cpus = int(cpus_per_actor or 1)
        holds = [int(n.cpus // cpus) for n in hosts]
    if sum(holds) == 0:
        if not hosts:
            fix = (f"set {section}.num_gpus_per_actor to at most {max(n.gpus for n in nodes):g}" if gpus else
                   "start Ray nodes")
        else:
            fix = f"set {section}.cpus_per_actor to at most {max(n.cpus for n in hosts):g}"
        raise ActorShapeError(f"{section}: an actor asks for {{CPU: {cpus}, GPU: {gpus:g}}}, which no alive Ray "
                              f"node can hold (alive nodes: {', '.join(map(str, nodes)) or 'none'}); {fix}")
    threads = cpus if gpus else max(1, cpus // CPUS_PER_DECODE_THREAD_WITHOUT_GPU)
    return ActorPlan(num_actors=int(num_actors or sum(holds)), num_cpus=cpus, num_gpus=gpus, decode_threads=threads)


def can_grow(ray_cfg) -> bool:
    """Whether nodes can join the Ray this process uses: a cluster reached by address can (an autoscaler
    adds nodes); the local Ray started inside this process cannot."""
    return bool(ray_cfg.address or os.environ.get("RAY_ADDRESS"))


def wait_for_gpu_nodes(section: str, num_gpus_per_actor: float, wait_s: float) -> list[NodeResources]:
    """The alive nodes once one has a GPU, waiting up to `wait_s` seconds for an autoscaler to add one
    (it is asked for one actor's GPUs meanwhile; the request is withdrawn after). RuntimeError when none
    joined in time."""
    from ray.autoscaler.sdk import request_resources

    started = last_message = time.monotonic()
    nodes = alive_nodes()
    print(f"{section}: no alive Ray node has a GPU yet; waiting up to {wait_s:g} s (ray.gpu_wait_s) for the "
          f"autoscaler to add one (alive nodes: {', '.join(map(str, nodes))})", flush=True)
    request_resources(bundles=[{"GPU": num_gpus_per_actor}])
    try:
        while not any(n.gpus > 0 for n in nodes):
            waited = time.monotonic() - started
            if waited >= wait_s:
                raise RuntimeError(
                    f"{section}: no Ray node with a GPU joined within ray.gpu_wait_s={wait_s:g} s (alive nodes: "
                    f"{', '.join(map(str, nodes))}); check the cluster's GPU node type and the autoscaler's log, "
                    f"raise ray.gpu_wait_s, or set {section}.num_gpus_per_actor: 0 to run the model on CPUs")
            if time.monotonic() - last_message >= GPU_WAIT_MESSAGE_EVERY_S:
                print(f"{section}: still waiting for a GPU node ({waited:.0f} of {wait_s:g} s)", flush=True)
                last_message = time.monotonic()
            time.sleep(min(GPU_WAIT_POLL_S, max(0.0, wait_s - waited)))
            nodes = alive_nodes()
    finally:
        request_resources(bundles=[])   # a standing request would keep a GPU node up after the stage
    print(f"{section}: a GPU node joined after {time.monotonic() - started:.0f} s", flush=True)
    return nodes


def plan_actor_pool(section: str, settings, ray_cfg) -> ActorPlan:
    """The actor plan of a GPU stage (plan_actors) from the nodes alive now, its manifest section's
    `settings` (num_gpus_per_actor, cpus_per_actor, num_actors) and the `ray` section. When the stage
    asks for GPUs, no alive node has one, and nodes can join (a cluster by address), it first waits up to
    ray.gpu_wait_s for a GPU node (0: decide from the nodes alive now; the local Ray decides at once)."""
    nodes = alive_nodes()
    if (settings.num_gpus_per_actor > 0 and not any(n.gpus > 0 for n in nodes) and ray_cfg.gpu_wait_s > 0
            and can_grow(ray_cfg)):
        nodes = wait_for_gpu_nodes(section, settings.num_gpus_per_actor, ray_cfg.gpu_wait_s)
    plan = plan_actors(section, nodes, num_gpus_per_actor=settings.num_gpus_per_actor,
                       cpus_per_actor=settings.cpus_per_actor, num_actors=settings.num_actors)
    log.info("%s: %s on %d alive node(s)", section, plan, len(nodes))
    return plan


def assigned_device(section: str = "") -> "torch.device":  # noqa: F821
    """The device of the calling Ray worker (an actor or a task), from Ray's assignment: its first GPU
    when Ray assigned it GPUs, else the CPU. A worker given no GPU never touches one, even where CUDA is
    visible (Ray 2.60 no longer hides GPUs from workers that asked for none). A worker given a GPU that
    PyTorch cannot use fails at once, naming the driver and torch's CUDA version, instead of running
    the model on the CPU."""
    import ray
    import torch

    gpu_ids = [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
    if not gpu_ids:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{section or 'this worker'}: Ray assigned GPU {','.join(gpu_ids)} on {current_node() or 'this node'}, "
            f"but PyTorch finds no usable CUDA device there (NVIDIA driver: {nvidia_driver()}; torch "
            f"{torch.__version__} is built for CUDA {torch.version.cuda or 'none (a CPU-only build)'}). A CUDA "
            "build needs a driver at least as new as its CUDA version (docs/cluster.md); install a matching "
            f"torch or driver on the GPU nodes, or set {section or 'the stage'}.num_gpus_per_actor: 0 to run on CPUs")
    return torch.device("cuda", cuda_index(gpu_ids[0]))


def on_assigned_device(fn: Callable[..., Any], section: str = "") -> Callable[..., Any]:
    """`fn(*args, device=...)` as a Ray task's function: run by a worker, it gets that worker's
    assigned_device."""
    def call(*args):
        return fn(*args, device=assigned_device(section))

    call.__name__ = getattr(fn, "__name__", "call")   # the task's name in Ray's dashboard and errors
    return call


def cuda_index(gpu_id: str) -> int:
    """PyTorch's index of the GPU that Ray calls `gpu_id`: its place in CUDA_VISIBLE_DEVICES (Ray sets that to
    the worker's GPUs, so the first is cuda:0), or the id itself when the variable is unset
    (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if gpu_id in ids:
            return ids.index(gpu_id)
    return int(gpu_id)


def nvidia_driver() -> str:
    """The NVIDIA driver's version as nvidia-smi reports it, or why there is none."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no NVIDIA driver found (no nvidia-smi)"
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"no NVIDIA driver found (nvidia-smi: {err})"
    versions = sorted({v.strip() for v in out.stdout.splitlines() if v.strip()})
    if out.returncode != 0 or not versions:
        return f"no NVIDIA driver found (nvidia-smi: {(out.stderr or out.stdout).strip()[:200]})"
    return ", ".join(versions)


# glibc's malloc gives a large block back to the kernel when it is freed, and the kernel zeroes it again when
# it is next touched. A CNN at 800 px on a CPU allocates gigabytes of activations per batch, so each batch
# pays for that again (measured, paper RPN, batch of 2 images at 800 px: 1.4M page faults and 28% of the CPU
# time in the kernel). Keeping freed memory in the process, as PyTorch's CUDA allocator does on a GPU and
# jemalloc does in CPU inference servers, makes the batch 1.5x faster; the peak is unchanged. glibc reads
# these at process start, so they go to the actor's process through its runtime_env. One arena: Ray Data
# calls the actor from a thread other than the main one, and a thread arena maps its large blocks anew.
# Only for models on the CPU: a GPU actor's activations live on the device, and its decode threads keep
# their own arenas.
CPU_MODEL_ALLOCATOR_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
                           "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def model_process_env(num_gpus: float) -> dict:
    """Ray options (a runtime_env) for a process that holds a model: CPU_MODEL_ALLOCATOR_ENV when the model
    runs on the CPU (`num_gpus` 0), nothing otherwise."""
    return {} if num_gpus else {"runtime_env": {"env_vars": dict(CPU_MODEL_ALLOCATOR_ENV)}}


def current_node() -> str:
    """The Ray node id of the calling worker ('' outside Ray), for per-shard stats."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - stats only
        return ""


# Calls queued on one actor at a time. An actor runs its calls one after another, and Ray Data hands an item to
# the first actor with room: with 2 per actor, the actor that is ready first takes two whole shards while another
# is still loading its model and then idles (measured, bench/shard_size.py: 2 shards on 2 actors ran one after the
# other on one actor). With 1, the next item waits for the first actor to finish its shard, whichever it is;
# the cost is one dispatch round trip per shard, against a shard's seconds of model time.
SHARDS_IN_FLIGHT_PER_ACTOR = 1


def map_with_actor_pool(actor_cls: type, items: list[dict], plan: ActorPlan, *, constructor_args: tuple = (),
                        desc: str = "", unit: str = "shard") -> Iterator[dict]:
    """Ray Data: `items` (one row each, e.g. {"shard": 3}) through a pool of `actor_cls` actors.

    A fixed pool of actors of the plan's shape (plan_actor_pool; never more actors than items) is started; each is
    constructed once with `constructor_args` (it loads the model) and is called with
    batches of one row (a dict of numpy columns); it returns a dict of small numpy columns (stats),
    yielded here row by row as they finish, with a progress bar. Ray Data streams the items
    (backpressure: one call per actor at a time, SHARDS_IN_FLIGHT_PER_ACTOR, so that no actor holds a
    shard while another idles), and an actor that dies is
    replaced and its item retried. Actors whose model runs on the CPU get CPU_MODEL_ALLOCATOR_ENV.
    """
    import ray

    if not items:
        return
    num_actors = min(plan.num_actors, len(items))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False       # our own bar below, one line per stage
    ctx.execution_options.preserve_order = False
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    remote = {"num_gpus": plan.num_gpus} if plan.num_gpus else model_process_env(0)
    ds = ds.map_batches(actor_cls, batch_size=1, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=num_actors,
                                                           max_tasks_in_flight_per_actor=SHARDS_IN_FLIGHT_PER_ACTOR),
                        fn_constructor_args=constructor_args, num_cpus=plan.num_cpus, **remote)
    log.info("%s: %d items on %d actor(s), %s GPU each", desc, len(items), num_actors, plan.num_gpus)
    with tqdm(total=len(items), desc=desc, unit=unit, dynamic_ncols=True,
              disable=None if os.isatty(2) else False, mininterval=1.0) as bar:
        for row in ds.iter_rows():
            bar.update(1)
            yield row
