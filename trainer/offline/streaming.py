"""How a proposal or label actor feeds its model: the shard streamed through a pool of decode threads
in fixed batches, uint8 pixels handed to the device through pinned memory, and the model's precision.

    dtype = configure_precision(device, "auto")            # bf16 on CUDA, None = fp32
    for batch in shard_batches(tar, items, batch_size=8, threads=8, pin=device.type == "cuda"):
        pixels = [p.to(device, non_blocking=True) for p in batch.pixels]
        with autocast(device, dtype):                       # bf16, and TF32 for what stays fp32 in it
            ...                                             # the model; boxes and logits stay fp32

Decoding (PIL releases the GIL while it decodes and resizes) runs in `threads` threads while the model
computes: up to `prefetch` batches beyond the one in use are decoded ahead, so memory holds a bounded
number of images whatever the shard size. Batches are fixed chunks of the items in their order, so the
outputs of a shard do not depend on thread timing or on which worker computes them.
"""
from __future__ import annotations

import contextlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from PIL import Image

from pipeline.images import load_rgb
from pipeline.sidecars import IMAGE_EXTENSIONS, shard_samples
from trainer.data.images import image_tensor

PRECISIONS = ("auto", "fp32", "bf16")


# -- precision --------------------------------------------------------------------------------------------

def resolved_precision(precision: str, uses_gpu: bool) -> str:
    """What a precision setting means where the model runs: `auto` is bf16 on a GPU and fp32 elsewhere.
    A GPU stage fingerprints this (from whether its plan gives its actors GPUs), so that outputs made
    in bf16 and in fp32 never share a fingerprint."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    if precision == "auto":
        return "bf16" if uses_gpu else "fp32"
    return precision


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of a precision setting on `device`: bf16, or None for fp32."""
    return torch.bfloat16 if resolved_precision(precision, device.type == "cuda") == "bf16" else None


def configure_precision(device: torch.device, precision: str = "fp32") -> Optional[torch.dtype]:
    """Set up an inference process (a proposals or label actor) and return the autocast dtype (None:
    fp32). Reproducible where it costs nothing: cuDNN chooses its convolution algorithms by fixed
    rules, not by timing them (benchmark off), and only deterministic ones. fp32 stays IEEE fp32 on
    CUDA (no TF32; `autocast` allows TF32 inside a bf16 region only). No process-wide
    `torch.use_deterministic_algorithms`: with it torchvision's RoIAlign leaves its CUDA kernel for a
    pure-Python version compiled by torch.compile (slow, and it needs a C compiler at run time)."""
    dtype = autocast_dtype(precision, device)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    if device.type == "cuda":
        _set_tf32(False)
    return dtype


def _set_tf32(allowed: bool) -> tuple[bool, bool]:
    """Allow TF32 in CUDA's fp32 matmuls and convolutions (or not); returns the previous settings."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    return previous


@contextlib.contextmanager
def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """Autocast to `dtype` on the device (CPU autocast works too); a no-op for fp32. In a bf16 region
    on CUDA the fp32 matmuls and convolutions left in it may use TF32 (its model runs in bf16 anyway);
    the flags are restored on leaving it, so what runs outside (the logits) stays IEEE fp32."""
    if dtype is None:
        yield
        return
    tf32 = dtype == torch.bfloat16 and device.type == "cuda"
    previous = _set_tf32(True) if tf32 else None
    try:
        with torch.autocast(device.type, dtype=dtype):
            yield
    finally:
        if previous is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


# -- the streamed shard -----------------------------------------------------------------------------------

@dataclass
class DecodedBatch:
    items: list[Any]                   # the items of this batch, in order
    pixels: list[torch.Tensor]         # uint8 [3, H, W] per image (after `resize`), pinned when asked
    sizes: list[tuple[int, int]]       # each image's (width, height) as stored in the tar (original pixels)


def _decode(blob: bytes, resize: Optional[Callable[[Image.Image], Image.Image]], pin: bool):
    image = load_rgb(blob)
    size = image.size
    if resize is not None:
        image = resize(image)
    pixels = image_tensor(image).contiguous()
    return (pixels.pin_memory() if pin else pixels), size


def _image_blobs(tar_path, items: Iterable[Any], key_of: Callable[[Any], str],
                 read_to_end: bool) -> Iterator[tuple[Any, bytes]]:
    """(item, image bytes) for each item in order, reading the tar alongside (both in shard order)."""
    samples = shard_samples(tar_path)
    for item in items:
        key = key_of(item)
        for sample_key, members in samples:
            if sample_key == key:
                blob = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
                if blob is None:
                    raise FileNotFoundError(f"{tar_path}: no image member for key {key}")
                yield item, blob
                break
        else:
            raise FileNotFoundError(f"{tar_path}: no image for key {key} (missing, or out of shard order)")
    if read_to_end:  # a tar cut off after the last wanted sample is still an error
        for _ in samples:
            pass


def shard_batches(tar_path, items: Iterable[Any], *, batch_size: int, threads: int = 1, prefetch: int = 2,
                  key_of: Callable[[Any], str] = lambda item: item["key"],
                  resize: Optional[Callable[[Image.Image], Image.Image]] = None,
                  pin: bool = False, read_to_end: bool = True) -> Iterator[DecodedBatch]:
    """Fixed batches of `items` (in shard order; `key_of(item)` is its sample key) with their images
    decoded (and resized) in `threads` threads, up to `prefetch` batches ahead of the consumer.
    `read_to_end`: read the tar past the last item too (a damaged tar end is an error, as for a stage);
    a sample stops at its last item instead."""
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="decode") as pool:
        ahead: deque[tuple[list, list]] = deque()
        chunk_items, chunk_futures = [], []
        for item, blob in _image_blobs(tar_path, items, key_of, read_to_end):
            chunk_items.append(item)
            chunk_futures.append(pool.submit(_decode, blob, resize, pin))
            if len(chunk_items) == batch_size:
                ahead.append((chunk_items, chunk_futures))
                chunk_items, chunk_futures = [], []
                if len(ahead) > prefetch:
                    yield _collect(*ahead.popleft())
        if chunk_items:
            ahead.append((chunk_items, chunk_futures))
        while ahead:
            yield _collect(*ahead.popleft())


def _collect(items: list, futures: list) -> DecodedBatch:
    decoded = [f.result() for f in futures]
    return DecodedBatch(items, [p for p, _ in decoded], [s for _, s in decoded])
