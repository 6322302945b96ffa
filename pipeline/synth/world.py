"""Writing the synthetic world to a folder (and looking at it): the base/novel category split, the
images, captions and COCO files, the completion marker, and a contact sheet.

World folder (every file is written to a temporary name and renamed; `world.json` is written last and
marks the world complete; a world whose `world.json` matches the config is not regenerated):
    images/000000.jpg ...       the caption corpus (JPEG quality 95)
    val_images/000000.jpg ...   held-out images
    captions.tsv                header `caption<TAB>url`, one row per corpus image, url relative to here
    instances_train.json        COCO format over images/, base-category boxes only
    instances_val.json          COCO format over val_images/, all categories boxed
    categories.json             [{id, name, split}], ids from 1
    world.json                  config, generator version and file counts
"""
from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from pipeline.config import SynthConfig
from pipeline.images import open_rgb
from pipeline.io import atomic_path, write_bytes
from pipeline.layout import inside
from pipeline.synth.scene import SceneObject, render_scene
from pipeline.synth.shapes import CATEGORIES

# Bump when the drawing or captions change, so old worlds on disk are regenerated.
GENERATOR_VERSION = 1

# Which categories become novel first. Fixed (never shuffled by the seed) so that a split named in a
# report means the same categories in every run.
NOVEL_ORDER: tuple[str, ...] = (
    "umbrella", "cup", "mushroom", "clock", "boat", "key",
    "kite", "bell", "carrot", "heart", "fish", "book",
    "apple", "banana", "star", "tree", "house", "car", "ball", "bottle", "flower", "hat", "cloud", "sun",
)
assert set(NOVEL_ORDER) == set(CATEGORIES)


def split_categories(num_novel: int) -> tuple[list[str], list[str]]:
    """(base, novel) category names, each in CATEGORIES order."""
    if not 0 <= num_novel < len(CATEGORIES):
        raise ValueError(f"synth.num_novel must be between 0 and {len(CATEGORIES) - 1}, got {num_novel}")
    novel = set(NOVEL_ORDER[:num_novel])
    return [c for c in CATEGORIES if c not in novel], [c for c in CATEGORIES if c in novel]


def category_records(num_novel: int) -> list[dict]:
    """The categories as COCO records with our extra `split` field; ids start at 1."""
    _, novel = split_categories(num_novel)
    return [{"id": i + 1, "name": name, "split": "novel" if name in novel else "base"}
            for i, name in enumerate(CATEGORIES)]



# ---------------------------------------------------------------------------------------------------
# Writing the world
# ---------------------------------------------------------------------------------------------------

def _write_json(path: Path, obj, indent: Optional[int] = None) -> None:
    write_bytes(path, (json.dumps(obj, indent=indent) + "\n").encode("utf-8"))


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


PARALLEL_FROM = 200     # images; a smaller world is drawn in this process (a pool costs about a second)


@dataclass
class RenderedImage:
    split: str
    index: int
    jpeg: bytes
    width: int
    height: int
    objects: list[SceneObject]
    caption: str


def _render_jpeg(cfg: SynthConfig, split: str, index: int) -> RenderedImage:
    scene = render_scene(cfg, split, index)
    return RenderedImage(split, index, _jpeg_bytes(scene.image), scene.image.width, scene.image.height,
                         scene.objects, scene.caption)


