"""`regionclip show MANIFEST [--key KEY] [--top 10] [--out file.png]`: one image with its top
proposals (by objectness) and the teacher's pseudo-label and probability for each, as a PNG
(default eval/show/<key>.png), so a user can look at what the teacher said."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import RunManifest
from pipeline.images import load_rgb
from pipeline.layout import RunLayout, shard_name
from pipeline.pictures import draw_labelled_boxes
from pipeline.sidecars import (read_concept_names, read_labels, read_proposals, read_shard_images, shard_of_key,
                               sidecar_shards)
from pipeline.stage import StageInputError


COMMAND = "show"
HELP = "PNG of one image with its top proposals and pseudo-labels (--key, --top, --out)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key", help="sample key (default: the first labelled image)")
    parser.add_argument("--top", type=int, default=10, help="proposals to draw (highest objectness first)")
    parser.add_argument("--out", help="PNG path (default: <output_dir>/eval/show/<key>.png)")


def run(manifest: RunManifest, args: argparse.Namespace) -> dict:
    layout = RunLayout.of(manifest)
    shards = sidecar_shards(layout.labels)
    if not shards:
        raise StageInputError("no labels yet; run `regionclip proposals MANIFEST` and `regionclip label MANIFEST`")
    key = args.key or read_labels(layout.labels, shards[0], ["key"]).column("key")[0].as_py()
    picture, top = pseudo_label_picture(layout, key, args.top)
    out = Path(args.out) if args.out else layout.show_png(key)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out)
    print(f"show: {out}")
    return {"key": key, "path": str(out), "boxes": top}


def pseudo_label_picture(layout: RunLayout, key: str, top: int, min_side: int = 640):
    """(picture, boxes drawn): sample `key` (enlarged to `min_side` px) with its `top` proposals and the
    teacher's pseudo-labels."""
    shard_id = shard_of_key(key)
    props = read_proposals(layout.proposals, shard_id)
    if key not in props:
        raise ValueError(f"key {key!r} is not in proposals/{shard_name(shard_id)}.parquet")
    labels = {r["key"]: r for r in read_labels(layout.labels, shard_id, ["key", "pseudo_label", "pseudo_prob",
                                                                       "image_pseudo_label"]).to_pylist()}
    names = read_concept_names(layout.concepts_parquet)
    image = load_rgb(read_shard_images(layout.shard_tar(shard_id), [key])[key])
    p, lab = props[key], labels[key]
    top = min(top, len(p.boxes))
    captions = [f"{names[lab['pseudo_label'][i]]}  p={lab['pseudo_prob'][i]:.2f}  (objectness {p.objectness[i]:+.2f})"
                for i in range(top)]
    title = (f"{key}: {top} of {len(p.boxes)} proposals; whole image: "
             f"{names[lab['image_pseudo_label']]}")
    return draw_labelled_boxes(image, p.boxes[:top], captions, min_side=min_side, title=title), top
