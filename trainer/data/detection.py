"""Detection data: any COCO-format set (COCO, LVIS v1, the synthetic world), base/novel category
splits, the COCO open-vocabulary split (OVR-CNN's 48/17), and repeat-factor sampling for LVIS.

    data = DetectionSet("instances_train.json", images_root=None)   # root: the JSON's folder
    split = data.category_split          # {"base": [category ids], "novel": [...]}
    vocab = data.vocabulary("base")       # categories the detector is trained on (names, ids)
    image = data.load_image(record)       # float [3, H, W] in 0..1 (read from disk each time)
    boxes, labels = data.targets(image_id, vocab)   # xyxy original pixels, indices into vocab

Category splits, first that applies: a `split` field on each category (our synthetic world and the
files `coco-ovd-split` writes), LVIS's `frequency` (rare = novel; frequent + common = base), COCO's
category names (the 17 OVR-CNN novel names are novel, the 48 base names base); otherwise every
category is base.

Every image file resolves inside the images root (`image_file`): an annotation file whose `file_name`
(or `coco_url`) is absolute, climbs out with `..` or passes a link leading out is refused whole when
it is read (`ImagesOutsideRoot`, naming the first few), before any image is, unless
`allow_outside_root`. Refused rather than skipped: evaluation must score every ground-truth image,
and a training set that silently shrinks is another experiment.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
from torch.utils.data import Dataset

from pipeline.layout import UnsafeName, inside
from trainer.data.images import as_unit_range, read_image_tensor

MAX_LISTED_NAMES = 5
log = logging.getLogger(__name__)


# docs/method.md §6 (OVR-CNN's split), COCO 2017 category names.
COCO_OVD_NOVEL: tuple[str, ...] = (
    "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard", "skateboard",
    "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors")
COCO_OVD_BASE: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird", "horse",
    "sheep", "bear", "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee", "skis", "kite",
    "surfboard", "bottle", "fork", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "pizza", "donut", "chair", "bed", "toilet", "tv", "laptop", "mouse", "remote", "microwave",
    "oven", "toaster", "refrigerator", "book", "clock", "vase", "toothbrush")


@dataclass(frozen=True)
class DetectorClasses:
    """The classes a detector scores, in order: index i <-> category id ids[i] <-> names[i]."""
    names: tuple[str, ...]
    ids: tuple[int, ...]

    def index_of(self) -> dict[int, int]:
        return {cid: i for i, cid in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.names)


def dataset_kind(data: dict) -> str:
    """'lvis' when the categories carry LVIS's `frequency`, else 'coco'."""
    cats = data.get("categories") or []
    return "lvis" if cats and all("frequency" in c for c in cats) else "coco"


def category_split(categories: Sequence[dict]) -> dict[str, list[int]]:
    """{"base": ids, "novel": ids} from the categories' own fields (see the module docstring)."""
    if categories and all("split" in c for c in categories):
        novel = [c["id"] for c in categories if c["split"] == "novel"]
    elif categories and all("frequency" in c for c in categories):
        novel = [c["id"] for c in categories if c["frequency"] == "r"]
    elif any(c["name"] in COCO_OVD_NOVEL for c in categories) and any(c["name"] in COCO_OVD_BASE
                                                                       for c in categories):
        novel = [c["id"] for c in categories if c["name"] in COCO_OVD_NOVEL]
    else:
        novel = []
    novel_set = set(novel)
    return {"base": [c["id"] for c in categories if c["id"] not in novel_set], "novel": novel}


def image_relative_path(record: dict) -> str:
    """COCO's `file_name`; LVIS has none, its `coco_url` ends in <split folder>/<file>."""
    if record.get("file_name"):
        return record["file_name"]
    url = record.get("coco_url") or record.get("flickr_url")
    if not url:
        raise ValueError(f"image {record.get('id')}: neither file_name nor coco_url")
    return "/".join(url.split("/")[-2:])


class ImagesOutsideRoot(ValueError):
    """An annotation file names image files outside its images root."""


def image_file(root: Union[str, os.PathLike], record: dict, allow_outside_root: bool = False) -> Path:
    """The file of an image record: `root / image_relative_path(record)`, refused with UnsafeName unless it
    stays inside `root` (a relative name, no `..`, no link on the way leading out) or `allow_outside_root`."""
    name = image_relative_path(record)
    return Path(root) / name if allow_outside_root else inside(root, name)


