"""The streaming pretraining data: shard tars joined by key with their Parquet sidecars.

    tars (webdataset) ─┬─ proposals/NNNNN.parquet         boxes (original pixels), num_boxes
                       ├─ labels/NNNNN.parquet            pseudo labels/probs, teacher codes
                       └─ concepts/caption_embeddings/    caption embedding (fp16), one per caption

Determinism and exact resume
----------------------------
Every rank runs `num_workers` (at least one, logical) *slots*; slot = rank * workers + worker. For an
epoch e the shard order is a permutation drawn from (seed, e) and slot k takes shards k, k+S, ... of
it (S = ranks x workers; fewer shards than slots is an error unless `resample_shards`, which draws
each slot's shards with replacement from (seed, e, slot)). Inside a shard the samples are visited in
a permutation drawn from (seed, e, shard, its place in the slot's list); box sampling and flipping
of a sample come from (seed, e, shard, sample index), and so does its caption when its image has
several (COCO captions: one sample per image, one of its captions drawn per (seed, epoch), as the
reference draws one each time it reads the image). Each slot streams forever (epoch after epoch), so
ranks never run dry at different times (no DDP hang) and nothing is silently dropped. A batch never
holds an image twice (a duplicate is a false negative of the image-caption loss): a sample whose key
is already in the batch being filled (which happens only across an epoch boundary, or with
`resample_shards`) is skipped and counted as `repeated_in_batch`.

A slot's position is (epoch, shard place, offset in the shard's permutation); every batch carries
the position of the slot that made it, and `DataPosition` keeps the last consumed one per slot plus
the number of batches the rank consumed. PyTorch's loader takes batches from its workers round robin,
so after n batches the next one comes from slot n % workers: a resumed loader rotates its workers by
that much and each slot skips to its stored position without decoding anything, so the batches
after a resume are exactly the batches an uninterrupted run would have seen.

A shard is read as it goes: its tar is indexed (member offsets from the headers, pipeline.sidecars'
ShardIndex) and each sample's members are read when the permutation reaches it; its sidecars are read
by key too (pipeline.sidecars' ShardSidecarReader: the row numbers of each key, and one Parquet row
group per file when a sample needs it). A reader holds one sample's bytes, the indexes (a key and a few
offsets per sample) and a row group per sidecar, never the tar nor the shard's teacher targets (about
100 kB per CC3M image). Skipping to a stored offset reads nothing.

A sample whose image does not decode, whose sidecar row is missing (or whose proposals and labels
disagree) is counted by reason and skipped, never fatal; a tar that ends early keeps its good
samples and counts `truncated_tar`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.images import ImageError, load_rgb
from pipeline.layout import RunLayout, StageDir, shard_name
from pipeline.sidecars import DamagedTarError, Proposals, RegionLabels, ShardIndex, ShardSidecarReader
from trainer.data.images import image_tensor
from trainer.models.geometry import padded, resized_size

log = logging.getLogger(__name__)



class DataError(RuntimeError):
    """The data cannot feed the trainer as configured; the message says why and what to change."""


@dataclass(frozen=True)
class ShardSource:
    shard_id: int
    tar: Path
    caption_embeddings: StageDir
    proposals: Optional[StageDir] = None   # None in online-teacher mode
    labels: Optional[StageDir] = None


def shard_sources(layout: RunLayout, shard_ids: Sequence[int], online: bool = False) -> list[ShardSource]:
    """The files of each shard, from the run layout (sidecar files need not exist: missing rows are
    counted at read time)."""
    return [ShardSource(s, layout.shard_tar(s), layout.caption_embeddings, None if online else layout.proposals,
                        None if online else layout.labels) for s in shard_ids]


@dataclass
class DataOptions:
    batch_size: int                      # images per batch this rank's loader yields
    seed: int = 0
    min_size: int = 800
    max_size: int = 1333
    regions_per_image: int = 100
    flip: bool = True
    online: bool = False                 # no proposals/labels: the step runs the RPN and the teacher
    resample_shards: bool = False


# -- reading one shard -------------------------------------------------------------------------------

def open_sidecars(src: ShardSource) -> ShardSidecarReader:
    """One shard's sidecars, read by key a row group at a time (a row that is missing or damaged reads
    as absent)."""
    s = src.shard_id
    return ShardSidecarReader(src.caption_embeddings.parquet(s),
                              src.proposals.parquet(s) if src.proposals is not None else None,
                              src.labels.parquet(s) if src.labels is not None else None)


# -- one sample ----------------------------------------------------------------------------------------

def read_members(tar: ShardIndex, index: int) -> dict[str, bytes]:
    """The members of sample `index` of an indexed tar (SkipSample if the tar changed since)."""
    try:
        return tar.sample(index)
    except (DamagedTarError, OSError):
        raise SkipSample("unreadable_sample") from None




def sample_rng(seed: int, epoch: int, shard_id: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, shard_id, index, 0x5EED])


class SkipSample(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def prepare_sample(key: str, members: dict, side: ShardSidecarReader, opts: DataOptions,
                   rng: np.random.Generator) -> dict:
    """Decode, resize, flip and sample the regions of one sample (raises SkipSample)."""
    captions = side.captions(key)
    if not captions:
        raise SkipSample("missing_caption_embedding")
    if not opts.online:
        proposals, labels = side.proposals(key), side.labels(key)
        if proposals is None:
            raise SkipSample("missing_proposals")
        if labels is None:
            raise SkipSample("missing_labels")
    data = members.get("jpg") or members.get("jpeg") or members.get("png")
    if not data:
        raise SkipSample("missing_image")
    try:
        img = load_rgb(data)
    except ImageError:
        raise SkipSample("corrupt_image") from None
    flip = bool(rng.random() < 0.5) and opts.flip  # always drawn: the box sample does not depend on flip
    w, h = resized_size(img.width, img.height, opts.min_size, opts.max_size)
    if (w, h) != img.size:
        img = img.resize((w, h), Image.BICUBIC)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    out = {"key": key, "image": image_tensor(img), "size": (h, w), "flip": flip}
    if not opts.online:
        out.update(_sample_regions(proposals, labels, opts, rng, w, h, flip))
    # Drawn after the boxes: a sample with one caption draws nothing, so its boxes are those it always had.
    out["caption"] = captions[int(rng.integers(len(captions)))] if len(captions) > 1 else captions[0]
    return out


def _sample_regions(proposals: Proposals, labels: RegionLabels, opts: DataOptions, rng: np.random.Generator,
                    w: int, h: int, flip: bool) -> dict:
    """regions_per_image of the stored boxes (resized, mirrored when flipped) with their teacher targets."""
    pw, ph, boxes = proposals.width, proposals.height, proposals.boxes
    y, p, codes, fcodes = labels.pseudo_label, labels.pseudo_prob, labels.region_codes, labels.flipped_region_codes
    n = len(boxes)
    if n == 0 or len(y) != n or len(p) != n or len(codes) % n:
        raise SkipSample("misaligned_sidecars")
    code_size = len(codes) // n
    pick = rng.choice(n, size=min(opts.regions_per_image, n), replace=False)
    b = boxes[pick] * np.array([w / pw, h / ph, w / pw, h / ph], np.float32)
    if flip:
        b = np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], axis=1)
        if fcodes is not None and len(fcodes) == len(codes):
            codes = fcodes  # the teacher's outputs on the flipped image (label.store_flipped)
        # else: the documented approximation, the unflipped teacher outputs for mirrored boxes
    return dict(boxes=b.astype(np.float32), labels=y[pick], probs=p[pick],
                codes=np.frombuffer(codes, np.uint8).reshape(n, code_size)[pick])


def collate(samples: list[dict], regions: int, online: bool) -> dict:
    """Pad images to a common size (a multiple of 32) and regions to `regions` per image: an image's k
    regions are the first k of its row (`valid` marks them), the trainer slices them on the device."""
    b = len(samples)
    hmax = max(s["size"][0] for s in samples)
    wmax = max(s["size"][1] for s in samples)
    hp, wp = padded(hmax), padded(wmax)
    images = torch.zeros((b, 3, hp, wp), dtype=torch.uint8)
    for i, s in enumerate(samples):
        h, w = s["size"]
        images[i, :, :h, :w] = s["image"]
    batch = {"keys": [s["key"] for s in samples], "images": images,
             "image_sizes": torch.tensor([s["size"] for s in samples], dtype=torch.int64),
             "flipped": torch.tensor([s["flip"] for s in samples]),
             "captions": torch.from_numpy(np.stack([s["caption"] for s in samples]).astype(np.float32))}
    if online:
        return batch
    code_size = samples[0]["codes"].shape[1]
    boxes = torch.zeros((b, regions, 4))
    valid = torch.zeros((b, regions), dtype=torch.bool)
    labels = torch.zeros((b, regions), dtype=torch.int64)
    probs = torch.zeros((b, regions))
    codes = torch.zeros((b, regions, code_size), dtype=torch.uint8)
    for i, s in enumerate(samples):
        k = len(s["boxes"])
        if s["codes"].shape[1] != code_size:
            raise DataError(f"sample {s['key']}: code size {s['codes'].shape[1]} differs from "
                            f"{code_size} in the same batch; the labels were made by different codecs")
        boxes[i, :k] = torch.from_numpy(s["boxes"])
        valid[i, :k] = True
        labels[i, :k] = torch.from_numpy(np.asarray(s["labels"], np.int64))
        probs[i, :k] = torch.from_numpy(np.asarray(s["probs"], np.float32))
        codes[i, :k] = torch.from_numpy(np.ascontiguousarray(s["codes"]))
    batch.update(boxes=boxes, valid=valid, pseudo_labels=labels, pseudo_probs=probs, codes=codes)
    return batch


# -- the stream -----------------------------------------------------------------------------------------

def _start_of(position: Optional[dict], worker: int) -> tuple[int, int, int]:
    if not position:
        return (0, 0, 0)
    return tuple(position.get("workers", {}).get(str(worker), (0, 0, 0)))


class PretrainStream(IterableDataset):
    """Infinite stream of collated batches for one rank (see the module doc for the order).

    Each batch dict also holds `_worker` (logical slot of this rank), `_position` (that slot's
    position after the batch) and `_skipped` (that slot's skip counts so far).
    """

    def __init__(self, sources: Sequence[ShardSource], opts: DataOptions, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, position: Optional[dict] = None):
        self.sources = list(sources)
        self.opts = opts
        self.rank, self.world_size = rank, world_size
        self.workers = max(1, num_workers)
        self.position = position or {}
        self.slots = world_size * self.workers
        if not self.sources:
            raise DataError("no shards to train on")
        if len(self.sources) < self.slots and not opts.resample_shards:
            raise DataError(f"{len(self.sources)} shards for {world_size} rank(s) x {self.workers} "
                            f"loader worker(s) = {self.slots} readers: every reader needs at least one "
                            "shard. Use fewer workers (pretrain.num_workers), more shards "
                            "(shard.samples_per_shard), or pretrain.resample_shards: true")
        # Batches this rank consumed; the loader's round robin resumes at worker consumed % workers.
        self.rotation = int(self.position.get("consumed_batches", 0)) % self.workers

    # The shard list of a slot in an epoch.
    def slot_shards(self, epoch: int, slot: int) -> list[int]:
        n = len(self.sources)
        if self.opts.resample_shards:
            per_slot = max(1, math.ceil(n / self.slots))
            return [int(i) for i in np.random.default_rng([self.opts.seed, epoch, slot, 0xA11]).integers(
                0, n, size=per_slot)]
        order = np.random.default_rng([self.opts.seed, epoch, 0x5A4D]).permutation(n)
        return [int(i) for i in order[slot::self.slots]]

    def _slot_stream(self, logical: int) -> Iterator[dict]:
        slot = self.rank * self.workers + logical
        epoch, place, offset = _start_of(self.position, logical)
        skipped = dict(self.position.get("skipped", {}).get(str(logical), {}))
        pending: list[dict] = []
        cached: Optional[tuple] = None  # (epoch, place) -> shard contents, kept while in use
        while True:
            shards = self.slot_shards(epoch, slot)
            from_start = place == 0 and offset == 0  # a resume may start at the very end of an epoch
            produced_this_epoch = False
            while place < len(shards):
                src = self.sources[shards[place]]
                if cached is None or cached[0] != (epoch, place):
                    tar = ShardIndex(src.tar)
                    if tar.damaged:  # a truncated or damaged tar keeps its complete samples
                        log.warning("%s; keeping %d samples", tar.damaged, len(tar))
                        skipped["truncated_tar"] = skipped.get("truncated_tar", 0) + 1
                    side = open_sidecars(src)
                    order = np.random.default_rng([self.opts.seed, epoch, src.shard_id, place]).permutation(
                        len(tar))
                    cached = ((epoch, place), tar, side, order)
                _, tar, side, order = cached
                while offset < len(order):
                    index = int(order[offset])
                    offset += 1
                    if any(sample["key"] == tar.keys[index] for sample in pending):
                        skipped["repeated_in_batch"] = skipped.get("repeated_in_batch", 0) + 1
                        continue
                    try:
                        pending.append(prepare_sample(tar.keys[index], read_members(tar, index), side, self.opts,
                                                      sample_rng(self.opts.seed, epoch, src.shard_id, index)))
                    except SkipSample as skip:
                        skipped[skip.reason] = skipped.get(skip.reason, 0) + 1
                        continue
                    produced_this_epoch = True
                    if len(pending) == self.opts.batch_size:
                        batch = collate(pending, self.opts.regions_per_image, self.opts.online)
                        batch.update(_worker=logical, _position=(epoch, place, offset),
                                     _skipped=dict(skipped))
                        pending = []
                        yield batch
                place, offset, cached = place + 1, 0, None
            if from_start and not produced_this_epoch:
                names = ", ".join(shard_name(self.sources[i].shard_id) for i in shards)
                if pending:   # every usable sample of the epoch is already in the unfinished batch
                    raise DataError(f"rank {self.rank} reader {logical}: shards [{names}] hold fewer distinct "
                                    f"usable samples in epoch {epoch} than a batch ({self.opts.batch_size}), "
                                    "and a batch never holds an image twice; use a smaller "
                                    "pretrain.batch_size or fewer readers")
                raise DataError(f"rank {self.rank} reader {logical}: no usable sample in shards [{names}] "
                                f"in epoch {epoch} (skipped: {skipped}); are the proposals, labels and "
                                "caption-embedding sidecars there?")
            epoch, place, offset = epoch + 1, 0, 0

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers:
            raise DataError(f"stream made for {self.workers} workers runs under {info.num_workers}")
        return self._slot_stream((physical + self.rotation) % self.workers)


@dataclass
class DataPosition:
    """Where this rank's data stream stands; plain data, saved in the trainer state."""
    consumed_batches: int = 0
    workers: dict = field(default_factory=dict)   # logical slot -> (epoch, place, offset)
    skipped: dict = field(default_factory=dict)   # logical slot -> {reason: count}

    def update(self, batch: dict) -> None:
        self.consumed_batches += 1
        w = str(batch["_worker"])
        self.workers[w] = tuple(int(v) for v in batch["_position"])
        self.skipped[w] = dict(batch["_skipped"])

    def skipped_total(self) -> dict:
        total: dict = {}
        for counts in self.skipped.values():
            for k, v in counts.items():
                total[k] = total.get(k, 0) + v
        return total

    def epoch(self) -> int:
        return min((v[0] for v in self.workers.values()), default=0)

    def state_dict(self) -> dict:
        return {"consumed_batches": self.consumed_batches,
                "workers": {k: list(v) for k, v in self.workers.items()},
                "skipped": {k: dict(v) for k, v in self.skipped.items()}}

    @classmethod
    def from_state(cls, state: Optional[dict]) -> "DataPosition":
        if not state:
            return cls()
        return cls(int(state.get("consumed_batches", 0)),
                   {str(k): tuple(v) for k, v in state.get("workers", {}).items()},
                   {str(k): dict(v) for k, v in state.get("skipped", {}).items()})


def make_loader(sources: Sequence[ShardSource], opts: DataOptions, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, position: Optional[DataPosition] = None,
                pin_memory: bool = False) -> Iterator[dict]:
    """An endless iterator of this rank's batches, starting at `position`; `pin_memory`: each batch's
    tensors in pinned memory (for asynchronous copies to the GPU), with worker processes or without."""
    stream = PretrainStream(sources, opts, rank, world_size, num_workers,
                            position.state_dict() if position else None)
    if num_workers == 0:
        return iter(DataLoader(stream, batch_size=None, pin_memory=True)) if pin_memory else iter(stream)
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                        prefetch_factor=4, persistent_workers=False, multiprocessing_context="fork"
                        if torch.multiprocessing.get_start_method(allow_none=True) in (None, "fork") else None)
    return iter(loader)
