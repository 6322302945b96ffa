"""The synthetic open-vocabulary world: images, CC3M-style captions and COCO boxes, made offline.

The project has no downloadable data or weights, so this generator makes a small world in which every
stage, and the paper's central claim, can be run on a CPU: a caption corpus whose captions teach all
categories, a detection train set with boxes of the *base* categories only, and a held-out set with
every category boxed.

Categories (24, ids 1..24 in this order; each is a shape x dominant colour x pattern):
    apple banana kite star heart umbrella cup tree house car fish ball clock bottle key flower
    mushroom boat bell hat cloud book carrot sun
Base/novel split: the first `num_novel` names of NOVEL_ORDER are novel; the order does not depend on
the seed. With the default `num_novel: 6` the novel categories are
    umbrella cup mushroom clock boat key
and the other 18 are base. Novel categories appear in the corpus images and captions (captions are
how an open-vocabulary model learns them) but never have boxes in `instances_train.json`.

World folder (every file is written to a temporary name and renamed; `world.json` is written last and
marks the world complete; a world whose `world.json` matches the config is not regenerated):
    images/000000.jpg ...       the caption corpus (JPEG quality 95)
    val_images/000000.jpg ...   held-out images
    captions.tsv                header `caption<TAB>url`, one row per corpus image, url relative to here
    instances_train.json        COCO format over images/, base-category boxes only
    instances_val.json          COCO format over val_images/, all categories boxed
    categories.json             [{id, name, split}], ids from 1
    world.json                  config, generator version and file counts

Images are min_side..max_side px on each side (landscape, portrait, square) with 1..max_objects
mostly non-overlapping objects (every box at least 24 px on its long side and 16 px on its short side)
over a cluttered background. Corpus images holding only novel objects stay in `instances_train.json`
with no annotations. Held-out images have no captions.

Every image is drawn from its own random generator seeded by (seed, split, index), so a world is
byte-identical for the same seed, a small world is a prefix of a larger one with the same seed, and
`render_scene(cfg, split, index)` re-creates any single image (with its objects, caption and clean
background) in memory.
"""
from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from pipeline.config import SynthConfig
from pipeline.io import atomic_path, write_bytes

# Bump when the drawing or captions change, so old worlds on disk are regenerated.
GENERATOR_VERSION = 1

CATEGORIES: tuple[str, ...] = (
    "apple", "banana", "kite", "star", "heart", "umbrella", "cup", "tree", "house", "car", "fish",
    "ball", "clock", "bottle", "key", "flower", "mushroom", "boat", "bell", "hat", "cloud", "book",
    "carrot", "sun",
)

# Which categories become novel first. Fixed (never shuffled by the seed) so that a split named in a
# report means the same categories in every run.
NOVEL_ORDER: tuple[str, ...] = (
    "umbrella", "cup", "mushroom", "clock", "boat", "key",
    "kite", "bell", "carrot", "heart", "fish", "book",
    "apple", "banana", "star", "tree", "house", "car", "ball", "bottle", "flower", "hat", "cloud", "sun",
)

# Plurals as a caption writes them; all are plurals that spaCy's English lookup lemmatizer maps back.
PLURALS: dict[str, str] = {name: name + "s" for name in CATEGORIES}
PLURALS.update({"fish": "fish", "house": "houses"})

# Words a caption may use to describe each category (its dominant colour, mostly).
CATEGORY_ADJECTIVES: dict[str, tuple[str, ...]] = {
    "apple": ("red", "ripe", "fresh", "juicy"), "banana": ("yellow", "ripe", "curved"),
    "kite": ("colorful", "flying", "red and blue"), "star": ("yellow", "golden", "bright"),
    "heart": ("pink", "red", "lovely"), "umbrella": ("purple", "open", "violet"),
    "cup": ("white", "ceramic", "teal"), "tree": ("green", "tall", "pine"),
    "house": ("little", "cozy", "brown"), "car": ("blue", "toy", "fast"),
    "fish": ("orange", "striped", "tropical"), "ball": ("striped", "colorful", "round"),
    "clock": ("white", "round", "old"), "bottle": ("green", "glass", "tall"),
    "key": ("silver", "metal", "old"), "flower": ("pink", "purple", "blooming"),
    "mushroom": ("red", "spotted", "wild"), "boat": ("wooden", "sailing", "brown"),
    "bell": ("golden", "bronze", "shiny"), "hat": ("black", "tall", "elegant"),
    "cloud": ("white", "fluffy", "soft"), "book": ("blue", "closed", "old"),
    "carrot": ("orange", "fresh", "crunchy"), "sun": ("yellow", "bright", "smiling"),
}

