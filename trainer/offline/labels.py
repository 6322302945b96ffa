"""The teacher's pseudo-labels for proposals (docs/method.md §3): region embeddings, concept logits, the
argmax concept and its probability, and the compact teacher targets (trainer/offline/codecs.py).

Input to the teacher: the whole image resized to the canonical scale (short side `min_size`, long
side at most `max_size`, bicubic), CLIP-normalised, zero-padded to a multiple of 32 in a batch; the
boxes (original pixels) are scaled by the same factors. Region embedding = RoIAlign on res4 -> res5
-> attention pool (trainer/models/region_encoder.py); the whole-image embedding is the box (0, 0, w, h).
With `flip` the resized image is mirrored and boxes become (w - x2, y1, w - x1, y2), same order.

Batches are fixed chunks of a shard in shard order, so the outputs of a shard do not depend on which
worker computes them (padding reaches into the border features, so batch composition matters). The
actor streams a shard (`label_shard`: trainer/offline/streaming.py decodes and resizes ahead of the
teacher in threads; the sidecar is written a row group per batch); `label_images` computes the same
columns from decoded images held in memory. `precision` bf16 runs the backbone and attention pool
under autocast; boxes, RoIAlign, embeddings and logits stay fp32.

    teacher = Teacher(clip_model, concept_embeddings, min_size=800, max_size=1333, device="cuda",
                      precision="auto")
    out = teacher.embed(pil_images, boxes_per_image)         # region and image embeddings
    labels, probs = teacher.score(torch.cat(out.regions))    # argmax concept, its probability
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from trainer.data.images import as_unit_range, image_tensor
from trainer.models.constants import CLIP_MEAN, CLIP_STD
from trainer.engine.device import resolve_device
from trainer.models.geometry import padded, resized_size
from trainer.models.region_encoder import RegionEncoder
from trainer.offline.streaming import autocast, configure_precision, shard_batches


def resize_canonical(img: Image.Image, min_size: int, max_size: int) -> Image.Image:
    size = resized_size(img.width, img.height, min_size, max_size)
    return img if size == img.size else img.resize(size, Image.BICUBIC)


def boxes_to_size(boxes: np.ndarray, src: tuple[int, int], dst: tuple[int, int]) -> np.ndarray:
    """Boxes [N, 4] from a (width, height) image to another size."""
    sx, sy = dst[0] / src[0], dst[1] / src[1]
    return np.asarray(boxes, np.float32).reshape(-1, 4) * np.array([sx, sy, sx, sy], np.float32)


def mirror_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    return np.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], axis=1)


@dataclass
class TeacherOutput:
    regions: list[torch.Tensor]      # per image [N_i, D], L2-normalized, on the device
    images: torch.Tensor             # [B, D] whole-image embeddings, L2-normalized


class Teacher:
    """A frozen CLIP visual encoder as the pseudo-labelling teacher."""

    def __init__(self, clip_model: torch.nn.Module, concept_embeddings: np.ndarray, *, min_size: int = 800,
                 max_size: int = 1333, temperature: float = 0.01, faiss_threshold: int = 100_000,
                 faiss_k: int = 128, device: str | torch.device = "auto", precision: str = "fp32"):
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.autocast_dtype = configure_precision(self.device, precision)
        self.encoder = RegionEncoder.from_clip(clip_model).to(self.device).eval()
        self.min_size, self.max_size = min_size, max_size
        self.temperature = temperature
        concepts = np.ascontiguousarray(concept_embeddings, np.float32)
        self.concepts = torch.from_numpy(concepts).to(self.device)
        self.mean = torch.tensor(CLIP_MEAN, device=self.device).view(3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=self.device).view(3, 1, 1)
        self.faiss_k = faiss_k
        self._faiss = None
        if len(concepts) > faiss_threshold:
            import faiss

            from trainer.offline.faiss_gpu import index_on_gpus

            index = faiss.IndexFlatIP(concepts.shape[1])
            index.add(concepts)
            self._faiss = index_on_gpus(index, self.device)  # on the teacher's GPU where FAISS supports it

    @property
    def uses_faiss(self) -> bool:
        return self._faiss is not None

    # -- inputs --------------------------------------------------------------------------------------
    def resize(self, img: Image.Image) -> Image.Image:
        """The canonical scale (bicubic, on the CPU: decode threads run it ahead of the model)."""
        return resize_canonical(img, self.min_size, self.max_size)

    def prepare(self, pixels: Sequence[torch.Tensor], flip: bool = False):
        """Resized uint8 images [3, h, w] (any device; pinned ones copy asynchronously) -> a padded batch
        [B, 3, H, W] normalised on the device, and each image's resized (width, height)."""
        tensors, sizes = [], []
        for p in pixels:
            p = p.to(self.device, non_blocking=True)
            if flip:
                p = p.flip(-1)
            tensors.append((as_unit_range(p) - self.mean) / self.std)
            sizes.append((p.shape[2], p.shape[1]))
        h = max(t.shape[1] for t in tensors)
        w = max(t.shape[2] for t in tensors)
        h, w = padded(h), padded(w)
        batch = torch.zeros(len(tensors), 3, h, w, device=self.device)
        for i, t in enumerate(tensors):
            batch[i, :, : t.shape[1], : t.shape[2]] = t
        return batch, sizes

    # -- the model -----------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image], boxes: Sequence[np.ndarray], flip: bool = False) -> TeacherOutput:
        """Region embeddings for `boxes` (original pixels, per image) and whole-image embeddings."""
        pixels = [image_tensor(self.resize(img)) for img in images]
        return self.embed_pixels(pixels, [img.size for img in images], boxes, flip=flip)

    @torch.no_grad()
    def embed_pixels(self, pixels: Sequence[torch.Tensor], original_sizes: Sequence[tuple[int, int]],
                     boxes: Sequence[np.ndarray], flip: bool = False) -> TeacherOutput:
        """`embed` for images already resized by `resize`, as uint8 [3, h, w]; `original_sizes` are the
        (width, height) the boxes refer to. The backbone runs in the precision's autocast; the boxes
        (RoIAlign coordinates) and the embeddings that come out are fp32."""
        batch, sizes = self.prepare(pixels, flip=flip)
        rois = []
        for original, b, size in zip(original_sizes, boxes, sizes):
            scaled = boxes_to_size(b, original, size)
            if flip:
                scaled = mirror_boxes(scaled, size[0])
            rois.append(torch.from_numpy(scaled).to(self.device))
        whole = [torch.tensor([[0.0, 0.0, float(w), float(h)]], device=self.device) for w, h in sizes]
        counts = [len(r) for r in rois]
        with autocast(self.device, self.autocast_dtype):
            res4 = self.encoder.features(batch)
            # Regions and whole-image boxes through the head in one pass.
            pooled = self.encoder.pool_regions(res4, [torch.cat([r, wb]) for r, wb in zip(rois, whole)])
        pooled = F.normalize(pooled.float(), dim=-1)
        regions, images_emb, at = [], [], 0
        for n in counts:
            regions.append(pooled[at: at + n])
            images_emb.append(pooled[at + n])
            at += n + 1
        return TeacherOutput(regions, torch.stack(images_emb))

    @torch.no_grad()
    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings.float() @ self.concepts.t() / self.temperature

    @torch.no_grad()
    def score(self, embeddings: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Pseudo-label (argmax concept) and its probability softmax(cos/T) per row.

        A matrix product on the device; above `faiss_threshold` concepts FAISS finds the top
        `faiss_k` and the probability is normalised over those (the mass beyond them is negligible
        at T = 0.01)."""
        if len(embeddings) == 0:
            return np.zeros(0, np.int32), np.zeros(0, np.float32)
        if self._faiss is None:
            probs = torch.softmax(self.logits(embeddings), dim=-1)
            p, idx = probs.max(dim=-1)
            return idx.cpu().numpy().astype(np.int32), p.cpu().numpy().astype(np.float32)
        sims, ids = self._faiss.search(np.ascontiguousarray(embeddings.float().cpu().numpy()),
                                       min(self.faiss_k, self._faiss.ntotal))
        probs = torch.softmax(torch.from_numpy(sims) / self.temperature, dim=-1)
        return ids[:, 0].astype(np.int32), probs[:, 0].numpy().astype(np.float32)


# -- one shard ------------------------------------------------------------------------------------------

def chunks(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


LABEL_COLUMNS = ("num_regions", "pseudo_label", "pseudo_prob", "region_codes", "image_code", "image_pseudo_label")
FLIPPED_COLUMNS = ("flipped_region_codes", "flipped_image_code")


def label_batch(teacher: Teacher, codec, pixels: Sequence[torch.Tensor], original_sizes: Sequence[tuple[int, int]],
                boxes: Sequence[np.ndarray], store_flipped: bool = False) -> dict[str, list]:
    """The label columns (pipeline/sidecars.py labels_schema, without key) of one batch: images resized
    by `teacher.resize` as uint8 [3, h, w], their original (width, height), boxes in original pixels."""
    cols: dict[str, list] = {name: [] for name in LABEL_COLUMNS + (FLIPPED_COLUMNS if store_flipped else ())}
    bxs = [np.asarray(b, np.float32).reshape(-1, 4) for b in boxes]
    out = teacher.embed_pixels(pixels, original_sizes, bxs)
    counts = [len(b) for b in bxs]
    flat = torch.cat(out.regions) if sum(counts) else out.images.new_zeros((0, out.images.shape[1]))
    labels, probs = teacher.score(flat)
    image_labels, _ = teacher.score(out.images)
    # The codec encodes on the teacher's device (the topk codec's scores stay there); codes come back.
    codes = codec.encode(flat)
    image_codes = codec.encode(out.images)
    if store_flipped:
        fout = teacher.embed_pixels(pixels, original_sizes, bxs, flip=True)
        fflat = torch.cat(fout.regions) if sum(counts) else flat
        fcodes = codec.encode(fflat)
        fimage_codes = codec.encode(fout.images)
    at = 0
    for j, n in enumerate(counts):
        cols["num_regions"].append(n)
        cols["pseudo_label"].append(labels[at: at + n])
        cols["pseudo_prob"].append(probs[at: at + n])
        cols["region_codes"].append(codes[at: at + n].tobytes())
        cols["image_code"].append(image_codes[j].tobytes())
        cols["image_pseudo_label"].append(int(image_labels[j]))
        if store_flipped:
            cols["flipped_region_codes"].append(fcodes[at: at + n].tobytes())
            cols["flipped_image_code"].append(fimage_codes[j].tobytes())
        at += n
    return cols


def label_images(teacher: Teacher, codec, images: Sequence[Image.Image], boxes: Sequence[np.ndarray],
                 batch_size: int, store_flipped: bool = False) -> dict[str, list]:
    """The label columns for decoded images in order, in fixed batches (everything in memory: for
    tests and benchmarks; the stage streams its shards through `label_shard`)."""
    cols: dict[str, list] = {}
    for part in chunks(len(images), batch_size):
        imgs = [images[i] for i in part]
        batch = label_batch(teacher, codec, [image_tensor(teacher.resize(img)) for img in imgs],
                            [img.size for img in imgs], [boxes[i] for i in part], store_flipped)
        for name, values in batch.items():
            cols.setdefault(name, []).extend(values)
    return cols


# -- the Ray actor ----------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class LabelJob:
    """Everything a label worker needs, as plain data (it travels to Ray actors)."""
    run_root: str
    teacher_arch: str
    teacher_checkpoint: str
    teacher_allow_partial: bool
    teacher_trust_torchscript: bool = False   # teacher.trust_torchscript: may a TorchScript teacher load?
    concept_embeddings: str
    codec_json: str
    min_size: int
    max_size: int
    temperature: float
    faiss_threshold: int
    batch_size: int
    store_flipped: bool
    fingerprint: str
    precision: str = "fp32"
    decode_threads: int = 1    # the actor's CPUs (label.cpus_per_actor)
    prefetch_batches: int = 2  # decoded ahead of the model


def load_teacher(job: LabelJob, device: str | torch.device = "auto") -> Teacher:
    from trainer.models.clip import load_clip

    model, _ = load_clip(job.teacher_arch, job.teacher_checkpoint, allow_partial=job.teacher_allow_partial,
                         trust_torchscript=job.teacher_trust_torchscript)
    return Teacher(model, np.load(job.concept_embeddings), min_size=job.min_size, max_size=job.max_size,
                   temperature=job.temperature, faiss_threshold=job.faiss_threshold, device=device,
                   precision=job.precision)


def teacher_batches(job: LabelJob, teacher: Teacher, tar_path, proposals, read_to_end: bool = True):
    """The shard's images for `proposals` (in shard order) in fixed batches, decoded and resized ahead."""
    return shard_batches(tar_path, proposals, batch_size=job.batch_size, threads=job.decode_threads,
                         prefetch=job.prefetch_batches, key_of=lambda p: p.key, resize=teacher.resize,
                         pin=teacher.device.type == "cuda", read_to_end=read_to_end)


def label_shard(job: LabelJob, teacher: Teacher, codec, shard_id: int) -> dict:
    """Label one shard, streamed: proposals and tar read batch by batch, labels/NNNNN.parquet written a
    row group per batch (memory does not depend on the shard size), then the marker."""
    from pipeline.layout import RunLayout
    from pipeline.sidecars import iter_proposals, labels_writer
    from pipeline.stage import write_shard_stats

    started = time.time()
    layout = RunLayout(Path(job.run_root))
    images = regions = 0
    with labels_writer(layout.labels, shard_id, job.store_flipped) as write:
        for batch in teacher_batches(job, teacher, layout.shard_tar(shard_id), iter_proposals(layout.proposals, shard_id)):
            cols = label_batch(teacher, codec, batch.pixels, batch.sizes, [p.boxes for p in batch.items],
                               job.store_flipped)
            write({"key": [p.key for p in batch.items], **cols})
            images += len(batch.items)
            regions += int(sum(cols["num_regions"]))
    path = layout.labels.parquet(shard_id)
    seconds = round(time.time() - started, 3)
    write_shard_stats(layout.labels, shard_id, job.fingerprint,
                      {"images": images, "regions": regions}, [path], seconds=seconds)
    from pipeline.ray_runtime import current_node

    return {"shard": shard_id, "images": images, "regions": regions, "seconds": seconds,
            "node": current_node()}


class LabelShardWorker:
    """Ray Data actor: holds the teacher (on the device Ray assigned it) and codec; each call labels whole
    shards (one per row)."""

    def __init__(self, job: LabelJob):
        from pipeline.ray_runtime import assigned_device
        from trainer.offline.codecs import load_codec

        self.job = job
        self.teacher = load_teacher(job, assigned_device("label"))
        self.codec = load_codec(job.codec_json)

    def __call__(self, batch: dict) -> dict:
        rows = [label_shard(self.job, self.teacher, self.codec, int(s)) for s in batch["shard"]]
        return {k: np.array([r[k] for r in rows]) for k in ("shard", "images", "regions", "seconds", "node")}


# -- the PQ codebook's training sample -------------------------------------------------------------------

def plan_region_sample(shard_counts: dict[int, dict], max_regions: int, seed: int) -> dict[int, list[int]]:
    """Which images the PQ codebook's sample is drawn from: {shard: sorted positions in shard order}.

    Chosen up front, seeded, uniformly over the images of ALL shards, from the proposals' per-shard
    counts ({shard: {"images", "boxes"}}); as many images as hold max_regions regions at the run's mean
    regions per image (boxes + the whole image), plus a quarter for images with fewer. Only these are
    decoded, so the sample's cost does not depend on the shard size."""
    shards = sorted(s for s, c in shard_counts.items() if c.get("images", 0) > 0)
    images = np.array([shard_counts[s]["images"] for s in shards], np.int64)
    total = int(images.sum())
    if total == 0:
        return {}
    regions = sum(shard_counts[s].get("boxes", 0) for s in shards) + total
    wanted = min(total, int(np.ceil(1.25 * max_regions / (regions / total))))
    picks = np.sort(np.random.default_rng(seed).choice(total, wanted, replace=False))
    starts = np.concatenate([[0], np.cumsum(images)[:-1]])
    which = np.searchsorted(starts, picks, side="right") - 1
    plan: dict[int, list[int]] = {}
    for shard_index, position in zip(which, picks - starts[which]):
        plan.setdefault(shards[shard_index], []).append(int(position))
    return plan


def sample_region_embeddings(job: LabelJob, plan: dict[int, list[int]], max_regions: int, seed: int,
                             device: str | torch.device = "auto") -> np.ndarray:
    """Teacher region (and whole-image) embeddings of the planned images (`plan_region_sample`), in shard
    order, until max_regions are held; then a seeded sample of exactly max_regions rows when more came.
    The teacher runs on `device` (in a Ray task: the one Ray assigned it, pipeline.ray_runtime.on_assigned_device)."""
    from pipeline.layout import RunLayout
    from pipeline.sidecars import iter_proposals

    teacher = load_teacher(job, device)
    layout = RunLayout(Path(job.run_root))
    parts, held = [], 0
    for s in sorted(plan):
        positions = set(plan[s])
        # Stop reading the shard (its proposals and its tar) after its last chosen image.
        upto = itertools.islice(iter_proposals(layout.proposals, s), max(positions) + 1)
        chosen = (p for i, p in enumerate(upto) if i in positions)
        for batch in teacher_batches(job, teacher, layout.shard_tar(s), chosen, read_to_end=False):
            out = teacher.embed_pixels(batch.pixels, batch.sizes, [p.boxes for p in batch.items])
            parts.extend(r.cpu().numpy() for r in out.regions)
            parts.append(out.images.cpu().numpy())
            held += sum(len(r) for r in out.regions) + len(out.images)
            if held >= max_regions:
                break
        if held >= max_regions:
            break
    emb = np.concatenate(parts) if parts else np.zeros((0, teacher.concepts.shape[1]), np.float32)
    if len(emb) > max_regions:
        idx = np.sort(np.random.default_rng(seed).choice(len(emb), max_regions, replace=False))
        emb = emb[idx]
    return np.ascontiguousarray(emb, np.float32)
