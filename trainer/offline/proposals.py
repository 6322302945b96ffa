"""Region proposals for pretraining (docs/method.md §2): a frozen class-agnostic RPN over every shard image.

The RPN (trainer/models/rpn.py, `load_rpn(path, device).propose(...)`) resizes each image to the canonical
scale itself and returns boxes in original-image pixels with objectness logits. Here they are made
safe to store: clipped to the image, degenerate boxes (zero width or height) dropped, ordered by
objectness (stable, highest first), at most post_nms_top_n. An image with no box keeps its row
(num_boxes 0).

An actor streams each shard (`Proposer.shard`): decode threads run ahead of the RPN
(trainer/offline/streaming.py), uint8 pixels go to the device through pinned memory and become floats
there, and the sidecar is written a row group per batch. `precision` bf16 runs the RPN's network
under autocast; its boxes and logits stay fp32.
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from pathlib import Path
import numpy as np
import torch

from pipeline.sidecars import Proposals
from trainer.data.images import as_unit_range
from trainer.offline.streaming import autocast, configure_precision, shard_batches

DEFAULT_RPN_LOADER = "trainer.models.rpn:load_rpn"


def clean_boxes(boxes, scores, width: int, height: int, top_n: int) -> tuple[np.ndarray, np.ndarray]:
    """Clip to the image, drop degenerate boxes, order by objectness, keep at most top_n."""
    b = np.asarray(boxes.detach().cpu() if torch.is_tensor(boxes) else boxes, np.float32).reshape(-1, 4)
    s = np.asarray(scores.detach().cpu() if torch.is_tensor(scores) else scores, np.float32).reshape(-1)
    b = b.copy()
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, width)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, height)
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]) & np.isfinite(b).all(1) & np.isfinite(s)
    b, s = b[keep], s[keep]
    order = np.argsort(-s, kind="stable")[:top_n]
    return np.ascontiguousarray(b[order]), np.ascontiguousarray(s[order])


def import_loader(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(kw_only=True)
class ProposalJob:
    """What a proposal worker needs, as plain data (it travels to Ray actors)."""
    run_root: str
    checkpoint: str
    min_size: int
    max_size: int
    pre_nms_top_n: int
    post_nms_top_n: int
    nms_thresh: float
    batch_size: int
    fingerprint: str
    rpn_loader: str = DEFAULT_RPN_LOADER
    device: str = "auto"
    precision: str = "fp32"
    decode_threads: int = 1    # the actor's CPUs (proposals.cpus_per_actor)
    prefetch_batches: int = 2  # decoded ahead of the model


class Proposer:
    def __init__(self, job: ProposalJob, device: torch.device | None = None):
        """The RPN on `device` (default: job.device, resolved by trainer.engine.device.resolve_device)."""
        from trainer.engine.device import resolve_device

        self.job = job
        self.device = device if device is not None else resolve_device(job.device)
        self.autocast_dtype = configure_precision(self.device, job.precision)
        self.rpn = import_loader(job.rpn_loader)(job.checkpoint, self.device)
        if hasattr(self.rpn, "eval"):
            self.rpn.eval()

    @torch.no_grad()
    def propose(self, pixels, sizes) -> list[tuple[np.ndarray, np.ndarray]]:
        """Cleaned (boxes, objectness) per uint8 image [3, H, W] (any device; pinned ones copy
        asynchronously), in original pixels; `sizes` are the images' (width, height). The RPN resizes
        on the device; under bf16 autocast it keeps its boxes and logits in fp32."""
        j = self.job
        images = [as_unit_range(p.to(self.device, non_blocking=True)) for p in pixels]
        with autocast(self.device, self.autocast_dtype):
            raw = self.rpn.propose(images, min_size=j.min_size, max_size=j.max_size, pre_nms_top_n=j.pre_nms_top_n,
                                   post_nms_top_n=j.post_nms_top_n, nms_thresh=j.nms_thresh)
        return [clean_boxes(b, s, w, h, j.post_nms_top_n) for (b, s), (w, h) in zip(raw, sizes)]

    def shard(self, shard_id: int) -> dict:
        """Propose boxes for every written image of a shard, streamed: the tar read and decoded batch by
        batch, the Parquet written a row group per batch (memory does not depend on the shard size),
        then the marker."""
        from pipeline.layout import RunLayout
        from pipeline.sidecars import proposals_writer, written_keys
        from pipeline.stage import write_shard_stats

        started = time.time()
        j = self.job
        layout = RunLayout(Path(j.run_root))
        images = boxes = empty = 0
        batches = shard_batches(layout.shard_tar(shard_id), written_keys(layout.shards, shard_id),
                                batch_size=j.batch_size, threads=j.decode_threads, prefetch=j.prefetch_batches,
                                pin=self.device.type == "cuda")
        with proposals_writer(layout.proposals, shard_id) as write:
            for batch in batches:
                rows = [Proposals(item["key"], w, h, b, s) for item, (w, h), (b, s)
                        in zip(batch.items, batch.sizes, self.propose(batch.pixels, batch.sizes))]
                write(rows)
                images += len(rows)
                boxes += int(sum(len(r.boxes) for r in rows))
                empty += int(sum(len(r.boxes) == 0 for r in rows))
        path = layout.proposals.parquet(shard_id)
        seconds = round(time.time() - started, 3)
        write_shard_stats(layout.proposals, shard_id, j.fingerprint,
                          {"images": images, "boxes": boxes, "empty": empty}, [path], seconds=seconds)
        from pipeline.ray_runtime import current_node

        return {"shard": shard_id, "images": images, "boxes": boxes, "seconds": seconds,
                "node": current_node()}


class ProposalShardWorker:
    """Ray Data actor: holds the RPN, on the device Ray assigned it; each call proposes boxes for whole
    shards (one per row)."""

    def __init__(self, job: ProposalJob):
        from pipeline.ray_runtime import assigned_device

        self.proposer = Proposer(job, assigned_device("proposals"))

    def __call__(self, batch: dict) -> dict:
        rows = [self.proposer.shard(int(s)) for s in batch["shard"]]
        return {k: np.array([r[k] for r in rows]) for k in ("shard", "images", "boxes", "seconds", "node")}