# Natural width/height of each drawing; every instance varies around it.
CATEGORY_ASPECT: dict[str, float] = {
    "apple": 1.0, "banana": 1.9, "kite": 0.6, "star": 1.0, "heart": 1.05, "umbrella": 1.0,
    "cup": 1.15, "tree": 0.7, "house": 0.95, "car": 1.8, "fish": 1.7, "ball": 1.0, "clock": 1.0,
    "bottle": 0.4, "key": 2.3, "flower": 0.6, "mushroom": 1.0, "boat": 1.1, "bell": 0.9, "hat": 1.15,
    "cloud": 1.7, "book": 0.75, "carrot": 0.42, "sun": 1.0,
}

SPLIT_CODES = {"train": 0, "val": 1}
MIN_OBJECT_SIDE = 20    # px; objects are drawn at least this big on both sides ...
MIN_BOX_SHORT, MIN_BOX_LONG = 16, 24   # ... and every box keeps at least these sides after rotation
SUPERSAMPLE = 2         # objects are drawn at 2x and reduced, for smooth edges
MAX_OVERLAP = 0.12      # a new object may cover at most this share of an existing one (and vice versa)


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
# Drawing objects
# ---------------------------------------------------------------------------------------------------

class _Sketch:
    """A transparent canvas addressed in unit coordinates: (0, 0) top left, (1, 1) bottom right.

    Shapes are written straight into the RGBA pixels (no blending), so `erase_*` cuts holes.
    `shade` turns a nominal colour into this instance's jittered shade.
    """

    def __init__(self, width: int, height: int, shade: Callable[[tuple], tuple]):
        self.w, self.h = width, height
        self.image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
        self.draw = ImageDraw.Draw(self.image)
        self.shade = shade

    def xy(self, points):
        return [(x * self.w, y * self.h) for x, y in points]

    def box(self, x0, y0, x1, y1):
        return [x0 * self.w, y0 * self.h, x1 * self.w, y1 * self.h]

    def px(self, width: float) -> int:
        """A line width given as a share of the shorter side."""
        return max(1, round(width * min(self.w, self.h)))

    def poly(self, points, colour, outline=None, width=0.0):
        self.draw.polygon(self.xy(points), fill=self.shade(colour),
                          outline=self.shade(outline) if outline else None,
                          width=self.px(width) if outline else 0)

    def ellipse(self, x0, y0, x1, y1, colour, outline=None, width=0.0):
        self.draw.ellipse(self.box(x0, y0, x1, y1), fill=self.shade(colour) if colour else None,
                          outline=self.shade(outline) if outline else None,
                          width=self.px(width) if outline else 0)

    def rect(self, x0, y0, x1, y1, colour, radius=0.0):
        self.draw.rounded_rectangle(self.box(x0, y0, x1, y1), radius=radius * min(self.w, self.h),
                                    fill=self.shade(colour))

    def line(self, points, colour, width):
        self.draw.line(self.xy(points), fill=self.shade(colour), width=self.px(width), joint="curve")

    def pieslice(self, x0, y0, x1, y1, start, end, colour):
        self.draw.pieslice(self.box(x0, y0, x1, y1), start, end, fill=self.shade(colour))

    def circle_px(self, cx, cy, radius, colour):
        """A true circle (radius in pixels) centred at unit point (cx, cy), whatever the aspect."""
        x, y = cx * self.w, cy * self.h
        self.draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=self.shade(colour))

    def erase_ellipse(self, x0, y0, x1, y1):
        self.draw.ellipse(self.box(x0, y0, x1, y1), fill=(0, 0, 0, 0))


