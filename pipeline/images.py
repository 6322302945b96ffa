"""Safe image decoding and resizing: the one way bytes or files become an RGB image.

Every way an image can be bad becomes an `ImageError` with a short reason code that ends up in the
shard's Parquet `reason` column; nothing here raises anything else for bad bytes. Whatever a decoder
raises on a bad file (PIL's plugins raise OSError, ValueError, SyntaxError, but also TypeError,
RuntimeError, NotImplementedError, AttributeError, struct.error ... on crafted input) is such an
ImageError; only a MemoryError or KeyboardInterrupt, which say nothing about the file, pass through.

The rules, the same for every stage: only the formats in `formats` are opened at all (PIL tries no
other plugin; shard.image_formats, default DEFAULT_IMAGE_FORMATS), EXIF orientation is applied (the
shard stage stores images upright, so decoding shard bytes again changes nothing) and an image with more
than `max_pixels` pixels is refused from its header, before any pixel is decoded, which also bounds the
time a decode takes. PIL's own decompression-bomb guard stays on for the process: beyond twice
`Image.MAX_IMAGE_PIXELS` PIL refuses while reading the header. Size checks (`min_side`) apply to the
image as stored, after `max_side`'s resize.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.io import read_regular_file

# PIL's default Image.MAX_IMAGE_PIXELS, and shard.max_pixels's default.
DEFAULT_MAX_PIXELS = 89_478_485
# The largest image file read (corpus.max_file_bytes's default): far above any photo, far below memory.
DEFAULT_MAX_FILE_BYTES = 50_000_000
# The formats opened unless shard.image_formats says otherwise: those of web caption corpora (what
# browsers show, so what alt-text crawls such as CC3M and LAION hold; img2dataset stores JPEG). PIL's
# JPEG opener also reads camera MPO files. Left out: TIFF (libtiff and its many codecs, the largest
# share of PIL's advisories, and rare on the web), AVIF, JPEG 2000 and the niche or legacy formats
# (DDS, BLP, SPIDER, IM, EPS, which runs Ghostscript, ...): each is more decoder code facing untrusted
# bytes for images a caption corpus seldom holds. Add them to shard.image_formats when yours does.
DEFAULT_IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")


def openable_formats() -> list[str]:
    """Every format this PIL can open (the values shard.image_formats may name)."""
    Image.init()
    return sorted(Image.OPEN)


class ImageError(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class DecodedImage:
    image: Image.Image          # RGB, EXIF orientation applied, resized to max_side when given
    format: str                 # PIL's name of the source format, e.g. "JPEG"
    original_size: tuple        # (width, height) as stored, before orientation
    needs_reencode: bool        # the source bytes do not equal an RGB JPEG of `image`


def decode_image(data: bytes, max_pixels: int, min_side: int = 1, *, max_side: Optional[int] = None,
                 formats: Sequence[str] = DEFAULT_IMAGE_FORMATS) -> DecodedImage:
    """Decode bytes into an RGB image, refusing empty, non-image, truncated and oversized input, and any
    format not in `formats`. With `max_side` the image is downscaled to it (resize_max_side) and
    `min_side` applies to the result: a 20000x8 strip is not stored as 1333x1."""
    if not data:
        raise ImageError("empty_file", "zero bytes")
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit (`max_pixels` decides, checked below) and about damaged
            # metadata it skips; the outcome (the image or its ImageError) is what is recorded.
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data), formats=list(formats))
            width, height = img.size
            if width * height > max_pixels:
                # Checked from the header, before any pixel is decoded.
                raise ImageError("too_many_pixels", f"{width}x{height} exceeds the limit of {max_pixels} pixels")
            fmt = img.format or "unknown"
            img.load()
            if min(width, height) < min_side:
                raise ImageError("too_small", f"{width}x{height} is below the minimum side {min_side}")
            orientation = img.getexif().get(0x0112, 1)
            upright = ImageOps.exif_transpose(img) if orientation != 1 else img
            rgb = to_rgb(upright)
            stored = resize_max_side(rgb, max_side) if max_side else rgb
    except (ImageError, MemoryError):
        # A MemoryError (like a KeyboardInterrupt, which `Exception` never catches) is no property of
        # the image: it stops the work instead of rejecting the row.
        raise
    except UnidentifiedImageError:
        # PIL's message names a BytesIO object's address, which would make reruns differ.
        raise ImageError("not_an_image", f"no known image format ({len(data)} bytes; the formats opened: "
                         f"{', '.join(formats)}, shard.image_formats)") from None
    except Image.DecompressionBombError as err:
        raise ImageError("too_many_pixels", str(err)) from None
    except Exception as err:  # noqa: BLE001 - whatever a decoder raises on bad bytes is a bad image
        msg = " ".join(f"{type(err).__name__}: {err}".split())
        reason = "truncated_image" if "truncated" in msg or "broken data stream" in msg else "decode_error"
        raise ImageError(reason, msg) from None
    if min(stored.size) < min_side:
        raise ImageError("too_small", f"{width}x{height} is stored as {stored.width}x{stored.height} (shard."
                         f"max_side {max_side}), below the minimum side {min_side}")
    needs_reencode = fmt != "JPEG" or img.mode != "RGB" or orientation != 1 or stored is not rgb
    return DecodedImage(stored, fmt, (width, height), needs_reencode)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: alpha over white, palettes expanded, 16-bit scaled, CMYK converted."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def resize_max_side(img: Image.Image, max_side: int) -> Image.Image:
    """Downscale (bicubic) so the longest side is at most `max_side`; smaller images are untouched."""
    w, h = img.size
    if max(w, h) <= max_side:
        return img
    scale = max_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(size, Image.BICUBIC)


def encode_jpeg(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def load_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
             formats: Sequence[str] = DEFAULT_IMAGE_FORMATS) -> Image.Image:
    """Decode image bytes (a shard member, a file's content) for a model (raises ImageError on bad data)."""
    return decode_image(data, max_pixels, formats=formats).image


def open_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS,
             max_bytes: int = DEFAULT_MAX_FILE_BYTES, formats: Sequence[str] = DEFAULT_IMAGE_FORMATS) -> Image.Image:
    """An image file decoded for a model. Raises ImageError (naming the file) on bad data, OSError when
    unreadable: only a regular file of at most `max_bytes` is read (pipeline.io.read_regular_file), so a
    FIFO or /dev/zero is refused rather than read forever."""
    data = read_regular_file(path, max_bytes)
    try:
        return load_rgb(data, max_pixels, formats)
    except ImageError as err:
        raise ImageError(err.reason, f"{path}: {str(err).partition(': ')[2] or err.reason}") from None
