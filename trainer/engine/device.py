"""Device choice and distributed setup, defined once for every loop and every worker."""
from __future__ import annotations

import datetime
import os
import sys
import traceback
from typing import NoReturn

import torch
import torch.distributed as dist

# How long a rank waits to form the process group, and in any collective, before giving up: a rank
# that died must not leave the others blocked for torch's default of 30 minutes (NCCL: 10). Tests set
# it small; on a GPU cluster a first step that compiles or loads for minutes needs the default.
TIMEOUT_ENV = "REGIONCLIP_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600


def resolve_device(device: str = "auto") -> torch.device:
    """`auto`: the GPU of this rank (rank_gpu) when CUDA is present, else the CPU. A bare `cuda` also
    means this rank's GPU. (A Ray worker takes its device from Ray's assignment instead:
    pipeline.ray_runtime.assigned_device.)"""
    if device == "auto":
        return rank_gpu() if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = rank_gpu()
    return dev


def rank_gpu() -> torch.device:
    """This rank's GPU: cuda:LOCAL_RANK (torchrun's rank on this node, 0 without it) among the GPUs this
    process sees, or cuda:0 when it sees one GPU only (a launcher that shows each rank its own GPU)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    count = torch.cuda.device_count()
    if local_rank < count or count == 0:   # none: torch's own error when the device is first used
        return torch.device("cuda", local_rank)
    if count == 1:
        return torch.device("cuda", 0)
    raise RuntimeError(f"LOCAL_RANK={local_rank}, but this process sees {count} GPUs (CUDA_VISIBLE_DEVICES="
                       f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most {count} ranks on this "
                       "node (torchrun --nproc_per_node), or show each rank one GPU")


def distributed_timeout() -> datetime.timedelta:
    """REGIONCLIP_DIST_TIMEOUT_S (seconds, default 600), read when the process group starts."""
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds greater than 0")
    return datetime.timedelta(seconds=seconds)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); starts the process group under torchrun (WORLD_SIZE > 1), with a timeout on
    its setup and on every collective (distributed_timeout)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = distributed_timeout()
        try:
            dist.init_process_group(backend=backend, timeout=timeout)
        except RuntimeError as err:  # torch's DistStoreError / DistNetworkError on a timeout
            raise RuntimeError(f"rank {os.environ.get('RANK', '?')}: the {world} ranks did not form a process "
                               f"group within {timeout.total_seconds():g} s ({TIMEOUT_ENV}); did every rank "
                               f"start? ({type(err).__name__}: {err})") from err
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def end_distributed() -> None:
    """After training ended normally on every rank: leave the process group (its communicators and
    threads end in order, rather than in the interpreter's exit, where NCCL warns or hangs). A no-op
    without one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def end_rank_after_error(what: str) -> NoReturn:
    """Under DDP, for the error being handled: print it once, with this rank's traceback, and end this
    process at once (exit status 1).

    The other ranks wait in, or will reach, a collective this rank will never join. Once this process
    is gone its sockets are closed: the other ranks' gloo collectives fail at once, and torchrun stops
    every rank as soon as one exits non-zero (NCCL collectives do not notice a dead peer; outside
    torchrun they end at the timeout). Python's own exit would first run every `finally` and hook on
    the stack, and a collective among them would be paired with a different one on the other ranks
    (all-reduces of different tensors silently mixing), then the process group's destructors, which can
    wait for NCCL work that never completes."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    sys.stdout.flush()
    print(f"rank {rank}: {what} failed; ending this rank so that every rank stops (an error inside a "
          "collective usually means another rank failed first: see its error)", file=sys.stderr)
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
