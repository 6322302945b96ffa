"""Where FAISS runs: on the GPUs when the installed build has kernels for them, on the CPU otherwise.

    gpus = faiss_gpus()                          # 0: CPU FAISS (decided once per process)
    index = index_on_gpus(cpu_index)             # sharded over FAISS's GPUs, or the CPU index itself
    index = index_on_gpus(cpu_index, device)     # on that torch device's GPU only (a GPU actor's own)

A FAISS GPU build runs only on the compute capabilities it was compiled for; on any other GPU its first
kernel launch fails inside FAISS, which aborts the process (no Python exception to catch). So the
devices are checked against the build before any GPU index is made, once per process, and an
unsupported device means CPU FAISS with one warning: slower search and k-means, the same results.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch

log = logging.getLogger(__name__)

# The distributions that install the `faiss` module (pyproject.toml: the `cpu` or the `gpu` extra).
FAISS_BUILDS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu11", "faiss-gpu-cu12")

# Compute capabilities (lowest, highest; None: no upper end) each GPU wheel has kernels for.
# - faiss-gpu-cu11/-cu12 (github.com/Di-Is/faiss-gpu-wheels): "Supports Volta to Ada Lovelace architecture
#   GPUs (Compute Capability 7.0-8.9)" by its own README (1.14.1.post1; its library holds sm_70 and sm_80
#   code and no PTX), so not Hopper (9.0) or later.
# - faiss-gpu >= 1.15.1 (Meta's wheel, the `gpu` extra): sm_70 to sm_90 code and compute_90 PTX, which
#   newer GPUs compile when the library loads.
# A build not listed here (conda, built from source) is trusted to match the machine it was built for.
FAISS_GPU_CAPABILITIES = {"faiss-gpu-cu11": ((7, 0), (8, 9)), "faiss-gpu-cu12": ((7, 0), (8, 9)),
                          "faiss-gpu": ((7, 0), None)}


def installed_faiss_build() -> Optional[str]:
    """The distribution that installed `faiss` (None for one pip does not know: conda, source).
    Both faiss-cpu and a GPU wheel installed leave a mix of the two in one module: refused."""
    from importlib.metadata import distributions

    builds = sorted({(d.metadata["Name"] or "").lower() for d in distributions()} & set(FAISS_BUILDS))
    if len(builds) > 1:
        raise RuntimeError(f"both {' and '.join(builds)} are installed and overwrite each other's `faiss` "
                           "module; uninstall all of them and install one (pip install '.[cpu]' or '.[gpu]')")
    return builds[0] if builds else None


def unsupported_gpus(build: Optional[str], num_gpus: int) -> list[str]:
    """The GPUs (of the first `num_gpus` CUDA devices) whose compute capability `build` has no kernels
    for, as readable names; all of them when torch cannot see CUDA to tell."""
    supported = FAISS_GPU_CAPABILITIES.get(build or "")
    if supported is None:
        return []
    if not torch.cuda.is_available():
        return [f"GPU {i} (capability unknown: torch sees no CUDA device)" for i in range(num_gpus)]
    low, high = supported
    found = []
    for i in range(min(num_gpus, torch.cuda.device_count())):
        capability = tuple(torch.cuda.get_device_capability(i))
        if capability < low or (high is not None and capability > high):
            found.append(f"GPU {i} {torch.cuda.get_device_name(i)} (compute capability "
                         f"{capability[0]}.{capability[1]})")
    return found


@functools.lru_cache(maxsize=None)
def faiss_gpus() -> int:
    """How many GPUs FAISS may use in this process: 0 with faiss-cpu, without a GPU, or when the build has
    no kernels for a GPU of this machine (then one warning, and every FAISS call runs on the CPU)."""
    import faiss

    build = installed_faiss_build()
    num_gpus = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    if num_gpus == 0:
        return 0
    unsupported = unsupported_gpus(build, num_gpus)
    if unsupported:
        low, high = FAISS_GPU_CAPABILITIES[build]
        supported = f"{low[0]}.{low[1]}-{high[0]}.{high[1]}" if high else f"{low[0]}.{low[1]} and newer"
        log.warning("FAISS runs on the CPU: %s has kernels for compute capability %s only, and %s is outside "
                    "that range. For FAISS on this GPU, replace %s with a FAISS build compiled for it (the "
                    "`gpu` extra's faiss-gpu covers 7.0 and newer; docs/cluster.md, GPU notes).",
                    build, supported, ", ".join(unsupported), build)
        return 0
    return num_gpus


def index_on_gpus(index, device: Optional[torch.device] = None):
    """`index` (a CPU index) for search on FAISS's GPUs where `faiss_gpus()` allows, else itself. With a
    CUDA `device`: on that GPU only; without one: sharded over all of them (each GPU holds a part, so
    an index too large for one GPU fits on several). A CPU `device` keeps the CPU index."""
    if faiss_gpus() == 0 or (device is not None and device.type != "cuda"):
        return index
    import faiss

    if device is not None:
        gpu = device.index if device.index is not None else torch.cuda.current_device()
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), gpu, index)
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    return faiss.index_cpu_to_all_gpus(index, co=options, ngpu=faiss_gpus())