def image_files(images: Sequence[dict], root: Union[str, os.PathLike], *, allow_outside_root: bool = False,
                setting: str = "allow_outside_root", source: str = "the annotations") -> list[Path]:
    """`image_file` of every record, checked before any image is read: ImagesOutsideRoot naming the first
    few names that lead outside `root` and `setting`, the manifest field that allows them."""
    files, refused = [], []
    for record in images:
        try:
            files.append(image_file(root, record, allow_outside_root))
        except UnsafeName:
            refused.append(repr(image_relative_path(record)))
    if refused:
        shown = ", ".join(refused[:MAX_LISTED_NAMES]) + (", ..." if len(refused) > MAX_LISTED_NAMES else "")
        raise ImagesOutsideRoot(
            f"{source}: {len(refused)} of {len(images)} image file names lead outside the images root "
            f"{root}: {shown}. Fix the file names or the images root, or set {setting}: true to read "
            "images anywhere on this machine.")
    return files


# -- the one COCO-format loader -----------------------------------------------------------------------------

class AnnotationError(ValueError):
    """A COCO-format file that cannot be used (or, with strict, one that would lose annotations); the
    message names the file and the records."""


# Why an annotation (or image record) is dropped; each is counted and reported, or refused with strict.
UNKNOWN_IMAGE, UNKNOWN_CATEGORY = "unknown image_id", "unknown category_id"
NOT_A_BOX, OUTSIDE = "zero or negative width or height", "entirely outside its image"
REPEATED_ANNOTATION, REPEATED_IMAGE = "annotation id listed twice (the first kept)", "image id listed twice (the first kept)"
CLIPPED = "clipped to the image"


def load_coco(source: Union[str, os.PathLike, dict], *, clip_boxes: bool = False, strict: bool = False,
              strict_setting: str = "strict_annotations") -> dict:
    """A COCO-format detection set (COCO, LVIS, the synthetic world), validated; every reader of one
    (train-rpn, transfer, evaluate) loads it here.

    Refused with AnnotationError (naming the file and the first few records): what cannot be used (not
    a JSON object of lists; an image without a whole-number id, a file name or positive width/height; a
    category without an id and a name; an annotation without a whole-number id, image_id or category_id,
    or whose bbox is not 4 finite numbers). Dropped and counted per reason (one warning), or refused when
    `strict`: annotations of an unknown image or category, of zero or negative size, entirely outside
    their image or repeating an id, and image records repeating an id. `clip_boxes` (training sets):
    boxes are clipped to their image (counted too); evaluation sets keep the boxes as given. Returns the
    content with images and annotations replaced by the usable ones."""
    name = "the annotations" if isinstance(source, dict) else str(source)
    data = source if isinstance(source, dict) else _read_annotation_json(Path(source))
    if not isinstance(data, dict):
        raise AnnotationError(f"{name}: a COCO-format file is a JSON object with images, annotations and "
                              f"categories, not a {type(data).__name__}")
    for key, default in (("images", None), ("annotations", []), ("categories", None)):
        if not isinstance(data.get(key, default), list):
            raise AnnotationError(f"{name}: {key!r} must be a list (got {type(data.get(key)).__name__})")
    problems: list[str] = []
    dropped: Counter = Counter()
    categories = _usable_categories(data["categories"], problems)
    images, sizes = _usable_images(data["images"], clip_boxes, problems, dropped)
    annotations, seen = [], set()
    for n, ann in enumerate(data.get("annotations", [])):
        box = _usable_annotation(ann, n, problems)
        if box is None:
            continue
        if ann["id"] in seen:
            dropped[REPEATED_ANNOTATION] += 1
            continue
        seen.add(ann["id"])
        reason, clipped = _box_reason(ann, box, sizes, categories, clip_boxes)
        if reason:
            dropped[reason] += 1
            continue
        if clipped is not None:
            dropped[CLIPPED] += 1
            ann = {**ann, "bbox": clipped, "area": clipped[2] * clipped[3]}
        annotations.append(ann)
    if problems:
        shown = "; ".join(problems[:MAX_LISTED_NAMES]) + ("; ..." if len(problems) > MAX_LISTED_NAMES else "")
        raise AnnotationError(f"{name}: {len(problems)} record(s) cannot be used: {shown}")
    if dropped:
        counts = ", ".join(f"{reason} {count}" for reason, count in dropped.most_common())
        if strict:
            raise AnnotationError(f"{name}: {counts} (of {len(data.get('annotations', []))} annotations); "
                                  f"refused because of {strict_setting}: true (--strict): fix the file, or "
                                  "run without it to drop them")
        log.warning("%s: %s (of %d annotations, %d images); %s: true (--strict) refuses such a file instead",
                    name, counts, len(data.get("annotations", [])), len(images), strict_setting)
    return {**data, "images": images, "annotations": annotations, "categories": list(categories.values())}


