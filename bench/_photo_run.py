"""A run folder of photo-sized images, ready for the `proposals` and `label` stages (bench/precompute.py,
bench/memory.py): the real `shard` stage over a folder of generated photos with captions, random-weight
models of the asked sizes saved as checkpoint files, and random concept embeddings standing in for the
embed stage.

The photos are a smooth random field plus sensor-like noise, saved as JPEG at quality 90: they decode
and compress like camera photos (about 0.3 bytes per pixel), unlike flat synthetic scenes, which
decode several times faster than real images of the same size.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def with_the_actors_allocator() -> None:
    """Re-run this script under the malloc settings the stages give their CPU actors
    (pipeline.ray_runtime.CPU_MODEL_ALLOCATOR_ENV), unless it already runs under them: a plain loop in
    this process must differ from the stage by its data path only. glibc reads them at process start."""
    from pipeline.ray_runtime import CPU_MODEL_ALLOCATOR_ENV

    missing = {k: v for k, v in CPU_MODEL_ALLOCATOR_ENV.items() if os.environ.get(k) != v}
    if missing:
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **missing})


@dataclass(frozen=True)
class Models:
    """Which models the stages run and at what scale."""
    teacher_arch: str          # an open_clip name or one of trainer/models/model_configs
    rpn_backbone: str          # trainer/models/rpn.py build_rpn backbone
    concepts: int              # concept pool size (CC3M's is 6790)
    min_size: int              # canonical scale of both stages
    max_size: int
    boxes: int                 # proposals kept per image (post-NMS)
    batch_size: int


PAPER = Models("RN50", "resnet50_fpn", 6790, 800, 1333, 300, 2)
TINY = Models("RN50-tiny", "clip_res4", 64, 800, 1333, 300, 2)


def write_photos(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> None:
    """`count` JPEG photos of `size` (width, height) with a one-line caption each (.txt beside it)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(count):
        coarse = rng.integers(0, 256, (h // 40 + 2, w // 40 + 2, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.int16)
        noisy = np.clip(smooth + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{i:06d}.jpg", format="JPEG", quality=90)
        (folder / f"{i:06d}.txt").write_text(f"a photo of a dog and a cat number {i}\n")


def prepare(root: Path, *, images: int, per_shard: int, size: tuple[int, int], models: Models,
            num_actors: int = 1, cpus_per_actor: int = 2, extra: str = "", photos: Path | None = None):
    """Shards of `per_shard` photos under root/run, the models' weights under root/weights, and the
    manifest root/manifest.yaml (returned, loaded). `photos`: an existing photo folder to reuse."""
    import torch

    from pipeline.config import load_manifest
    from pipeline.layout import RunLayout
    from stages import shard
    from tests.labelkit import make_concepts
    from trainer.models.clip import create_clip, embedding_dim, our_model_configs, save_clip_checkpoint
    from trainer.models.rpn import RpnConfig, build_rpn, save_rpn_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    if photos is None:
        photos = root / "photos"
        write_photos(photos, images, size)
    weights = root / "weights"
    weights.mkdir(exist_ok=True)
    our_model_configs()
    torch.manual_seed(0)
    teacher, _ = create_clip(models.teacher_arch)
    save_clip_checkpoint(teacher, weights / "teacher.pt", arch=models.teacher_arch)
    dim = embedding_dim(teacher)
    rpn_args = {"clip_arch": models.teacher_arch, "anchor_sizes": (32, 64, 128, 256)} \
        if models.rpn_backbone == "clip_res4" else {}
    save_rpn_checkpoint(build_rpn(RpnConfig(models.rpn_backbone, min_size=models.min_size,
                                            max_size=models.max_size, **rpn_args)), weights / "rpn.pt")
    (root / "manifest.yaml").write_text(f"""
name: bench
output_dir: run
corpus: {{format: folder, path: {photos}}}
ray: {{num_cpus: {os.cpu_count()}}}
shard: {{samples_per_shard: {per_shard}, max_side: {max(size)}}}
teacher: {{arch: {models.teacher_arch}, checkpoint: weights/teacher.pt}}
proposals: {{checkpoint: weights/rpn.pt, min_size: {models.min_size}, max_size: {models.max_size},
             pre_nms_top_n: 1000, post_nms_top_n: {models.boxes}, nms_thresh: 0.7,
             batch_size: {models.batch_size}, num_actors: {num_actors}, cpus_per_actor: {cpus_per_actor},
             precision: fp32}}
label: {{codec: fp16, batch_size: {models.batch_size}, num_actors: {num_actors},
         cpus_per_actor: {cpus_per_actor}, precision: fp32}}
{extra}
""")
    manifest = load_manifest(root / "manifest.yaml")
    shard.run(manifest)
    make_concepts(RunLayout.of(manifest), num=models.concepts, dim=dim)
    return manifest
