"""Tiny runs for the proposals / label tests and benches: a few synthetic images in small shards, a
random tiny CLIP teacher, random concept embeddings standing in for the embed stage."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipeline.io import write_json, write_parquet
from pipeline.layout import RunLayout

RPN_LOADER = "tests.rpn_standin:load_rpn"


def rpn_loader() -> str:
    """The real trainer/models/rpn.py once it exists; until then the torchvision stand-in."""
    try:
        import trainer.models.rpn  # noqa: F401
        return "trainer.models.rpn:load_rpn"
    except ImportError:
        return RPN_LOADER


def manifest_body(num_images: int = 10, per_shard: int = 4, codec: str = "pq", extra: str = "") -> str:
    return f"""
corpus: {{format: synthetic}}
synth: {{num_images: {num_images}, num_val_images: 0, min_side: 96, max_side: 160}}
shard: {{samples_per_shard: {per_shard}}}
teacher: {{arch: RN50-tiny}}
proposals: {{min_size: 128, max_size: 192, post_nms_top_n: 12, pre_nms_top_n: 200, batch_size: 2, num_actors: 2}}
label: {{codec: {codec}, pq_subquantizers: 16, pq_bits: 6, pq_train_regions: 256, batch_size: 2, topk: 8, num_actors: 2}}
{extra}"""


def make_teacher(layout: RunLayout, seed: int = 0) -> Path:
    from trainer.models.clip import create_clip, save_clip_checkpoint

    torch.manual_seed(seed)
    model, _ = create_clip("RN50-tiny")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # open_clip zero-initialises the last BN of each block; make them matter
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.5)
    return save_clip_checkpoint(model, layout.teacher_checkpoint)


def make_concepts(layout: RunLayout, num: int = 12, dim: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((num, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    layout.concepts.root.mkdir(parents=True, exist_ok=True)
    np.save(layout.concept_embeddings, emb)
    write_parquet(layout.concepts_parquet, pa.table({"concept_id": pa.array(range(num), pa.int32()),
                                                     "name": [f"thing{i}" for i in range(num)]}))
    write_json(layout.stage("embed").manifest, {"stage": "embed", "status": "done", "fingerprint": f"fake{seed}"})
    return emb


def make_rpn(layout: RunLayout) -> Path:
    path = layout.rpn_checkpoint
    path.parent.mkdir(parents=True, exist_ok=True)
    if rpn_loader() == RPN_LOADER:
        path.write_bytes(b"stand-in rpn (weights are seeded)")
    else:
        from trainer.models.rpn import RpnConfig, build_rpn, save_rpn_checkpoint  # the real one, random weights
        torch.manual_seed(0)
        save_rpn_checkpoint(build_rpn(RpnConfig("clip_res4", clip_arch="RN50-tiny", anchor_sizes=(16, 32, 64))), path)
    return path


def prepare_run(manifest) -> RunLayout:
    """synth and shard stages + teacher + concepts + RPN checkpoint for a manifest made from manifest_body()."""
    from stages import shard, synth

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    synth.run(manifest)
    shard.run(manifest)
    layout = RunLayout.of(manifest)
    make_teacher(layout)
    make_concepts(layout)
    make_rpn(layout)
    return layout


def concepts_from_regions(layout: RunLayout, num: int = 12, seed: int = 0) -> np.ndarray:
    """Concept embeddings that a random teacher tells apart: normalized embeddings of real regions
    (minus their mean), so pseudo-labels vary across regions. Stands in for the embed stage."""
    from pipeline.images import load_rgb
    from pipeline.sidecars import read_proposals, read_shard_images
    from trainer.models.clip import load_clip
    from trainer.offline.labels import Teacher

    model, _ = load_clip("RN50-tiny", layout.teacher_checkpoint)
    props = read_proposals(layout.proposals, 0)
    keys = list(props)
    blobs = read_shard_images(layout.shard_tar(0), keys)
    teacher = Teacher(model, np.zeros((1, 64), np.float32), min_size=128, max_size=192, device="cpu")
    out = teacher.embed([load_rgb(blobs[k]) for k in keys], [props[k].boxes for k in keys])
    emb = torch.cat(out.regions).numpy()
    emb = emb - emb.mean(0, keepdims=True)
    rng = np.random.default_rng(seed)
    pick = emb[rng.choice(len(emb), num, replace=False)]
    pick /= np.linalg.norm(pick, axis=1, keepdims=True)
    layout.concepts.root.mkdir(parents=True, exist_ok=True)
    np.save(layout.concept_embeddings, pick.astype(np.float32))
    return pick.astype(np.float32)


def read_rows(stage_dir) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for p in sorted(stage_dir.root.glob("[0-9]*.parquet")):
        rows.extend(pq.read_table(p).to_pylist())
    return rows