def _curve(fn, n=24):
    return [fn(t) for t in np.linspace(0.0, 1.0, n)]


def _apple(s: _Sketch, rng):
    s.ellipse(0.04, 0.16, 0.96, 1.0, (205, 25, 30))
    s.ellipse(0.2, 0.3, 0.36, 0.5, (245, 140, 140))                        # shine
    s.line([(0.5, 0.3), (0.47, 0.02)], (100, 60, 20), 0.07)                 # stem
    s.poly([(0.52, 0.16), (0.68, 0.02), (0.9, 0.04), (0.74, 0.18)], (40, 160, 40))   # leaf


def _banana(s: _Sketch, rng):
    def centre(t):
        return 0.06 + 0.88 * t, 0.3 + 0.42 * math.sin(math.pi * t)

    def thickness(t):
        return 0.08 + 0.5 * math.sin(math.pi * t) ** 0.7

    upper = _curve(lambda t: (centre(t)[0], centre(t)[1] - thickness(t) / 2))
    lower = _curve(lambda t: (centre(t)[0], centre(t)[1] + thickness(t) / 2))
    s.poly(upper + lower[::-1], (240, 210, 40), outline=(190, 150, 20), width=0.04)
    s.line(_curve(lambda t: (centre(0.15 + 0.7 * t)[0], centre(0.15 + 0.7 * t)[1] + 0.06), 12),
           (205, 170, 25), 0.04)                                          # the ridge
    for t in (0.0, 1.0):                                                    # brown tips
        x, y = centre(t)
        s.ellipse(x - 0.04, y - 0.07, x + 0.04, y + 0.07, (90, 60, 20))


def _kite(s: _Sketch, rng):
    top, left, right, bottom, mid = (0.5, 0.0), (0.0, 0.26), (1.0, 0.26), (0.5, 0.66), (0.5, 0.26)
    s.poly([top, right, mid], (220, 30, 40))
    s.poly([top, left, mid], (40, 80, 210))
    s.poly([bottom, right, mid], (40, 80, 210))
    s.poly([bottom, left, mid], (220, 30, 40))
    s.line([top, bottom], (60, 40, 30), 0.04)
    s.line([left, right], (60, 40, 30), 0.04)
    tail = _curve(lambda t: (0.5 + 0.18 * math.sin(t * 3 * math.pi), 0.66 + 0.34 * t), 16)
    s.line(tail, (60, 40, 30), 0.03)
    for i, (x, y) in enumerate(tail[4::4]):
        s.poly([(x - 0.14, y - 0.03), (x + 0.14, y + 0.03), (x + 0.14, y - 0.03), (x - 0.14, y + 0.03)],
               (250, 200, 30) if i % 2 else (220, 30, 40))


def _star(s: _Sketch, rng):
    points = []
    for k in range(10):
        angle = -math.pi / 2 + k * math.pi / 5
        radius = 0.5 if k % 2 == 0 else 0.21
        points.append((0.5 + radius * math.cos(angle), 0.54 + radius * 1.04 * math.sin(angle)))
    s.poly(points, (250, 205, 30), outline=(220, 130, 10), width=0.04)


def _heart(s: _Sketch, rng):
    def point(t):
        a = 2 * math.pi * t
        x = 16 * math.sin(a) ** 3
        y = 13 * math.cos(a) - 5 * math.cos(2 * a) - 2 * math.cos(3 * a) - math.cos(4 * a)
        return 0.5 + x / 34, 0.43 - y / 34
    s.poly(_curve(point, 48), (235, 60, 120), outline=(170, 20, 70), width=0.03)
    s.ellipse(0.2, 0.2, 0.34, 0.34, (250, 170, 200))                        # shine


