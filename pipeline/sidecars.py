"""Per-shard sidecars: what a shard holds, its images, and the proposals / labels Parquet files.

Sidecars (docs/formats.md) have one Parquet file per shard and one row per *written* key of that
shard (shard Parquet rows with status `ok`), in the shard's order. Boxes are float32 x1,y1,x2,y2 in
the pixels of the image stored in the shard tar ("original pixels"), flattened into one list.

    keys = written_keys(layout.shards, 3)                # [{"key", "width", "height"}, ...]
    images = read_shard_images(layout.shard_tar(3), [k["key"] for k in keys])
    props = read_proposals(layout.proposals, 3)          # {key: Proposals}
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io import write_parquet
from pipeline.layout import StageDir

PROPOSALS_SCHEMA = pa.schema([
    ("key", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("boxes", pa.list_(pa.float32())), ("objectness", pa.list_(pa.float32())),
    ("num_boxes", pa.int32()),
])

LABELS_SCHEMA = pa.schema([
    ("key", pa.string()), ("num_regions", pa.int32()),
    ("pseudo_label", pa.list_(pa.int32())), ("pseudo_prob", pa.list_(pa.float32())),
    ("region_codes", pa.binary()), ("image_code", pa.binary()), ("image_pseudo_label", pa.int32()),
])
FLIPPED_FIELDS = [("flipped_region_codes", pa.binary()), ("flipped_image_code", pa.binary())]


def labels_schema(store_flipped: bool) -> pa.Schema:
    schema = LABELS_SCHEMA
    for name, typ in FLIPPED_FIELDS if store_flipped else ():
        schema = schema.append(pa.field(name, typ))
    return schema


# -- the shard stage's outputs ----------------------------------------------------------------------

def written_keys(shards: StageDir, shard_id: int) -> list[dict]:
    """The written samples of a shard in shard order: key, width, height (pixels in the tar)."""
    table = pq.read_table(shards.parquet(shard_id), columns=["key", "status", "width", "height"])
    return [{"key": r["key"], "width": int(r["width"]), "height": int(r["height"])}
            for r in table.to_pylist() if r["status"] == "ok"]


def read_shard_images(tar_path: str | Path, keys: Optional[Iterable[str]] = None) -> dict[str, bytes]:
    """The image bytes (`{key}.jpg` members) of a shard tar, by key; only `keys` when given."""
    wanted = set(keys) if keys is not None else None
    out: dict[str, bytes] = {}
    with tarfile.open(tar_path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            stem, _, ext = member.name.rpartition(".")
            if ext.lower() not in ("jpg", "jpeg", "png", "webp"):
                continue
            if wanted is not None and stem not in wanted:
                continue
            out[stem] = tar.extractfile(member).read()
    if wanted is not None and len(out) != len(wanted):
        missing = sorted(wanted - set(out))[:5]
        raise FileNotFoundError(f"{tar_path}: no image for keys {missing}")
    return out


def shard_of_key(key: str, shard_digits: int = 5) -> int:
    return int(key[:shard_digits])


# -- proposals ---------------------------------------------------------------------------------------

@dataclass
class Proposals:
    key: str
    width: int
    height: int
    boxes: np.ndarray       # [N, 4] float32, original pixels, ordered by objectness
    objectness: np.ndarray  # [N] float32 logits


def proposals_table(rows: list[Proposals]) -> pa.Table:
    return pa.table({
        "key": pa.array([r.key for r in rows], pa.string()),
        "width": pa.array([r.width for r in rows], pa.int32()),
        "height": pa.array([r.height for r in rows], pa.int32()),
        "boxes": pa.array([np.asarray(r.boxes, np.float32).reshape(-1) for r in rows], pa.list_(pa.float32())),
        "objectness": pa.array([np.asarray(r.objectness, np.float32) for r in rows], pa.list_(pa.float32())),
        "num_boxes": pa.array([len(r.boxes) for r in rows], pa.int32()),
    }, schema=PROPOSALS_SCHEMA)


def write_proposals(stage_dir: StageDir, shard_id: int, rows: list[Proposals]) -> Path:
    path = stage_dir.parquet(shard_id)
    write_parquet(path, proposals_table(rows))
    return path


def read_proposals(stage_dir: StageDir, shard_id: int) -> dict[str, Proposals]:
    """A shard's proposals by key (insertion order = shard order)."""
    out = {}
    path = stage_dir.parquet(shard_id)
    for r in pq.read_table(path).to_pylist():
        n = r["num_boxes"]
        boxes = np.asarray(r["boxes"] or [], np.float32)
        if n is None or boxes.size != 4 * n or not np.isfinite(boxes).all():
            raise ValueError(f"{path}: key {r['key']}: boxes are not {n} finite x1,y1,x2,y2 rows; the sidecar "
                             "is damaged (`regionclip verify MANIFEST --repair`, then rerun proposals)")
        out[r["key"]] = Proposals(r["key"], r["width"], r["height"], boxes.reshape(n, 4),
                                  np.asarray(r["objectness"], np.float32))
    return out


# -- labels ------------------------------------------------------------------------------------------

def write_labels(stage_dir: StageDir, shard_id: int, columns: dict, store_flipped: bool) -> Path:
    path = stage_dir.parquet(shard_id)
    write_parquet(path, pa.table(columns, schema=labels_schema(store_flipped)))
    return path


def read_labels(stage_dir: StageDir, shard_id: int, columns: Optional[list[str]] = None) -> pa.Table:
    return pq.read_table(stage_dir.parquet(shard_id), columns=columns)


def sidecar_shards(stage_dir: StageDir) -> list[int]:
    """Shard ids that have a Parquet sidecar in a stage folder."""
    if not stage_dir.root.is_dir():
        return []
    return sorted(int(p.stem) for p in stage_dir.root.glob("[0-9]*.parquet"))
