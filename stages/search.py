"""Command `search`: text or a picture -> the regions of the run's images most like it.

    regionclip search MANIFEST "a red umbrella" [--top 16] [--index student|teacher]
    regionclip search MANIFEST --image photo.jpg [--top 16]

Searches every proposal of the run (proposals/) by the cosine of its region embedding to the query:
  student  the pretrained student's region embeddings (checkpoints/pretrain/student.pt) at the
           evaluation scale (evaluate.min_size / max_size): search/index/student.faiss, built on
           first use and rebuilt when the student, the proposals or the scale change
  teacher  labels/regions.faiss when the label stage wrote it (label.region_index: the stored codes),
           else the teacher's region encoder at the label scale: search/index/teacher.faiss
The default is the student once pretrain has run, else the teacher. Text goes through the teacher's
text encoder with the 81 prompt templates, as class names do (the student learned against those
embeddings); a picture through the index's own model, as one whole-picture region.

Prints one JSON line per hit (rank, score, shard, key, region, box as x1 y1 x2 y2 in original pixels,
caption) on stdout, and draws the crops with their scores: search/<query>_<index>.png (the hits also
in search/<query>_<index>.jsonl). Everything else goes to stderr, so `... | jq` reads the hits.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from pipeline.config import RunManifest
from pipeline.layout import RunLayout, shard_name
from pipeline.stage import StageInputError, read_stage_manifest

COMMAND = "search"
HELP = "text or a picture -> the run's most similar regions: JSON lines + contact sheet (--top, --index, --image)"
HOLDS_RUN_LOCK = True        # it may build an index inside the run folder
PRINTS_DATA = True           # stdout holds the hits only
INDEXES = ("student", "teacher")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", nargs="?", help='what to look for, e.g. "a red umbrella"')
    parser.add_argument("--image", help="a picture: find regions that look like it (instead of a text query)")
    parser.add_argument("--top", type=int, default=16, help="regions to return (default 16)")
    parser.add_argument("--index", choices=INDEXES, default=None,
                        help="whose region embeddings: student (default once pretrain has run) or teacher")


def run(manifest: RunManifest, args: argparse.Namespace) -> dict:
    from pipeline.images import open_rgb
    from stages.resolve import synthetic_world_note

    if bool(args.query) == bool(args.image):
        raise ValueError('search: give a text query ("a red umbrella") or --image PATH, not both')
    if args.top < 1:
        raise ValueError(f"search: --top must be at least 1, got {args.top}")
    note = synthetic_world_note(manifest)
    if note:
        print(note, file=sys.stderr)
    which = args.index or default_index(manifest)
    picture = open_rgb(Path(args.image).expanduser()) if args.image else None
    (hits,) = search_regions(manifest, which, texts=[args.query] if args.query else (),
                             pictures=[picture] if picture is not None else (), top=args.top)
    records = hit_records(RunLayout.of(manifest), hits)
    for record in records:
        print(json.dumps(record), flush=True)
    name = f"{slug(args.query or 'image-' + Path(args.image).stem)}_{which}"
    query = args.query or f"regions like {Path(args.image).name}"
    sheet = write_results(manifest, name, f'"{query}": top {len(records)} regions, {which} index', records)
    print(f"search: {len(records)} regions from the {which} index -> {sheet}", file=sys.stderr)
    return {"index": which, "hits": len(records), "sheet": str(sheet)}


def slug(text: str) -> str:
    """A file-name form of a query: lower case, runs of other characters as one '-', at most 60."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "query"


def default_index(manifest: RunManifest) -> str:
    return "student" if RunLayout.of(manifest).student_checkpoint.is_file() else "teacher"


def search_regions(manifest: RunManifest, which: str, texts: Sequence[str] = (), pictures: Sequence = (),
                   top: int = 16, device: Optional[str] = None) -> list[list]:
    """The `top` regions (trainer.offline.region_search.RegionHit) for each text, then each picture,
    from the `which` index (built first if needed)."""
    import numpy as np

    from stages.resolve import load_teacher_clip
    from trainer.engine.device import resolve_device
    from trainer.offline.region_search import picture_embedding
    from trainer.offline.text_embed import embed_names

    device = resolve_device(device or manifest.evaluate.device)
    index, embedder = region_index(manifest, which, device, need_model=bool(pictures))
    queries = []
    if texts:
        model, tokenizer = load_teacher_clip(manifest, device=device)
        queries.append(embed_names(model, tokenizer, list(texts), manifest.embed.ensemble, device=device,
                                   progress=False))
    if pictures:
        queries.append(picture_embedding(embedder, pictures))
    return index.search(np.concatenate(queries), top)