def _umbrella(s: _Sketch, rng):
    colours = [(130, 40, 170), (200, 170, 230)]
    for k in range(6):
        s.pieslice(0.0, 0.02, 1.0, 1.0, 180 + 30 * k, 210 + 30 * k, colours[k % 2])
    for k in range(6):                                                      # scalloped hem
        s.erase_ellipse(k / 6, 0.44, (k + 1) / 6, 0.58)
    s.line([(0.5, 0.02), (0.5, 0.88)], (50, 40, 40), 0.05)
    s.line(_curve(lambda t: (0.5 - 0.13 + 0.13 * math.cos(math.pi * t),
                             0.88 + 0.1 * math.sin(math.pi * t)), 10), (50, 40, 40), 0.05)


def _cup(s: _Sketch, rng):
    s.ellipse(0.55, 0.28, 0.98, 0.76, None, outline=(235, 240, 240), width=0.1)   # handle
    s.poly([(0.04, 0.12), (0.74, 0.12), (0.66, 0.98), (0.12, 0.98)], (240, 245, 245),
           outline=(120, 130, 140), width=0.03)
    s.poly([(0.07, 0.45), (0.71, 0.45), (0.69, 0.62), (0.09, 0.62)], (20, 150, 150))   # band
    s.ellipse(0.04, 0.04, 0.74, 0.2, (110, 60, 30), outline=(120, 130, 140), width=0.03)  # coffee


def _tree(s: _Sketch, rng):
    s.rect(0.4, 0.72, 0.6, 1.0, (110, 70, 30))
    for k, (top, base) in enumerate([(0.0, 0.38), (0.18, 0.58), (0.36, 0.8)]):
        half = 0.3 + 0.1 * k
        s.poly([(0.5, top), (0.5 + half, base), (0.5 - half, base)], (30, 120 + 15 * k, 45))


def _house(s: _Sketch, rng):
    s.rect(0.1, 0.45, 0.9, 1.0, (225, 200, 150))
    s.poly([(0.0, 0.5), (0.5, 0.02), (1.0, 0.5)], (170, 50, 30))
    s.rect(0.42, 0.66, 0.6, 1.0, (100, 60, 30))
    s.rect(0.17, 0.56, 0.35, 0.74, (150, 200, 240))
    s.line([(0.26, 0.56), (0.26, 0.74)], (90, 70, 50), 0.025)
    s.line([(0.17, 0.65), (0.35, 0.65)], (90, 70, 50), 0.025)
    s.rect(0.68, 0.12, 0.8, 0.35, (120, 110, 110))                         # chimney


def _car(s: _Sketch, rng):
    s.poly([(0.22, 0.42), (0.34, 0.06), (0.7, 0.06), (0.84, 0.42)], (35, 85, 200))
    s.poly([(0.3, 0.4), (0.38, 0.14), (0.5, 0.14), (0.5, 0.4)], (180, 220, 245))
    s.poly([(0.54, 0.4), (0.54, 0.14), (0.67, 0.14), (0.76, 0.4)], (180, 220, 245))
    s.rect(0.0, 0.38, 1.0, 0.8, (35, 85, 200), radius=0.12)
    s.rect(0.92, 0.46, 1.0, 0.56, (250, 230, 120))                         # headlight
    for x in (0.24, 0.76):
        s.circle_px(x, 0.8, 0.2 * s.h, (25, 25, 25))
        s.circle_px(x, 0.8, 0.09 * s.h, (170, 170, 175))


def _fish(s: _Sketch, rng):
    s.poly([(0.66, 0.5), (1.0, 0.08), (0.94, 0.5), (1.0, 0.92)], (240, 110, 20))
    s.ellipse(0.0, 0.12, 0.78, 0.88, (245, 120, 20))
    for x in (0.3, 0.52):                                                   # white bands
        s.poly([(x, 0.16), (x + 0.07, 0.16), (x + 0.1, 0.84), (x + 0.03, 0.84)], (250, 250, 245))
    s.circle_px(0.16, 0.4, 0.1 * s.h, (255, 255, 255))
    s.circle_px(0.16, 0.4, 0.05 * s.h, (10, 10, 10))


