"""Scenes of the synthetic world: a cluttered background plus mostly non-overlapping objects.

Every image is drawn from its own random generator seeded by (seed, split, index), so
`render_scene(cfg, split, index)` re-creates any single image (with its objects, caption and clean
background) in memory, and the files of a world do not depend on how many images are made.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from pipeline.config import SynthConfig
from pipeline.synth.captions import make_caption
from pipeline.synth.shapes import CATEGORIES, CATEGORY_ASPECT, SceneObject, draw_object

SPLIT_CODES = {"train": 0, "val": 1}
MIN_OBJECT_SIDE = 20    # px; objects are drawn at least this big on both sides ...
MIN_BOX_SHORT, MIN_BOX_LONG = 16, 24   # ... and every box keeps at least these sides after rotation
MAX_OVERLAP = 0.12      # a new object may cover at most this share of an existing one (and vice versa)


@dataclass
class Scene:
    image: Image.Image                  # RGB, the picture as written (before JPEG)
    background: Image.Image             # the same picture without its objects
    objects: list[SceneObject] = field(default_factory=list)
    caption: str = ""


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # One generator per image: random access, and files do not depend on how many images are made.
    return np.random.default_rng([seed % 2**64, SPLIT_CODES[split], index])


def _image_size(cfg: SynthConfig, rng) -> tuple[int, int]:
    """Landscape, portrait or square, both sides within [min_side, max_side]."""
    long_side = int(rng.integers(cfg.min_side, cfg.max_side + 1))
    ratio = rng.choice([1.0, 1.25, 4 / 3, 1.5, 16 / 9, 2.0])
    short_side = int(np.clip(round(long_side / ratio), cfg.min_side, long_side))
    return (long_side, short_side) if rng.random() < 0.6 else (short_side, long_side)


def _muted_colour(rng, low=70, high=235) -> np.ndarray:
    grey = rng.uniform(low, high)
    return np.clip(grey + rng.uniform(-35, 35, size=3), 0, 255)


def _background(width: int, height: int, rng) -> Image.Image:
    """A gradient with noise, thin lines and translucent blobs: clutter that is no category."""
    start, end = _muted_colour(rng), _muted_colour(rng)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = xs * math.cos(angle) + ys * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    pixels = start + (end - start) * ramp[..., None]
    pixels += rng.normal(0.0, rng.uniform(2, 9), size=(height, width, 1))          # grain
    pixels += rng.normal(0.0, 3.0, size=(height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")

    draw = ImageDraw.Draw(image, "RGBA")
    for _ in range(rng.integers(2, 7)):                       # irregular blobs, never round
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(8, 0.25 * min(width, height))
        corners = int(rng.integers(5, 9))
        angles = np.sort(rng.uniform(0, 2 * math.pi, corners))
        radii = radius * rng.uniform(0.35, 1.0, corners)
        points = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a, r in zip(angles, radii)]
        draw.polygon(points, fill=(*_muted_colour(rng).astype(int).tolist(), int(rng.integers(50, 140))))
    for _ in range(rng.integers(3, 11)):                      # thin straight and bent lines
        points = [(rng.uniform(0, width), rng.uniform(0, height)) for _ in range(rng.integers(2, 4))]
        draw.line(points, fill=(*_muted_colour(rng, 30, 230).astype(int).tolist(),
                                int(rng.integers(80, 210))), width=int(rng.integers(1, 3)))
    return image


def _overlaps(box, placed) -> bool:
    x, y, w, h = box
    for px, py, pw, ph in placed:
        ix = max(0, min(x + w, px + pw) - max(x, px))
        iy = max(0, min(y + h, py + ph) - max(y, py))
        if ix * iy > MAX_OVERLAP * min(w * h, pw * ph):
            return True
    return False


def _object_size(name: str, image_size: tuple[int, int], count: int, rng) -> tuple[int, int]:
    """A (width, height) around the category's aspect; bigger when the image holds fewer objects."""
    short = min(image_size)
    largest = short * (0.62 if count == 1 else 0.5 if count <= 2 else 0.4)
    smallest = max(MIN_OBJECT_SIDE * 1.4, 0.14 * short)
    size = math.exp(rng.uniform(math.log(smallest), math.log(max(largest, smallest + 1))))
    aspect = CATEGORY_ASPECT[name] * math.exp(rng.uniform(-0.18, 0.18))
    width, height = size * math.sqrt(aspect), size / math.sqrt(aspect)
    grow = max(1.0, MIN_OBJECT_SIDE / min(width, height))            # thin shapes: keep >= 20 px
    width, height = width * grow, height * grow
    fit = min(1.0, 0.95 * image_size[0] / width, 0.95 * image_size[1] / height)
    return max(MIN_OBJECT_SIDE, round(width * fit)), max(MIN_OBJECT_SIDE, round(height * fit))


def render_scene(cfg: SynthConfig, split: str, index: int) -> Scene:
    """Image `index` of `split` ("train": the caption corpus, "val": held out), with its caption."""
    rng = _image_rng(cfg.seed, split, index)
    width, height = _image_size(cfg, rng)
    background = _background(width, height, rng)
    image = background.copy()

    wanted = int(rng.integers(1, cfg.max_objects + 1))
    names = [str(rng.choice(CATEGORIES))]
    while len(names) < wanted:
        # Repeats are likelier than chance so that captions get counts ("two red apples").
        names.append(str(rng.choice(names)) if rng.random() < 0.3 else str(rng.choice(CATEGORIES)))
    placed: list[tuple[int, int, int, int]] = []
    objects: list[SceneObject] = []
    for name in names:
        for attempt in range(12):
            # Each failed attempt shrinks the object a little, so crowded images still fill up.
            w, h = _object_size(name, (width, height), wanted + attempt // 3, rng)
            picture = draw_object(name, (w, h), rng, angle=float(rng.uniform(-15, 15)))
            pw, ph = picture.size
            if pw >= width or ph >= height or min(pw, ph) < MIN_BOX_SHORT or max(pw, ph) < MIN_BOX_LONG:
                continue
            x, y = int(rng.integers(0, width - pw + 1)), int(rng.integers(0, height - ph + 1))
            if _overlaps((x, y, pw, ph), placed):
                continue
            image.paste(picture, (x, y), picture)
            placed.append((x, y, pw, ph))
            area = int((np.asarray(picture.getchannel("A")) >= 128).sum())
            objects.append(SceneObject(name, (x, y, pw, ph), area))
            break
    if not objects:    # cannot happen with sane sizes, but an image must hold an object
        raise RuntimeError(f"synth: could not place any object in {split} image {index} "
                           f"({width}x{height}); raise synth.min_side")
    scene = Scene(image, background, objects)
    scene.caption = make_caption(objects, (width, height), rng)
    return scene

