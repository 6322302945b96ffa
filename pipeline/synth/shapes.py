"""The drawing of the synthetic world's object categories: one hand-made RGBA sketch per category.

Each category is a shape x dominant colour x pattern, drawn at SUPERSAMPLE times the wanted size on a
transparent canvas and reduced, so edges are smooth. An instance gets its own shade (brightness and
colour cast) and rotation; `draw_object` returns it cropped to its opaque pixels (its tight box).

    picture = draw_object("apple", (40, 40), np.random.default_rng(0), angle=10)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES: tuple[str, ...] = (
    "apple", "banana", "kite", "star", "heart", "umbrella", "cup", "tree", "house", "car", "fish",
    "ball", "clock", "bottle", "key", "flower", "mushroom", "boat", "bell", "hat", "cloud", "book",
    "carrot", "sun",
)

# Natural width/height of each drawing; every instance varies around it.
CATEGORY_ASPECT: dict[str, float] = {
    "apple": 1.0, "banana": 1.9, "kite": 0.6, "star": 1.0, "heart": 1.05, "umbrella": 1.0,
    "cup": 1.15, "tree": 0.7, "house": 0.95, "car": 1.8, "fish": 1.7, "ball": 1.0, "clock": 1.0,
    "bottle": 0.4, "key": 2.3, "flower": 0.6, "mushroom": 1.0, "boat": 1.1, "bell": 0.9, "hat": 1.15,
    "cloud": 1.7, "book": 0.75, "carrot": 0.42, "sun": 1.0,
}

SUPERSAMPLE = 2         # objects are drawn at 2x and reduced, for smooth edges


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
assert set(_DRAWERS) == set(CATEGORIES) == set(CATEGORY_ASPECT)


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


@dataclass
class SceneObject:
    """One object drawn into a scene (the generator's truth; captions and boxes are made from it)."""
    name: str
    box: tuple[int, int, int, int]      # x, y, w, h in pixels
    area: int                           # opaque pixels
