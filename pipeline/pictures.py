"""Pictures of boxes with labels, for people to look at (`regionclip show`)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_labelled_boxes(image: Image.Image, boxes: np.ndarray, captions: Sequence[str],
                        min_side: int = 640, title: str = "") -> Image.Image:
    """The image upscaled so its short side is at least `min_side`, with numbered boxes (in the
    image's pixels) and a legend under it, one caption per box, colours matching."""
    scale = max(1.0, min_side / min(image.size))
    w, h = round(image.width * scale), round(image.height * scale)
    font = _font(max(14, round(min_side / 40)))
    line = font.getbbox("Ag")[3] + 6
    legend = line * (len(captions) + (1 if title else 0)) + 10
    picture = Image.new("RGB", (w, h + legend), "white")
    picture.paste(image.convert("RGB").resize((w, h), Image.BICUBIC), (0, 0))
    draw = ImageDraw.Draw(picture)
    for i, box in reversed(list(enumerate(np.asarray(boxes, np.float32).reshape(-1, 4)))):
        colour = PALETTE[i % len(PALETTE)]
        x1, y1, x2, y2 = (float(v) * scale for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=3)
        tag = str(i + 1)
        tw = draw.textlength(tag, font=font)
        draw.rectangle([x1, y1, x1 + tw + 6, y1 + line], fill=colour)
        draw.text((x1 + 3, y1 + 2), tag, fill="white", font=font)
    y = h + 5
    if title:
        draw.text((6, y), title, fill="black", font=font)
        y += line
    for i, text in enumerate(captions):
        colour = PALETTE[i % len(PALETTE)]
        draw.rectangle([6, y + 3, 6 + line - 8, y + line - 5], fill=colour)
        draw.text((6 + line, y), f"{i + 1}. {text}", fill="black", font=font)
        y += line
    return picture