def _ball(s: _Sketch, rng):
    colours = [(220, 30, 40), (250, 250, 250), (30, 90, 220), (250, 250, 250), (250, 200, 20),
               (250, 250, 250)]
    offset = rng.uniform(0, 60)
    for k, colour in enumerate(colours):
        s.pieslice(0.0, 0.0, 1.0, 1.0, offset + 60 * k, offset + 60 * (k + 1), colour)
    s.ellipse(0.0, 0.0, 1.0, 1.0, None, outline=(90, 90, 90), width=0.03)
    s.ellipse(0.42, 0.42, 0.58, 0.58, (250, 250, 250))


def _clock(s: _Sketch, rng):
    s.ellipse(0.0, 0.0, 1.0, 1.0, (30, 30, 35))
    s.ellipse(0.08, 0.08, 0.92, 0.92, (250, 248, 235))
    for k in range(12):
        a = k * math.pi / 6
        inner = 0.34 if k % 3 else 0.28
        s.line([(0.5 + inner * math.cos(a), 0.5 + inner * math.sin(a)),
                (0.5 + 0.4 * math.cos(a), 0.5 + 0.4 * math.sin(a))], (30, 30, 35), 0.03)
    hour, minute = rng.uniform(0, 2 * math.pi, size=2)
    s.line([(0.5, 0.5), (0.5 + 0.22 * math.sin(hour), 0.5 - 0.22 * math.cos(hour))], (20, 20, 25), 0.07)
    s.line([(0.5, 0.5), (0.5 + 0.34 * math.sin(minute), 0.5 - 0.34 * math.cos(minute))], (20, 20, 25),
           0.045)
    s.ellipse(0.45, 0.45, 0.55, 0.55, (200, 30, 30))


def _bottle(s: _Sketch, rng):
    s.rect(0.05, 0.34, 0.95, 1.0, (30, 130, 60), radius=0.2)
    s.poly([(0.05, 0.4), (0.32, 0.22), (0.68, 0.22), (0.95, 0.4)], (30, 130, 60))
    s.rect(0.32, 0.06, 0.68, 0.3, (30, 130, 60))
    s.rect(0.28, 0.0, 0.72, 0.08, (200, 170, 40), radius=0.05)              # cap
    s.rect(0.05, 0.55, 0.95, 0.78, (240, 235, 215))                         # label
    s.rect(0.2, 0.37, 0.3, 0.9, (110, 200, 130), radius=0.1)                # glint


def _key(s: _Sketch, rng):
    metal, dark = (175, 180, 190), (90, 95, 105)
    s.ellipse(0.0, 0.04, 0.38, 0.96, metal, outline=dark, width=0.06)
    s.erase_ellipse(0.09, 0.32, 0.24, 0.68)                                 # the ring's hole
    s.rect(0.34, 0.38, 1.0, 0.6, metal)
    for x0, x1, depth in ((0.66, 0.74, 0.9), (0.78, 0.84, 0.8), (0.88, 0.97, 0.95)):
        s.rect(x0, 0.55, x1, depth, metal)
    s.line([(0.36, 0.49), (0.96, 0.49)], dark, 0.06)


def _flower(s: _Sketch, rng):
    s.line([(0.5, 0.35), (0.5, 1.0)], (40, 140, 50), 0.1)
    s.poly([(0.5, 0.75), (0.9, 0.58), (0.75, 0.78)], (50, 160, 60))
    s.poly([(0.5, 0.85), (0.1, 0.68), (0.25, 0.88)], (50, 160, 60))
    radius = min(0.5 * s.w, 0.3 * s.h)
    cx, cy = 0.5, radius / s.h
    for k in range(6):
        a = k * math.pi / 3 + 0.3
        s.circle_px(cx + 0.55 * radius * math.cos(a) / s.w, cy + 0.55 * radius * math.sin(a) / s.h,
                    0.45 * radius, (215, 70, 190))
    s.circle_px(cx, cy, 0.35 * radius, (250, 210, 40))


