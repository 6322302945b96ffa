"""The Ray adapter: the one place that starts or joins Ray and touches its changing APIs.

Without an address a local Ray starts inside this process (the embedded default); with
`ray.address` in the manifest (or RAY_ADDRESS) the same stage runs on an existing cluster, e.g.
under `ray job submit`. A dashboard, when asked for, binds to localhost only.
"""
from __future__ import annotations

import logging
import os
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
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, **common)
    else:
        # address="local": always a new local instance, even when a `ray start` cluster on this machine
        # left /tmp/ray/ray_current_cluster (plain ray.init() would join it and reject num_cpus).
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=cfg.include_dashboard,
                 dashboard_host=cfg.dashboard_host, **common)


def cluster_resources() -> dict:
    import ray

    return dict(ray.cluster_resources())


def cluster_gpus() -> float:
    return float(cluster_resources().get("GPU", 0.0))


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


def actor_cpus(cpus_per_actor: Optional[int] = None) -> int:
    """The CPUs a model-holding actor asks Ray for (and decodes with): the setting when given; else
    GPU_ACTOR_CPUS when the cluster has GPUs (at most its CPUs per GPU, so every GPU gets an actor),
    and 1 on a CPU-only Ray (there the actors themselves spread over the CPUs)."""
    if cpus_per_actor:
        return int(cpus_per_actor)
    resources = cluster_resources()
    gpus = float(resources.get("GPU", 0.0))
    if gpus <= 0:
        return 1
    return max(1, min(GPU_ACTOR_CPUS, int(float(resources.get("CPU", 1)) // gpus)))


# On a CPU-only actor the model's own threads use every CPU it holds, and decoding is a small part of a CPU
# model's time (about 30 ms for a 1333x1000 JPEG against seconds for an RN50 at 800 px): more decode threads
# would only take cores from the model (measured on 2 CPUs: 0.82 of a pre-decoded loop with 2 decode
# threads, 0.96 with 1). With a GPU the CPUs are the decoders'.
CPUS_PER_DECODE_THREAD_WITHOUT_GPU = 8


def decode_threads(actor_cpus: int, num_gpus_per_actor: float) -> int:
    """Decode threads for a model-holding actor of `actor_cpus` CPUs (actor_cpus): all of them when the
    actor gets a GPU (the cluster has GPUs and num_gpus_per_actor > 0), else one per
    CPUS_PER_DECODE_THREAD_WITHOUT_GPU CPUs (at least one)."""
    if num_gpus_per_actor > 0 and cluster_gpus() > 0:
        return max(1, actor_cpus)
    return max(1, actor_cpus // CPUS_PER_DECODE_THREAD_WITHOUT_GPU)


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


def actor_pool_plan(num_items: int, *, num_gpus_per_actor: float, num_actors: Optional[int] = None,
                    cpus_per_actor: float = 1) -> dict:
    """How many model-holding actors to start and what each asks Ray for.

    With GPUs in the cluster each actor asks for `num_gpus_per_actor` GPUs and the pool has as many
    actors as the GPUs allow; otherwise the actors run on CPU (one per `cpus_per_actor` CPUs).
    Never more actors than items.
    """
    resources = cluster_resources()
    gpus = float(resources.get("GPU", 0.0))
    use_gpus = num_gpus_per_actor if gpus > 0 and num_gpus_per_actor > 0 else 0.0
    if num_actors is None:
        if use_gpus:
            num_actors = max(1, int(gpus // use_gpus))
        else:
            num_actors = max(1, int(resources.get("CPU", 1) // max(cpus_per_actor, 1e-3)))
    return {"num_actors": max(1, min(num_actors, max(num_items, 1))), "num_gpus": use_gpus,
            "num_cpus": cpus_per_actor}


# Calls queued on one actor at a time. An actor runs its calls one after another, and Ray Data hands an item to
# the first actor with room: with 2 per actor, the actor that is ready first takes two whole shards while another
# is still loading its model and then idles (measured, bench/shard_size.py: 2 shards on 2 actors ran one after the
# other on one actor). With 1, the next item waits for the first actor to finish its shard, whichever it is;
# the cost is one dispatch round trip per shard, against a shard's seconds of model time.
SHARDS_IN_FLIGHT_PER_ACTOR = 1


def map_with_actor_pool(actor_cls: type, items: list[dict], *, constructor_args: tuple = (),
                        num_gpus_per_actor: float = 1.0, num_actors: Optional[int] = None,
                        cpus_per_actor: float = 1, desc: str = "", unit: str = "shard") -> Iterator[dict]:
    """Ray Data: `items` (one row each, e.g. {"shard": 3}) through a pool of `actor_cls` actors.

    A fixed pool of `num_actors` actors (default: one per GPU slot, or per CPU) is started; each is
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
    plan = actor_pool_plan(len(items), num_gpus_per_actor=num_gpus_per_actor, num_actors=num_actors,
                           cpus_per_actor=cpus_per_actor)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False       # our own bar below, one line per stage
    ctx.execution_options.preserve_order = False
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    remote = {"num_gpus": plan["num_gpus"]} if plan["num_gpus"] else model_process_env(0)
    ds = ds.map_batches(actor_cls, batch_size=1, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=plan["num_actors"],
                                                           max_tasks_in_flight_per_actor=SHARDS_IN_FLIGHT_PER_ACTOR),
                        fn_constructor_args=constructor_args, num_cpus=plan["num_cpus"], **remote)
    log.info("%s: %d items on %d actor(s), %s GPU each", desc, len(items), plan["num_actors"], plan["num_gpus"])
    with tqdm(total=len(items), desc=desc, unit=unit, dynamic_ncols=True,
              disable=None if os.isatty(2) else False, mininterval=1.0) as bar:
        for row in ds.iter_rows():
            bar.update(1)
            yield row
