"""The teacher's pseudo-labels for proposals (REFERENCE §3): region embeddings, concept logits, the
argmax concept and its probability, and the compact teacher targets (trainer/offline/codecs.py).

Input to the teacher: the whole image resized to the canonical scale (short side `min_size`, long
side at most `max_size`, bicubic), CLIP-normalised, zero-padded to a multiple of 32 in a batch; the
boxes (original pixels) are scaled by the same factors. Region embedding = RoIAlign on res4 -> res5
-> attention pool (trainer/models/region_encoder.py); the whole-image embedding is the box (0, 0, w, h).
With `flip` the resized image is mirrored and boxes become (w - x2, y1, w - x1, y2), same order.

Batches are fixed chunks of a shard in shard order, so the outputs of a shard do not depend on which
worker computes them (padding reaches into the border features, so batch composition matters).

    teacher = Teacher(clip_model, concept_embeddings, min_size=800, max_size=1333, device="cuda")
    out = teacher.embed(pil_images, boxes_per_image)         # region and image embeddings
    labels, probs = teacher.score(out.regions)               # argmax concept, its probability
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from trainer.data.images import as_unit_range, image_tensor
from trainer.models.clip import CLIP_MEAN, CLIP_STD
from trainer.engine.device import resolve_device
from trainer.models.geometry import padded, resized_size
from trainer.models.region_encoder import RegionEncoder




def make_deterministic(device: torch.device) -> None:
    """Same outputs whatever the worker: fixed cuDNN algorithms, deterministic kernels where cheap."""
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)




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
                 faiss_k: int = 128, device: str | torch.device = "auto"):
        self.device = resolve_device(device) if isinstance(device, str) else device
        make_deterministic(self.device)
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

            self._faiss = faiss.IndexFlatIP(concepts.shape[1])
            self._faiss.add(concepts)

    @property
    def uses_faiss(self) -> bool:
        return self._faiss is not None

    # -- inputs --------------------------------------------------------------------------------------
    def prepare(self, images: Sequence[Image.Image], flip: bool = False):
        """A padded, normalised batch [B, 3, H, W] and each image's resized (width, height)."""
        tensors, sizes = [], []
        for img in images:
            img = resize_canonical(img, self.min_size, self.max_size)
            if flip:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            t = (as_unit_range(image_tensor(img).to(self.device)) - self.mean) / self.std
            tensors.append(t)
            sizes.append((img.width, img.height))
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
        batch, sizes = self.prepare(images, flip=flip)
        rois = []
        for img, b, size in zip(images, boxes, sizes):
            scaled = boxes_to_size(b, img.size, size)
            if flip:
                scaled = mirror_boxes(scaled, size[0])
            rois.append(torch.from_numpy(scaled).to(self.device))
        whole = [torch.tensor([[0.0, 0.0, float(w), float(h)]], device=self.device) for w, h in sizes]
        res4 = self.encoder.features(batch)
        counts = [len(r) for r in rois]
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


def label_images(teacher: Teacher, codec, images: Sequence[Image.Image], boxes: Sequence[np.ndarray],
                 batch_size: int, store_flipped: bool = False) -> dict[str, list]:
    """The label columns (pipeline/sidecars.py LABELS_SCHEMA, without key) for images in order."""
    cols: dict[str, list] = {"num_regions": [], "pseudo_label": [], "pseudo_prob": [], "region_codes": [],
                             "image_code": [], "image_pseudo_label": []}
    if store_flipped:
        cols.update(flipped_region_codes=[], flipped_image_code=[])
    for part in chunks(len(images), batch_size):
        imgs = [images[i] for i in part]
        bxs = [np.asarray(boxes[i], np.float32).reshape(-1, 4) for i in part]
        out = teacher.embed(imgs, bxs)
        counts = [len(b) for b in bxs]
        flat = torch.cat(out.regions) if sum(counts) else out.images.new_zeros((0, out.images.shape[1]))
        labels, probs = teacher.score(flat)
        image_labels, _ = teacher.score(out.images)
        codes = codec.encode(flat.cpu().numpy())
        image_codes = codec.encode(out.images.cpu().numpy())
        if store_flipped:
            fout = teacher.embed(imgs, bxs, flip=True)
            fflat = torch.cat(fout.regions) if sum(counts) else flat
            fcodes = codec.encode(fflat.cpu().numpy())
            fimage_codes = codec.encode(fout.images.cpu().numpy())
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