def _mushroom(s: _Sketch, rng):
    s.rect(0.32, 0.45, 0.68, 1.0, (235, 220, 190), radius=0.08)
    s.pieslice(0.0, 0.0, 1.0, 1.1, 180, 360, (205, 25, 25))
    for x, y, r in ((0.25, 0.32, 0.07), (0.5, 0.14, 0.08), (0.72, 0.3, 0.07), (0.42, 0.38, 0.05),
                    (0.12, 0.47, 0.04), (0.88, 0.47, 0.04)):
        s.circle_px(x, y, r * min(s.w, s.h), (250, 250, 250))


def _boat(s: _Sketch, rng):
    s.line([(0.5, 0.0), (0.5, 0.72)], (70, 50, 30), 0.04)
    s.poly([(0.53, 0.04), (0.53, 0.64), (0.92, 0.64)], (248, 248, 240))
    s.poly([(0.47, 0.14), (0.47, 0.64), (0.14, 0.64)], (230, 230, 220))
    s.poly([(0.5, 0.0), (0.64, 0.05), (0.5, 0.1)], (220, 30, 30))             # flag
    s.poly([(0.0, 0.7), (1.0, 0.7), (0.82, 1.0), (0.18, 1.0)], (140, 80, 35))
    s.line([(0.06, 0.8), (0.94, 0.8)], (100, 55, 25), 0.04)                  # planks


def _bell(s: _Sketch, rng):
    outline = _curve(lambda t: (0.5 + (0.18 + 0.32 * t ** 2.2) * 1.0, 0.14 + 0.7 * t), 14)
    left = [(1.0 - x, y) for x, y in outline]
    s.poly([(0.5, 0.08)] + outline + [(1.0, 0.86), (0.0, 0.86)] + left[::-1], (210, 160, 40),
           outline=(150, 100, 20), width=0.03)
    s.ellipse(0.3, 0.04, 0.7, 0.3, (210, 160, 40))                          # crown
    s.ellipse(0.44, 0.0, 0.56, 0.1, None, outline=(150, 100, 20), width=0.04)  # loop
    s.rect(0.0, 0.8, 1.0, 0.88, (180, 130, 30), radius=0.03)
    s.circle_px(0.5, 0.91, 0.08 * min(s.w, s.h), (90, 60, 20))              # clapper
    s.rect(0.28, 0.3, 0.36, 0.72, (245, 215, 120), radius=0.03)              # shine


def _hat(s: _Sketch, rng):
    s.ellipse(0.0, 0.78, 1.0, 1.0, (30, 30, 35))
    s.rect(0.2, 0.02, 0.8, 0.9, (30, 30, 35), radius=0.04)
    s.rect(0.2, 0.62, 0.8, 0.76, (200, 30, 40))                             # band
    s.rect(0.26, 0.06, 0.32, 0.58, (80, 80, 90))                            # sheen


def _cloud(s: _Sketch, rng):
    puffs = [(0.02, 0.45, 0.38, 0.98), (0.18, 0.18, 0.58, 0.9), (0.42, 0.02, 0.82, 0.8),
             (0.62, 0.35, 0.98, 0.98), (0.2, 0.5, 0.8, 1.0)]
    for box in puffs:                                                       # grey rim first
        s.ellipse(*box, (150, 170, 200))
    for x0, y0, x1, y1 in puffs:
        s.ellipse(x0 + 0.03, y0 + 0.05, x1 - 0.03, y1 - 0.05, (252, 252, 255))


def _book(s: _Sketch, rng):
    s.rect(0.08, 0.02, 1.0, 1.0, (245, 240, 225), radius=0.03)              # pages
    for y in np.linspace(0.1, 0.9, 6):
        s.line([(0.9, y), (0.99, y)], (180, 175, 160), 0.015)
    s.rect(0.0, 0.0, 0.9, 1.0, (25, 70, 150), radius=0.03)                  # cover
    s.rect(0.0, 0.0, 0.14, 1.0, (15, 45, 105))                              # spine
    s.rect(0.3, 0.18, 0.78, 0.26, (245, 210, 90))                           # title
    s.rect(0.36, 0.32, 0.72, 0.37, (245, 210, 90))