def _rendered(cfg: SynthConfig, todo: list[tuple[str, int]]):
    """The images of `todo`, in order. Every image has its own seeded generator, so drawing them in
    worker processes gives the same bytes as drawing them here."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(cpus, 8)
    if len(todo) < PARALLEL_FROM or workers < 2:
        yield from (_render_jpeg(cfg, split, index) for split, index in todo)
        return
    # spawn, not fork: the caller may hold threads (Ray, torch) that a forked child would inherit locked
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        splits, indices = zip(*todo)
        yield from pool.map(_render_jpeg, [cfg] * len(todo), splits, indices, chunksize=32)


def _remove_stale_images(folder: Path, count: int) -> None:
    """Numbered JPEGs beyond `count`, left by an earlier, larger world in the same folder."""
    for path in folder.glob("*.jpg"):
        if path.stem.isdigit() and int(path.stem) >= count:
            path.unlink()


def _world_marker(cfg: SynthConfig, counts: dict) -> dict:
    base, novel = split_categories(cfg.num_novel)
    return {"generator_version": GENERATOR_VERSION, "config": cfg.model_dump(mode="json"),
            "counts": counts, "base_categories": base, "novel_categories": novel}


def _validate(cfg: SynthConfig) -> None:
    split_categories(cfg.num_novel)
    if cfg.min_side > cfg.max_side:
        raise ValueError(f"synth.min_side ({cfg.min_side}) must not exceed synth.max_side ({cfg.max_side})")
    if cfg.min_side < 48:
        raise ValueError(f"synth.min_side must be at least 48 px to hold objects, got {cfg.min_side}")


def generate_world(cfg: SynthConfig, out_dir: Path, progress: bool = True) -> dict:
    """Write the world described by `cfg` into `out_dir` and return its `world.json` content.

    A folder whose `world.json` already matches `cfg` (and this generator's version) is left alone.
    """
    _validate(cfg)
    out_dir = Path(out_dir)
    marker_path = out_dir / "world.json"
    if marker_path.exists():
        try:
            existing = json.loads(marker_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            existing = None
        if (isinstance(existing, dict) and existing.get("config") == cfg.model_dump(mode="json")
                and existing.get("generator_version") == GENERATOR_VERSION):
            return existing
        marker_path.unlink()        # from here on the folder is incomplete until the new marker

    categories = category_records(cfg.num_novel)
    category_id = {c["name"]: c["id"] for c in categories}
    base = {c["name"] for c in categories if c["split"] == "base"}
    image_dirs = {"train": out_dir / "images", "val": out_dir / "val_images"}
    coco = {split: {"info": {"description": f"synthetic open-vocabulary world, seed {cfg.seed}",
                             "split": split},
                    "images": [], "annotations": [], "categories": categories}
            for split in image_dirs}
    captions = ["caption\turl"]

    todo = [("train", i) for i in range(cfg.num_images)] + [("val", i) for i in range(cfg.num_val_images)]
    for folder in image_dirs.values():
        folder.mkdir(parents=True, exist_ok=True)
    for scene in tqdm(_rendered(cfg, todo), total=len(todo), desc="synth world", unit="img",
                      disable=not progress):
        split = scene.split
        relative = f"{image_dirs[split].name}/{scene.index:06d}.jpg"
        write_bytes(out_dir / relative, scene.jpeg)
        image_id = scene.index + 1
        coco[split]["images"].append({"id": image_id, "file_name": relative,
                                      "width": scene.width, "height": scene.height})
        for obj in scene.objects:
            if split == "train" and obj.name not in base:
                continue            # novel objects are in the picture and caption, never boxed
            annotations = coco[split]["annotations"]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category_id[obj.name], "bbox": list(obj.box),
                                "area": obj.area, "iscrowd": 0})
        if split == "train":
            captions.append(f"{scene.caption}\t{relative}")

    for split, folder in image_dirs.items():
        _remove_stale_images(folder, cfg.num_images if split == "train" else cfg.num_val_images)
    write_bytes(out_dir / "captions.tsv", ("\n".join(captions) + "\n").encode("utf-8"))
    _write_json(out_dir / "instances_train.json", coco["train"])
    _write_json(out_dir / "instances_val.json", coco["val"])
    _write_json(out_dir / "categories.json", categories, indent=1)
    counts = {"images": cfg.num_images, "val_images": cfg.num_val_images,
              "captions": len(captions) - 1, "train_boxes": len(coco["train"]["annotations"]),
              "val_boxes": len(coco["val"]["annotations"]), "categories": len(categories),
              "base": len(base), "novel": len(categories) - len(base)}
    marker = _world_marker(cfg, counts)
    _write_json(marker_path, marker, indent=1)
    return marker


# ---------------------------------------------------------------------------------------------------
# Looking at the world
# ---------------------------------------------------------------------------------------------------

def write_contact_sheet(world_dir: Path, out_png: Path, n: int = 16, split: str = "val",
                        cell: int = 240) -> Path:
    """A grid of the first `n` images of `split` with their boxes and names (novel ones in magenta).

    `split="val"` shows every category boxed; `"train"` shows what the detector is trained on.
    """
    world_dir = Path(world_dir)
    data = json.loads((world_dir / f"instances_{split}.json").read_text(encoding="utf-8"))
    names = {c["id"]: (c["name"], c.get("split", "base")) for c in data["categories"]}
    boxes_of: dict[int, list] = {}
    for ann in data["annotations"]:
        boxes_of.setdefault(ann["image_id"], []).append(ann)
    images = data["images"][:n]
    columns = max(1, math.ceil(math.sqrt(len(images))))
    rows = max(1, math.ceil(len(images) / columns))
    sheet = Image.new("RGB", (columns * cell, rows * cell), (40, 40, 40))
    font = ImageFont.load_default()
    for k, record in enumerate(images):
        picture = open_rgb(inside(world_dir, record["file_name"]))
        scale = min((cell - 8) / picture.width, (cell - 8) / picture.height)
        picture = picture.resize((round(picture.width * scale), round(picture.height * scale)),
                                 Image.BILINEAR)
        draw = ImageDraw.Draw(picture)
        for ann in boxes_of.get(record["id"], []):
            name, kind = names[ann["category_id"]]
            colour = (255, 0, 255) if kind == "novel" else (0, 255, 0)
            x, y, w, h = (v * scale for v in ann["bbox"])
            draw.rectangle([x, y, x + w, y + h], outline=colour, width=2)
            draw.text((x + 2, y + 1), name, fill=colour, font=font, stroke_width=2,
                      stroke_fill=(0, 0, 0))
        sheet.paste(picture, ((k % columns) * cell + 4, (k // columns) * cell + 4))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_png) as tmp:
        sheet.save(tmp, "PNG")
    return out_png