def _read_annotation_json(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such annotation file")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{path}: not UTF-8 text (byte {err.start}); a COCO-format file is JSON") from None
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: not valid JSON: {err}") from None
    except RecursionError:
        raise AnnotationError(f"{path}: JSON nested too deeply to be a COCO-format file") from None


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _usable_categories(records: list, problems: list) -> dict[int, dict]:
    categories: dict[int, dict] = {}
    for n, cat in enumerate(records):
        if not isinstance(cat, dict) or not _is_id(cat.get("id")) or not isinstance(cat.get("name"), str):
            problems.append(f"category #{n} needs a whole-number id and a name")
        elif cat["id"] in categories:
            problems.append(f"category id {cat['id']} is listed twice")
        else:
            categories[cat["id"]] = cat
    return categories


def _usable_images(records: list, need_size: bool, problems: list, dropped: Counter) -> tuple[list, dict]:
    """The image records (first of each id) and their (width, height); None where a set that keeps its
    boxes as given has no size."""
    images, sizes = [], {}
    for n, im in enumerate(records):
        if not isinstance(im, dict) or not _is_id(im.get("id")):
            problems.append(f"image #{n} has no whole-number id")
            continue
        if im["id"] in sizes:
            dropped[REPEATED_IMAGE] += 1
            continue
        width, height = im.get("width"), im.get("height")
        if (width is not None or height is not None or need_size) and not (
                _is_number(width) and _is_number(height) and width > 0 and height > 0):
            problems.append(f"image {im['id']}: width and height must be positive numbers (got {width!r:.20}, "
                            f"{height!r:.20})")
            continue
        if not any(isinstance(im.get(key), str) and im.get(key) for key in ("file_name", "coco_url", "flickr_url")):
            problems.append(f"image {im['id']}: no file_name (or LVIS coco_url) text")
            continue
        sizes[im["id"]] = (width, height) if width is not None else None
        images.append(im)
    return images, sizes


def _usable_annotation(ann, n: int, problems: list) -> Optional[list]:
    """The annotation's bbox [x, y, w, h] when its fields can be used, else None (the problem noted)."""
    if not isinstance(ann, dict):
        problems.append(f"annotation #{n} is a {type(ann).__name__}, not an object")
        return None
    label = f"annotation {ann['id']}" if _is_id(ann.get("id")) else f"annotation #{n}"
    for key in ("id", "image_id", "category_id"):
        if not _is_id(ann.get(key)):
            problems.append(f"{label}: {key} must be a whole number (got {ann.get(key)!r:.40})")
            return None
    box = ann.get("bbox")
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(map(_is_number, box)):
        problems.append(f"{label}: bbox must be 4 finite numbers [x, y, width, height] (got {box!r:.60})")
        return None
    return list(box)


def _box_reason(ann: dict, box: list, sizes: dict, categories: dict,
                clip_boxes: bool) -> tuple[Optional[str], Optional[list]]:
    """(why the annotation is dropped or None, its box clipped to the image when that changed it)."""
    if ann["image_id"] not in sizes:
        return UNKNOWN_IMAGE, None
    if ann["category_id"] not in categories:
        return UNKNOWN_CATEGORY, None
    x, y, w, h = box
    if w <= 0 or h <= 0:
        return NOT_A_BOX, None
    size = sizes[ann["image_id"]]
    if size is None:
        return None, None
    x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + w, size[0]), min(y + h, size[1])
    if x2 <= x1 or y2 <= y1:
        return OUTSIDE, None
    if clip_boxes and (x1, y1, x2, y2) != (x, y, x + w, y + h):
        return None, [x1, y1, x2 - x1, y2 - y1]
    return None, None


