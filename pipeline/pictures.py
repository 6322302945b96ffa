"""Pictures for people to look at: boxes with labels (`regionclip show`), grids of detections with a
legend (`evaluate`, `detect`), contact sheets of region crops (`search`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

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


# -- detection pictures: a grid of panels, one colour per class, a legend -------------------------------

# 20 colours that stay apart from each other and from the grey background (Kelly's and tab20's mixed).
CLASS_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                 (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
                 (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195),
                 (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128)]
PANEL_BACKGROUND = (235, 235, 235)


@dataclass(frozen=True)
class LabelledBox:
    box: tuple[float, float, float, float]   # x1, y1, x2, y2 in the panel image's pixels
    label: str
    score: Optional[float] = None            # None for a ground-truth box


@dataclass
class Panel:
    """One image of a grid: its detections (drawn solid, labelled) and ground truth (dashed)."""
    image: Image.Image
    detections: Sequence[LabelledBox] = ()
    truth: Sequence[LabelledBox] = ()
    caption: str = ""
    label_truth: bool = False                # name the ground-truth boxes (a "ground truth" column)


def shown_detections(detections: Sequence[LabelledBox], min_score: float, limit: int) -> list[LabelledBox]:
    """The detections a picture shows: score >= min_score, highest first, at most `limit`."""
    kept = [d for d in detections if d.score is not None and d.score >= min_score]
    return sorted(kept, key=lambda d: -d.score)[:limit]


def _text_colour(fill: tuple[int, int, int]) -> str:
    return "black" if 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2] > 150 else "white"


def _dashed_rectangle(draw: ImageDraw.ImageDraw, box, colour, width: int = 2, dash: int = 6) -> None:
    """A dashed box in `colour` over a thin dark line, so that light colours show on light images."""
    x1, y1, x2, y2 = box
    draw.rectangle(box, outline=(40, 40, 40), width=1)
    for (ax, ay, bx, by) in ((x1, y1, x2, y1), (x2, y1, x2, y2), (x2, y2, x1, y2), (x1, y2, x1, y1)):
        length = max(abs(bx - ax), abs(by - ay))
        steps = max(1, int(length // (2 * dash)))
        for k in range(steps + 1):
            t0, t1 = min(1.0, 2 * k * dash / max(length, 1)), min(1.0, (2 * k + 1) * dash / max(length, 1))
            if t0 >= 1.0:
                break
            draw.line([(ax + (bx - ax) * t0, ay + (by - ay) * t0), (ax + (bx - ax) * t1, ay + (by - ay) * t1)],
                      fill=colour, width=width)


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _place_label(size: tuple[float, float], box, taken: list, bounds: tuple[int, int]) -> Optional[tuple]:
    """Where a label of `size` goes for `box`: above its top-left corner, inside it, or below it, then
    lower inside the box, whichever first overlaps no label already placed; None when none is free."""
    w, h = size
    x1, y1, x2, y2 = box
    x = min(max(0, x1), max(0, bounds[0] - w))
    candidates = [y1 - h, y1, y2]
    candidates += [y1 + k * h for k in range(1, max(1, int((y2 - y1) // h)))]
    for y in candidates:
        y = min(max(0, y), bounds[1] - h)
        rect = (x, y, x + w, y + h)
        if not any(_overlaps(rect, other) for other in taken):
            return rect
    return None


def _panel_scale(panel: Panel, cell: int) -> float:
    return min(cell / panel.image.width, cell / panel.image.height)


def _draw_panel(panel: Panel, colours: dict[str, tuple], cell: int, height: int, font, min_score: float,
                limit: int) -> Image.Image:
    scale = _panel_scale(panel, cell)
    w, h = max(1, round(panel.image.width * scale)), max(1, round(panel.image.height * scale))
    canvas = Image.new("RGB", (cell, height), PANEL_BACKGROUND)
    canvas.paste(panel.image.convert("RGB").resize((w, h), Image.BICUBIC), ((cell - w) // 2, 0))
    dx = (cell - w) // 2
    draw = ImageDraw.Draw(canvas)

    def scaled(b: LabelledBox):
        x1, y1, x2, y2 = b.box
        return (x1 * scale + dx, y1 * scale, x2 * scale + dx, y2 * scale)

    for t in panel.truth:
        _dashed_rectangle(draw, scaled(t), colours[t.label])
    shown = shown_detections(panel.detections, min_score, limit)
    for d in shown:
        draw.rectangle(scaled(d), outline=colours[d.label], width=3)
    taken: list = []
    named = shown + (list(panel.truth) if panel.label_truth else [])
    for d in named:                                   # highest score first gets the best label place
        text = d.label if d.score is None else f"{d.label} {d.score:.2f}"
        tw, th = draw.textlength(text, font=font) + 6, font.getbbox("Ag")[3] + 4
        rect = _place_label((tw, th), scaled(d), taken, (cell, height))
        if rect is None:
            continue                                  # its colour still names the class (legend)
        taken.append(rect)
        draw.rectangle(rect, fill=colours[d.label])
        draw.text((rect[0] + 3, rect[1] + 1), text, fill=_text_colour(colours[d.label]), font=font)
    return canvas


def detection_grid(rows: Sequence[Sequence[Panel]], *, column_titles: Sequence[str] = (), title: str = "",
                   cell: int = 256, min_score: float = 0.3, max_per_panel: int = 6,
                   marked: Iterable[str] = (), mark: str = "novel", classes: Sequence[str] = ()) -> Image.Image:
    """Panels in a grid (rows of columns, e.g. images x models), each image fitted into a `cell` px
    square with its top `max_per_panel` detections scoring >= `min_score` (solid boxes, labels placed
    so they do not overlap) and its ground truth (dashed boxes); one colour per class, the same in every
    panel, named in a legend under the grid (classes in `marked` carry `(mark)`). `classes`: the order
    colours are given in (the same colours across several pictures); default: the classes shown."""
    rows = [list(r) for r in rows if r]
    columns = max((len(r) for r in rows), default=1)
    font, title_font = _font(max(11, cell // 20)), _font(max(13, cell // 16))
    line = title_font.getbbox("Ag")[3] + 8
    present = sorted({b.label for r in rows for p in r for b in p.truth}
                     | {d.label for r in rows for p in r for d in shown_detections(p.detections, min_score,
                                                                                   max_per_panel)})
    order = list(dict.fromkeys([*classes, *present]))
    colours = {label: CLASS_COLOURS[order.index(label) % len(CLASS_COLOURS)] for label in present}
    marked = set(marked)
    gap, caption_h = 6, (font.getbbox("Ag")[3] + 6 if any(p.caption for r in rows for p in r) else 0)
    width = columns * (cell + gap) + gap
    # the legend: a swatch and a name per class, wrapped to the width
    entries = [(colours[label], label + (f" ({mark})" if label in marked else "")) for label in present]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend_rows, x = 1, gap
    for _, text in entries:
        item = line + probe.textlength(text, font=font) + 18
        if x + item > width and x > gap:
            legend_rows, x = legend_rows + 1, gap
        x += item
    top = (line if title else 0) + (line if column_titles else 0) + gap
    # each row as tall as its tallest fitted image (landscape images leave no empty band)
    heights = [max(round(p.image.height * _panel_scale(p, cell)) for p in r) for r in rows]
    grid_h = sum(heights) + len(rows) * (caption_h + gap)
    key_h = line
    picture = Image.new("RGB", (width, top + grid_h + key_h + legend_rows * line + gap), "white")
    draw = ImageDraw.Draw(picture)
    y = gap
    if title:
        draw.text((gap, y), title, fill="black", font=title_font)
        y += line
    for c, name in enumerate(column_titles):
        draw.text((gap + c * (cell + gap), y), name, fill="black", font=title_font)
    y = top
    for r, height in zip(rows, heights):
        for c, panel in enumerate(r):
            x0 = gap + c * (cell + gap)
            picture.paste(_draw_panel(panel, colours, cell, height, font, min_score, max_per_panel), (x0, y))
            if panel.caption:
                draw.text((x0, y + height + 2), panel.caption, fill=(60, 60, 60), font=font)
        y += height + caption_h + gap
    draw.text((gap, y), f"solid: detections scoring >= {min_score:.2f} (top {max_per_panel} per image); "
                        "dashed: ground truth", fill="black", font=font)
    y += key_h
    x = gap
    for colour, text in entries:
        item = line + draw.textlength(text, font=font) + 18
        if x + item > width and x > gap:
            x, y = gap, y + line
        draw.rectangle([x, y + 3, x + line - 8, y + line - 5], fill=colour, outline=(90, 90, 90))
        draw.text((x + line - 2, y + 2), text, fill="black", font=font)
        x += item
    return picture


def save_png(picture: Image.Image, path) -> Path:
    """Write a picture atomically (a reader never sees half a PNG)."""
    from pipeline.io import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        picture.save(tmp, "PNG")
    return path


# -- contact sheets of regions (`regionclip search`) -----------------------------------------------------

@dataclass
class RegionTile:
    image: Image.Image                         # the whole image the region is in
    box: tuple[float, float, float, float]     # x1, y1, x2, y2 in its pixels
    lines: Sequence[str] = ()                  # text under the crop, e.g. rank and score, key
    good: Optional[bool] = None                # a known right (True) or wrong (False) answer: a coloured frame


def region_crop(image: Image.Image, box, cell: int, margin: float = 0.25) -> Image.Image:
    """The region with `margin` of its size around it (clamped to the image), its box drawn, fitted
    into a `cell` px square (small regions are enlarged)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    mx, my = (x2 - x1) * margin + 2, (y2 - y1) * margin + 2
    left, top = max(0.0, x1 - mx), max(0.0, y1 - my)
    right, bottom = min(float(image.width), x2 + mx), min(float(image.height), y2 + my)
    crop = image.convert("RGB").crop((round(left), round(top), max(round(left) + 1, round(right)),
                                      max(round(top) + 1, round(bottom))))
    scale = min(cell / crop.width, cell / crop.height)
    crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))), Image.BICUBIC)
    draw = ImageDraw.Draw(crop)
    draw.rectangle([(x1 - round(left)) * scale, (y1 - round(top)) * scale, (x2 - round(left)) * scale,
                    (y2 - round(top)) * scale], outline=(255, 230, 0), width=2)
    return crop


