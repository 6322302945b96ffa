"""Device choice and distributed setup, defined once for every loop and every worker."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

# How long a rank waits in process-group setup or a collective before giving up: a rank that died
# must not leave the others blocked until torchrun's own timeout.
DISTRIBUTED_TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("REGIONCLIP_DIST_TIMEOUT_S", "600")))


def resolve_device(device: str = "auto") -> torch.device:
    """`auto`: the GPU of this rank (LOCAL_RANK under torchrun) when CUDA is present, else the CPU.
    A bare `cuda` also means this rank's GPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); starts the process group under torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=DISTRIBUTED_TIMEOUT)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