class DetectionSet:
    """A COCO-format detection set (COCO, LVIS v1, the synthetic world), loaded by `load_coco` (validated;
    `clip_boxes` for a training set, `strict` to refuse a file that loses annotations). Its images must
    lie inside `images_root` unless `allow_outside_root` (see the module doc); `setting` names that
    switch in the error."""

    def __init__(self, annotations: Union[str, os.PathLike, dict], images_root: Union[str, os.PathLike, None] = None,
                 cache_images: bool = False, *, allow_outside_root: bool = False,
                 setting: str = "allow_outside_root", clip_boxes: bool = False, strict: bool = False,
                 strict_setting: str = "strict_annotations"):
        self.path = None if isinstance(annotations, dict) else Path(annotations)
        data = load_coco(annotations, clip_boxes=clip_boxes, strict=strict, strict_setting=strict_setting)
        self.data = data
        self.kind = dataset_kind(data)
        self.images_root = Path(images_root) if images_root else (self.path.parent if self.path else Path("."))
        self.categories = sorted(data.get("categories", []), key=lambda c: c["id"])
        self.category_by_id = {c["id"]: c for c in self.categories}
        self.images = list(data.get("images", []))
        self.allow_outside_root = allow_outside_root
        image_files(self.images, self.images_root, allow_outside_root=allow_outside_root, setting=setting,
                    source=str(self.path or "the annotations"))
        self.image_by_id = {im["id"]: im for im in self.images}
        self.annotations_by_image: dict[int, list[dict]] = defaultdict(list)
        for ann in data.get("annotations", []):
            self.annotations_by_image[ann["image_id"]].append(ann)
        self.category_split = category_split(self.categories)
        self._cache: Optional[dict] = {} if cache_images else None

    # -- classes ----------------------------------------------------------------------------------------
    def vocabulary(self, which: str = "all") -> DetectorClasses:
        """'all', 'base' or 'novel' categories, in id order."""
        if which == "all":
            cats = self.categories
        elif which in ("base", "novel"):
            keep = set(self.category_split[which])
            cats = [c for c in self.categories if c["id"] in keep]
        else:
            raise ValueError(f"unknown vocabulary {which!r}; use all, base or novel")
        return DetectorClasses(tuple(c["name"] for c in cats), tuple(c["id"] for c in cats))

    # -- images and boxes -------------------------------------------------------------------------------
    def image_path(self, record: dict) -> Path:
        return image_file(self.images_root, record, self.allow_outside_root)

    def load_image(self, record: dict) -> torch.Tensor:
        """float [3, H, W] in 0..1 (RGB)."""
        key = record["id"]
        if self._cache is not None and key in self._cache:
            return as_unit_range(self._cache[key])
        pixels = read_image_tensor(self.image_path(record)).contiguous()
        if self._cache is not None:
            self._cache[key] = pixels
        return as_unit_range(pixels)

    def targets(self, image_id: int, vocab: Optional[DetectorClasses] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(boxes [N, 4] xyxy original pixels, labels [N] vocabulary indices) of the non-crowd boxes
        whose category is in `vocab` (default: all categories)."""
        index = (vocab or self.vocabulary("all")).index_of()
        boxes, labels = [], []
        for ann in self.annotations_by_image.get(image_id, []):
            if ann.get("iscrowd", 0) or ann["category_id"] not in index:
                continue
            x, y, w, h = ann["bbox"]
            if w <= 1e-3 or h <= 1e-3:
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(index[ann["category_id"]])
        return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                torch.tensor(labels, dtype=torch.long))

    def image_ids_with_boxes(self, vocab: Optional[DetectorClasses] = None) -> list[int]:
        """Images with at least one usable box of `vocab` (the training images)."""
        return [im["id"] for im in self.images if len(self.targets(im["id"], vocab)[1])]

    def evaluation_image_ids(self) -> list[int]:
        """The images an evaluation runs on: every image of a COCO-style set; of an LVIS set, those with
        a box, as the reference's LVIS loader keeps them (an image without one is skipped and so gets no
        detections, which the LVIS API would otherwise count against its negative categories)."""
        if self.kind == "lvis":
            return self.image_ids_with_boxes()
        return [im["id"] for im in self.images]


class ImagesByPosition(Dataset):
    """The images of `image_ids`, item i = (i, float [3, H, W] in 0..1), read from disk when asked: a
    DataLoader over it (its sampler: the training order) reads ahead in worker processes and memory holds
    only the images in flight."""

    def __init__(self, data: DetectionSet, image_ids: Sequence[int]):
        self.data, self.image_ids = data, list(image_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor]:
        return position, self.data.load_image(self.data.image_by_id[self.image_ids[position]])


# -- augmentation -----------------------------------------------------------------------------------------

def hflip(image: torch.Tensor, *boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Mirror an image [3, H, W] and any number of xyxy box tensors."""
    width = image.shape[-1]
    flipped = [torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1) if len(b) else b
               for b in boxes]
    return (image.flip(-1), *flipped)


# -- repeat-factor sampling (LVIS) ---------------------------------------------------------------------

