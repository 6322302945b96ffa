"""A tiny pretraining world written in the documented sidecar formats (tests and bench/trainer.py).

Shards of small JPEGs, proposals, labels with the fp16 codec (trainer/offline/codecs.py: code = the float16
bytes of the teacher's normalised region embedding, code_size = 2*D; labels/codec.json written),
caption embeddings and concept embeddings.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.layout import RunLayout, sample_key
from trainer.offline.codecs import FP16Codec, load_codec


def _jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    arr = np.zeros((h, w, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
    for _ in range(3):
        x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
        arr[y0:y0 + rng.integers(6, 20), x0:x0 + rng.integers(6, 20)] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_world(root: Path, num_shards: int = 2, per_shard: int = 8, dim: int = 64, num_concepts: int = 6,
               boxes: int = 12, size=(72, 56), seed: int = 0, store_flipped: bool = False, portrait: bool = True,
               corrupt: tuple = (), drop_rows: tuple = ()) -> dict:
    """Write shards + sidecars under `root` (a run directory). `corrupt`: keys whose JPEG is garbage;
    `drop_rows`: keys left out of the labels sidecar. Returns a description."""
    layout = RunLayout(Path(root))
    rng = np.random.default_rng(seed)
    concepts = rng.normal(size=(num_concepts, dim)).astype(np.float32)
    concepts /= np.linalg.norm(concepts, axis=1, keepdims=True)
    layout.concepts.root.mkdir(parents=True, exist_ok=True)
    np.save(layout.concept_embeddings, concepts)
    codec = FP16Codec(dim)
    codec.save(layout.labels_codec)
    sizes, keys_all = {}, []
    for s in range(num_shards):
        keys, prop_rows, lab_rows, cap_rows = [], [], [], []
        layout.shards.root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(layout.shard_tar(s), "w") as tar:
            for i in range(per_shard):
                key = sample_key(s, i)
                w, h = size if (i % 3 or not portrait) else (size[1], size[0])  # some portrait images
                data = b"not a jpeg" if key in corrupt else _jpeg(rng, w, h)
                meta = json.dumps({"key": key, "width": w, "height": h}).encode()
                for ext, payload in (("jpg", data), ("txt", b"a caption"), ("json", meta)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                keys.append(key)
                x1 = rng.uniform(0, w * 0.6, boxes)
                y1 = rng.uniform(0, h * 0.6, boxes)
                bx = np.stack([x1, y1, x1 + rng.uniform(4, w * 0.4, boxes),
                               y1 + rng.uniform(4, h * 0.4, boxes)], 1).astype(np.float32)
                prop_rows.append((key, w, h, bx.reshape(-1), rng.normal(size=boxes).astype(np.float32)))
                emb = rng.normal(size=(boxes, dim)).astype(np.float32) + 3 * concepts[rng.integers(0, num_concepts, boxes)]
                emb /= np.linalg.norm(emb, axis=1, keepdims=True)
                logits = emb @ concepts.T / 0.01
                p = np.exp(logits - logits.max(1, keepdims=True))
                p /= p.sum(1, keepdims=True)
                femb = emb + 0.05 * rng.normal(size=emb.shape).astype(np.float32)
                if key not in drop_rows:
                    lab_rows.append((key, p.argmax(1).astype(np.int32), p.max(1).astype(np.float32),
                                     codec.encode(emb).tobytes(), codec.encode(femb).tobytes()))
                cap = rng.normal(size=dim).astype(np.float32)
                cap_rows.append((key, (cap / np.linalg.norm(cap)).astype(np.float16)))
        keys_all += keys
        sizes[f"{s:05d}.tar"] = per_shard
        layout.proposals.root.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({
            "key": [r[0] for r in prop_rows], "width": pa.array([r[1] for r in prop_rows], pa.int32()),
            "height": pa.array([r[2] for r in prop_rows], pa.int32()),
            "boxes": pa.array([r[3] for r in prop_rows], pa.list_(pa.float32())),
            "objectness": pa.array([r[4] for r in prop_rows], pa.list_(pa.float32())),
            "num_boxes": pa.array([boxes] * len(prop_rows), pa.int32())}), layout.proposals.parquet(s))
        layout.labels.root.mkdir(parents=True, exist_ok=True)
        cols = {"key": [r[0] for r in lab_rows], "num_regions": pa.array([boxes] * len(lab_rows), pa.int32()),
                "pseudo_label": pa.array([r[1] for r in lab_rows], pa.list_(pa.int32())),
                "pseudo_prob": pa.array([r[2] for r in lab_rows], pa.list_(pa.float32())),
                "region_codes": pa.array([r[3] for r in lab_rows], pa.binary()),
                "image_code": pa.array([b"\0" * codec.code_size] * len(lab_rows), pa.binary()),
                "image_pseudo_label": pa.array([0] * len(lab_rows), pa.int32())}
        if store_flipped:
            cols["flipped_region_codes"] = pa.array([r[4] for r in lab_rows], pa.binary())
        pq.write_table(pa.table(cols), layout.labels.parquet(s))
        layout.caption_embeddings.root.mkdir(parents=True, exist_ok=True)
        flat = np.concatenate([r[1] for r in cap_rows])
        pq.write_table(pa.table({"key": [r[0] for r in cap_rows],
                                 "embedding": pa.FixedSizeListArray.from_arrays(pa.array(flat), dim)}),
                       layout.caption_embeddings.parquet(s))
    layout.sizes_json.write_text(json.dumps(sizes))
    return {"layout": layout, "codec": load_codec(layout.labels.root), "concepts": concepts, "shard_ids": list(range(num_shards)),
            "keys": keys_all}