def _carrot(s: _Sketch, rng):
    for dx in (-0.22, 0.0, 0.22):
        s.poly([(0.5, 0.3), (0.5 + dx - 0.12, 0.0), (0.5 + dx + 0.12, 0.02)], (40, 150, 40))
    s.poly([(0.1, 0.28), (0.9, 0.28), (0.55, 1.0), (0.45, 1.0)], (245, 125, 20))
    s.ellipse(0.1, 0.22, 0.9, 0.36, (245, 125, 20))
    for y in (0.45, 0.6, 0.75):                                             # ridges
        half = 0.4 * (1.0 - (y - 0.28) / 0.72)
        s.line([(0.5 - half * 0.7, y), (0.5 + half * 0.2, y + 0.02)], (190, 80, 10), 0.08)


def _sun(s: _Sketch, rng):
    for k in range(12):
        a = k * math.pi / 6
        tip = (0.5 + 0.5 * math.cos(a), 0.5 + 0.5 * math.sin(a))
        side1 = (0.5 + 0.3 * math.cos(a - 0.2), 0.5 + 0.3 * math.sin(a - 0.2))
        side2 = (0.5 + 0.3 * math.cos(a + 0.2), 0.5 + 0.3 * math.sin(a + 0.2))
        s.poly([side1, tip, side2], (250, 190, 30))
    s.ellipse(0.2, 0.2, 0.8, 0.8, (250, 150, 20), outline=(235, 110, 10), width=0.03)
    s.ellipse(0.3, 0.28, 0.48, 0.44, (255, 205, 90))                        # shine


_DRAWERS: dict[str, Callable] = {
    "apple": _apple, "banana": _banana, "kite": _kite, "star": _star, "heart": _heart,
    "umbrella": _umbrella, "cup": _cup, "tree": _tree, "house": _house, "car": _car, "fish": _fish,
    "ball": _ball, "clock": _clock, "bottle": _bottle, "key": _key, "flower": _flower,
    "mushroom": _mushroom, "boat": _boat, "bell": _bell, "hat": _hat, "cloud": _cloud, "book": _book,
    "carrot": _carrot, "sun": _sun,
}
assert set(_DRAWERS) == set(CATEGORIES) == set(NOVEL_ORDER) == set(CATEGORY_ADJECTIVES)


def _shade_jitter(rng: np.random.Generator) -> Callable[[tuple], tuple]:
    """One instance's shade: a brightness factor and a small colour cast applied to all its parts."""
    brightness = rng.uniform(0.82, 1.12)
    cast = rng.uniform(-14, 14, size=3)

    def shade(colour):
        rgb = np.clip(np.asarray(colour[:3], float) * brightness + cast, 0, 255).round().astype(int)
        return (*rgb.tolist(), 255)
    return shade


def draw_object(name: str, size: tuple[int, int], rng: np.random.Generator,
                angle: float = 0.0) -> Image.Image:
    """An RGBA picture of one `name` instance about `size` = (width, height) px, cropped to the object.

    Shade is jittered and the picture is rotated by `angle` degrees; the returned image's extent is the
    object's tight box (pixels with alpha >= 128).
    """
    width, height = size
    sketch = _Sketch(width * SUPERSAMPLE, height * SUPERSAMPLE, _shade_jitter(rng))
    _DRAWERS[name](sketch, rng)
    picture = sketch.image.resize((width, height), Image.LANCZOS)
    if angle:
        picture = picture.rotate(angle, resample=Image.BICUBIC, expand=True)
    solid = picture.getchannel("A").point(lambda a: 255 if a >= 128 else 0)
    return picture.crop(solid.getbbox())


# ---------------------------------------------------------------------------------------------------
# Scenes: background clutter plus non-overlapping objects
# ---------------------------------------------------------------------------------------------------

@dataclass
class SceneObject:
    name: str
    box: tuple[int, int, int, int]      # x, y, w, h in pixels
    area: int                           # opaque pixels


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


# ---------------------------------------------------------------------------------------------------
# Captions: CC3M-style, noisy, naming some or all objects
# ---------------------------------------------------------------------------------------------------

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
BACKGROUNDS = ("white", "blue", "abstract", "colorful", "grunge", "gradient", "blurred", "light",
               "dark", "pastel", "textured")