def repeat_factors(data: DetectionSet, image_ids: Sequence[int], threshold: float = 0.001,
                   vocab: Optional[DetectorClasses] = None) -> torch.Tensor:
    """Gupta et al. (LVIS): r(c) = max(1, sqrt(t / f(c))) with f(c) the fraction of training images
    holding category c; an image repeats r(I) = max over its categories."""
    index = (vocab or data.vocabulary("all")).index_of()
    per_image = []
    counts: dict[int, int] = defaultdict(int)
    for image_id in image_ids:
        cats = {a["category_id"] for a in data.annotations_by_image.get(image_id, [])
                if a["category_id"] in index and not a.get("iscrowd", 0)}
        per_image.append(cats)
        for c in cats:
            counts[c] += 1
    n = max(1, len(image_ids))
    cat_factor = {c: max(1.0, math.sqrt(threshold / (k / n))) for c, k in counts.items()}
    return torch.tensor([max((cat_factor[c] for c in cats), default=1.0) for cats in per_image])


def repeat_factor_epoch(factors: torch.Tensor, generator: random.Random) -> list[int]:
    """One epoch of indices: each image repeats floor(r) times plus once more with probability frac(r)
    (detectron2's RepeatFactorTrainingSampler), shuffled."""
    indices = []
    for i, r in enumerate(factors.tolist()):
        reps = int(math.floor(r)) + (1 if generator.random() < r - math.floor(r) else 0)
        indices.extend([i] * reps)
    generator.shuffle(indices)
    return indices


def training_order(num_images: int, seed: int, factors: Optional[torch.Tensor] = None) -> Iterator[int]:
    """An endless stream of image positions: shuffled epochs, repeat-factor epochs when `factors`."""
    rng = random.Random(seed)
    while True:
        if factors is not None:
            epoch = repeat_factor_epoch(factors, rng)
        else:
            epoch = list(range(num_images))
            rng.shuffle(epoch)
        if not epoch:
            raise ValueError("no training images")
        yield from epoch


# -- the COCO open-vocabulary split ------------------------------------------------------------------------

def coco_ovd_split(train: dict, val: dict) -> tuple[dict, dict]:
    """OVR-CNN's COCO split from the standard instances files: train keeps the 48 base categories'
    annotations and only images with at least one of them; val keeps the 65 categories and the images
    that hold at least one of their boxes. Categories keep their COCO ids and gain `split`."""
    names = {c["name"] for c in train["categories"]}
    missing = [n for n in COCO_OVD_BASE + COCO_OVD_NOVEL if n not in names]
    if missing:
        raise ValueError(f"not COCO instances files: categories missing: {', '.join(missing)}")

    def categories(data, wanted):
        return [{**c, "split": "novel" if c["name"] in COCO_OVD_NOVEL else "base"}
                for c in data["categories"] if c["name"] in wanted]

    def subset(data, wanted):
        cats = categories(data, wanted)
        ids = {c["id"] for c in cats}
        anns = [a for a in data["annotations"] if a["category_id"] in ids]
        with_boxes = {a["image_id"] for a in anns}
        images = [im for im in data["images"] if im["id"] in with_boxes]
        out = {k: v for k, v in data.items() if k not in ("images", "annotations", "categories")}
        out.update(images=images, annotations=anns, categories=cats)
        return out

    return subset(train, set(COCO_OVD_BASE)), subset(val, set(COCO_OVD_BASE + COCO_OVD_NOVEL))


def write_coco_ovd_split(train_json: Union[str, os.PathLike], val_json: Union[str, os.PathLike],
                         out_dir: Union[str, os.PathLike, None] = None, *,
                         train_out: Union[str, os.PathLike, None] = None,
                         val_out: Union[str, os.PathLike, None] = None) -> dict:
    """Write the split: to `train_out` / `val_out`, or into `out_dir` as
    instances_train2017_base48.json and instances_val2017_ovd65.json. Compact JSON, atomic writes."""
    from pipeline.io import write_bytes

    if train_out is None or val_out is None:
        if out_dir is None:
            raise ValueError("give out_dir, or both train_out and val_out")
        train_out = Path(out_dir) / "instances_train2017_base48.json"
        val_out = Path(out_dir) / "instances_val2017_ovd65.json"
    train = json.loads(Path(train_json).read_text(encoding="utf-8"))
    val = json.loads(Path(val_json).read_text(encoding="utf-8"))
    train_split, val_split = coco_ovd_split(train, val)
    for path, data in ((train_out, train_split), (val_out, val_split)):
        write_bytes(path, json.dumps(data, separators=(",", ":")).encode("utf-8"))
    return {"train": str(train_out), "val": str(val_out),
            "train_images": len(train_split["images"]), "train_annotations": len(train_split["annotations"]),
            "val_images": len(val_split["images"]), "val_annotations": len(val_split["annotations"]),
            "base": len(COCO_OVD_BASE), "novel": len(COCO_OVD_NOVEL)}