def region_index(manifest: RunManifest, which: str, device, need_model: bool = False):
    """(RegionIndex, the model's region embedder or None) of `which`: the label stage's index for the
    teacher when it wrote one, else search/index/<which>.faiss, built now when missing or made from
    another model, proposals or scale."""
    from pipeline.io import read_json, sha256_file, write_json
    from pipeline.sidecars import iter_proposals, sidecar_shards
    from trainer.offline.region_search import RegionIndex, build_region_index

    layout = RunLayout.of(manifest)
    proposals = read_stage_manifest(layout.proposals) or {}
    if proposals.get("status") != "done":
        raise StageInputError("search needs the proposals stage: run `regionclip proposals MANIFEST` (or "
                              "`regionclip run MANIFEST`) first")
    checkpoint, scale = index_model_files(manifest, which)
    labels = read_stage_manifest(layout.labels) or {}
    from_labels = (which == "teacher" and manifest.label.region_index and labels.get("status") == "done"
                   and layout.labels_region_index.is_file())
    embedder = index_embedder(manifest, checkpoint, scale, device) if need_model else None
    if from_labels:
        return RegionIndex.read(layout.labels_region_index, layout.labels_region_ids), embedder
    identity = {"arch": manifest.teacher.arch, "checkpoint_sha256": sha256_file(checkpoint), **scale,
                "proposals": proposals.get("fingerprint")}
    files = layout.search_index(which), layout.search_index_ids(which)
    try:
        built = read_json(layout.search_index_identity(which))
        current = {k: v for k, v in built.items() if k != "rows"} == identity and all(f.is_file() for f in files)
    except (FileNotFoundError, ValueError, AttributeError):
        current = False
    if not current:
        shards = sidecar_shards(layout.proposals)
        print(f"search: building the {which}'s region index over {proposals.get('counts', {}).get('boxes', '?')} "
              f"proposals of {len(shards)} shards (once; rebuilt when the model or the proposals change)",
              file=sys.stderr)
        embedder = embedder or index_embedder(manifest, checkpoint, scale, device)
        rows = build_region_index(embedder, ((layout.shard_tar(s), iter_proposals(layout.proposals, s))
                                             for s in shards), *files, dim=embedder.concepts.shape[1],
                                  batch_size=manifest.label.batch_size)
        write_json(layout.search_index_identity(which), {**identity, "rows": rows})
    return RegionIndex.read(*files), embedder


def index_model_files(manifest: RunManifest, which: str) -> tuple[Path, dict]:
    """The checkpoint and the scale (min_size, max_size) of the model behind index `which`."""
    from stages.resolve import clip_checkpoint, teacher_scale

    if which not in INDEXES:
        raise ValueError(f"unknown index {which!r}; use {' or '.join(INDEXES)}")
    if which == "teacher":
        return clip_checkpoint(manifest, "teacher"), teacher_scale(manifest)
    return (clip_checkpoint(manifest, "pretrain"),
            {"min_size": manifest.evaluate.min_size, "max_size": manifest.evaluate.max_size})


def index_embedder(manifest: RunManifest, checkpoint: Path, scale: dict, device):
    """The CLIP of `checkpoint` as a region embedder at `scale` (trainer.offline.labels.Teacher)."""
    import numpy as np

    from trainer.models.clip import embedding_dim, load_clip
    from trainer.offline.labels import Teacher

    model, _ = load_clip(manifest.teacher.arch, checkpoint, allow_partial=manifest.teacher.allow_partial,
                         device=device, trust_torchscript=manifest.teacher.trust_torchscript)
    # No concepts: only its region embeddings are used here (one zero row fixes the width).
    return Teacher(model, np.zeros((1, embedding_dim(model)), np.float32), device=device, precision="auto",
                   **scale)


def hit_records(layout: RunLayout, hits: Sequence) -> list[dict]:
    """The hits as records: rank, score, shard, key, region, box (original pixels), caption."""
    from pipeline.io import read_parquet
    from pipeline.sidecars import read_proposals, shard_of_key

    shards = sorted({shard_of_key(h.key) for h in hits})
    boxes = {s: read_proposals(layout.proposals, s) for s in shards}
    captions = {}
    for s in shards:
        table = read_parquet(layout.shards.parquet(s), columns=["key", "caption"]).to_pydict()
        captions.update(zip(table["key"], table["caption"]))
    return [{"rank": rank, "score": round(h.score, 4), "shard": shard_name(shard_of_key(h.key)), "key": h.key,
             "region": h.region,
             "box": [round(float(v), 1) for v in boxes[shard_of_key(h.key)][h.key].boxes[h.region]],
             "caption": (captions.get(h.key) or "").split("\n")[0]}
            for rank, h in enumerate(hits, 1)]


def write_results(manifest: RunManifest, name: str, title: str, records: list[dict],
                  good: Optional[Sequence[bool]] = None) -> Path:
    """search/<name>.png (the crops in rank order with their scores; `good`: a green or red frame per
    hit) and search/<name>.jsonl; returns the picture's path."""
    from pipeline.images import load_rgb
    from pipeline.io import write_bytes
    from pipeline.pictures import RegionTile, contact_sheet, save_png
    from pipeline.sidecars import read_shard_images, shard_of_key

    layout = RunLayout.of(manifest)
    images = {}
    for s in sorted({shard_of_key(r["key"]) for r in records}):
        wanted = {r["key"] for r in records if shard_of_key(r["key"]) == s}
        images.update({k: load_rgb(v) for k, v in read_shard_images(layout.shard_tar(s), wanted).items()})
    tiles = [RegionTile(images[r["key"]], tuple(r["box"]), [f"#{r['rank']}  {r['score']:.3f}", r["key"]],
                        None if good is None else good[i]) for i, r in enumerate(records)]
    write_bytes(layout.search_result(name, ".jsonl"), "".join(json.dumps(r) + "\n" for r in records).encode())
    return save_png(contact_sheet(tiles, title), layout.search_result(name, ".png"))