STYLES = ("watercolor", "pop art", "flat design", "pixel art", "sketch", "retro poster", "minimal",
          "comic")
GENERAL_ADJECTIVES = ("cute", "shiny", "cartoon", "simple", "bright", "hand drawn", "funny")

# `{objects}`: the object phrases joined; `{bg}` and `{style}`: distractor words.
CAPTION_TEMPLATES = (
    "{objects}",
    "a photo of {objects}",
    "{objects} on a {bg} background",
    "illustration of {objects} in the style of {style}",
    "stock image of {objects}",
    "{objects} isolated on {bg} background",
    "cartoon {objects} on a beautiful day",
    "view of {objects} against a {bg} background",
    "{objects}. vector illustration",
    "close up of {objects}",
    "there are {objects} in this picture",
    "a drawing with {objects}",
    "{objects}, {style} style",
    "clip art : {objects}",
    "wallpaper with {objects} and abstract lines",
    "{objects} -- stock photo",
    "beautiful {objects} on the {bg} background , {style} illustration",
    "a picture showing {objects}",
    "image may contain : {objects}",
    "on a {bg} background : {objects}",
    "{style} art of {objects} , nice view",
    "my favourite : {objects} ! #art #design",
)
JOINERS = (" and ", " with ", " next to ", ", ", " , ")


def _count_words(count: int, rng) -> str:
    if count == 2 and rng.random() < 0.25:
        return rng.choice(["a pair of", "a couple of"])
    if count >= 3 and rng.random() < 0.25:
        return rng.choice(["several", "some", "a group of", "many"])
    return str(count) if rng.random() < 0.2 else NUMBER_WORDS[count]


def _object_phrase(name: str, count: int, relative_size: float, rng) -> str:
    """'two red apples', 'a small banana', 'the fish', 'apples' ..."""
    adjectives = []
    if rng.random() < 0.45:
        adjectives.append(str(rng.choice(CATEGORY_ADJECTIVES[name])))
    if rng.random() < 0.2:
        adjectives.append("small" if relative_size < 0.25 else "large" if relative_size > 0.45
                          else "little")
    elif rng.random() < 0.15:
        adjectives.append(str(rng.choice(GENERAL_ADJECTIVES)))
    noun = name if count == 1 else PLURALS[name]
    words = " ".join(adjectives + [noun])
    if count == 1:
        roll = rng.random()
        if roll < 0.15:
            return words                                            # article dropped
        if roll < 0.3:
            return "the " + words
        if roll < 0.4:
            return "one " + words
        return ("an " if words[0] in "aeiou" else "a ") + words
    return words if rng.random() < 0.15 else f"{_count_words(count, rng)} {words}"


def make_caption(objects: list[SceneObject], image_size: tuple[int, int], rng) -> str:
    """A noisy CC3M-style caption that names at least one of `objects` (counts, plurals, adjectives)."""
    counts: dict[str, int] = {}
    sizes: dict[str, float] = {}
    for obj in objects:
        counts[obj.name] = counts.get(obj.name, 0) + 1
        sizes[obj.name] = max(sizes.get(obj.name, 0.0), max(obj.box[2:]) / min(image_size))
    mentioned = list(counts)
    rng.shuffle(mentioned)                                          # word order varies
    if len(mentioned) > 1 and rng.random() < 0.3:
        mentioned.pop()                                             # an object the writer left out
    phrases = [_object_phrase(name, counts[name], sizes[name], rng) for name in mentioned]
    text = phrases[0]
    for phrase in phrases[1:]:
        text += str(rng.choice(JOINERS)) + phrase
    caption = str(rng.choice(CAPTION_TEMPLATES)).format(
        objects=text, bg=rng.choice(BACKGROUNDS), style=rng.choice(STYLES))
    if rng.random() < 0.3:
        caption = caption[0].upper() + caption[1:]
    if rng.random() < 0.2:
        caption += "."
    return caption


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
        picture = Image.open(world_dir / record["file_name"]).convert("RGB")
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