# -- the Ray actor ----------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class LabelJob:
    """Everything a label worker needs, as plain data (it travels to Ray actors)."""
    run_root: str
    teacher_arch: str
    teacher_checkpoint: str
    teacher_allow_partial: bool
    concept_embeddings: str
    codec_json: str
    min_size: int
    max_size: int
    temperature: float
    faiss_threshold: int
    batch_size: int
    store_flipped: bool
    fingerprint: str


def load_teacher(job: LabelJob, device: str | torch.device = "auto") -> Teacher:
    from trainer.models.clip import load_clip

    model, _ = load_clip(job.teacher_arch, job.teacher_checkpoint, allow_partial=job.teacher_allow_partial)
    return Teacher(model, np.load(job.concept_embeddings), min_size=job.min_size, max_size=job.max_size,
                   temperature=job.temperature, faiss_threshold=job.faiss_threshold, device=device)


def label_shard(job: LabelJob, teacher: Teacher, codec, shard_id: int) -> dict:
    """Label one shard: read its proposals and images, write labels/NNNNN.parquet, then the marker."""
    from pipeline.images import load_rgb
    from pipeline.layout import RunLayout
    from pipeline.sidecars import read_proposals, read_shard_images, write_labels
    from pipeline.stage import write_shard_stats

    started = time.time()
    layout = RunLayout(Path(job.run_root))
    props = read_proposals(layout.proposals, shard_id)
    keys = list(props)
    blobs = read_shard_images(layout.shard_tar(shard_id), keys)
    images = [load_rgb(blobs[k]) for k in keys]
    cols = label_images(teacher, codec, images, [props[k].boxes for k in keys], job.batch_size,
                        job.store_flipped)
    path = write_labels(layout.labels, shard_id, {"key": keys, **cols}, job.store_flipped)
    regions = int(sum(cols["num_regions"]))
    seconds = round(time.time() - started, 3)
    write_shard_stats(layout.labels, shard_id, job.fingerprint,
                      {"images": len(keys), "regions": regions}, [path], seconds=seconds)
    from pipeline.ray_runtime import current_node

    return {"shard": shard_id, "images": len(keys), "regions": regions, "seconds": seconds,
            "node": current_node()}


class LabelShardWorker:
    """Ray Data actor: holds the teacher and codec; each call labels whole shards (one per row)."""

    def __init__(self, job: LabelJob):
        from trainer.offline.codecs import load_codec

        self.job = job
        self.teacher = load_teacher(job)
        self.codec = load_codec(job.codec_json)

    def __call__(self, batch: dict) -> dict:
        rows = [label_shard(self.job, self.teacher, self.codec, int(s)) for s in batch["shard"]]
        return {k: np.array([r[k] for r in rows]) for k in ("shard", "images", "regions", "seconds", "node")}


def sample_region_embeddings(job: LabelJob, shard_ids: list[int], max_regions: int, seed: int) -> np.ndarray:
    """Teacher region embeddings of the first shards, a seeded sample of at most max_regions rows
    (the PQ codebook's training set). Runs wherever it is called (a Ray task with a GPU or not)."""
    from pipeline.images import load_rgb
    from pipeline.layout import RunLayout
    from pipeline.sidecars import read_proposals, read_shard_images

    teacher = load_teacher(job)
    layout = RunLayout(Path(job.run_root))
    parts = []
    for s in shard_ids:
        props = read_proposals(layout.proposals, s)
        keys = list(props)
        blobs = read_shard_images(layout.shard_tar(s), keys)
        for part in chunks(len(keys), job.batch_size):
            out = teacher.embed([load_rgb(blobs[keys[i]]) for i in part], [props[keys[i]].boxes for i in part])
            parts.extend(r.cpu().numpy() for r in out.regions)
            parts.append(out.images.cpu().numpy())
    emb = np.concatenate(parts) if parts else np.zeros((0, teacher.concepts.shape[1]), np.float32)
    if len(emb) > max_regions:
        idx = np.sort(np.random.default_rng(seed).choice(len(emb), max_regions, replace=False))
        emb = emb[idx]
    return np.ascontiguousarray(emb, np.float32)