def contact_sheet(tiles: Sequence[RegionTile], title: str = "", columns: int = 4, cell: int = 160) -> Image.Image:
    """Region crops in rank order, `columns` to a row, each with its lines of text under it."""
    font, title_font = _font(max(11, cell // 13)), _font(max(13, cell // 10))
    line = font.getbbox("Ag")[3] + 4
    text_h = line * max((len(t.lines) for t in tiles), default=0) + 4
    gap = 8
    columns = max(1, min(columns, len(tiles) or 1))
    rows = max(1, -(-len(tiles) // columns))
    top = (title_font.getbbox("Ag")[3] + 2 * gap) if title else gap
    sheet = Image.new("RGB", (columns * (cell + gap) + gap, top + rows * (cell + text_h + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((gap, gap), title, fill="black", font=title_font)
    for n, tile in enumerate(tiles):
        x, y = gap + (n % columns) * (cell + gap), top + (n // columns) * (cell + text_h + gap)
        draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=PANEL_BACKGROUND)
        crop = region_crop(tile.image, tile.box, cell)
        sheet.paste(crop, (x + (cell - crop.width) // 2, y + (cell - crop.height) // 2))
        if tile.good is not None:
            draw.rectangle([x - 3, y - 3, x + cell + 2, y + cell + 2], outline=(40, 170, 60) if tile.good
                           else (220, 40, 40), width=3)
        for k, text in enumerate(tile.lines):
            draw.text((x, y + cell + 3 + k * line), text, fill="black" if k == 0 else (90, 90, 90), font=font)
    return sheet
