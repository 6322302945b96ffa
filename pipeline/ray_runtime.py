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
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=cfg.include_dashboard,
                 dashboard_host=cfg.dashboard_host, **common)


def cluster_resources() -> dict:
    import ray

    return dict(ray.cluster_resources())


def cluster_gpus() -> float:
    return float(cluster_resources().get("GPU", 0.0))


def run_tasks(fn: Callable[..., Any], arg_list: Iterable[tuple], *, num_cpus: float = 1,
              num_gpus: float = 0, max_in_flight: Optional[int] = None, desc: str = "",
              unit: str = "shard") -> Iterator[Any]:
    """Run `fn(*args)` as Ray tasks, one per args tuple, yielding results as they finish.

    At most `max_in_flight` tasks are queued at once (backpressure: a million-row corpus does not
    put a million task specs in the object store). A progress bar shows rate and ETA.
    """
    import ray

    arg_list = list(arg_list)
    if not arg_list:
        return
    if max_in_flight is None:
        max_in_flight = max(2, 2 * int(cluster_resources().get("CPU", 1) / max(num_cpus, 1e-3)))
    remote_fn = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=2)(fn)
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
