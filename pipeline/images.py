"""Safe image decoding and resizing: the one way bytes or files become an RGB image.

Every way an image can be bad becomes an `ImageError` with a short reason code that ends up in the
shard's Parquet `reason` column; nothing here raises anything else for bad bytes.

The rules, the same for every stage: EXIF orientation is applied (the shard stage stores images
upright, so decoding shard bytes again changes nothing) and an image with more than `max_pixels`
pixels is refused from its header, before any pixel is decoded. PIL's own decompression-bomb guard
stays on for the process: beyond twice `Image.MAX_IMAGE_PIXELS` PIL refuses while reading the header.
"""
from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.io import read_regular_file

# PIL's default Image.MAX_IMAGE_PIXELS, and shard.max_pixels's default.
DEFAULT_MAX_PIXELS = 89_478_485
# The largest image file read (corpus.max_file_bytes's default): far above any photo, far below memory.
DEFAULT_MAX_FILE_BYTES = 50_000_000


class ImageError(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class DecodedImage:
    image: Image.Image          # RGB, EXIF orientation applied
    format: str                 # PIL's name of the source format, e.g. "JPEG"
    original_size: tuple        # (width, height) as stored, before orientation
    needs_reencode: bool        # the source bytes do not equal an RGB JPEG of `image`


def decode_image(data: bytes, max_pixels: int, min_side: int = 1) -> DecodedImage:
    """Decode bytes into an RGB image, refusing empty, non-image, truncated and oversized input."""
    if not data:
        raise ImageError("empty_file", "zero bytes")
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit; `max_pixels` decides, checked just below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        width, height = img.size
        if width * height > max_pixels:
            # Checked from the header, before any pixel is decoded.
            raise ImageError("too_many_pixels", f"{width}x{height} exceeds the limit of {max_pixels} pixels")
        fmt = img.format or "unknown"
        img.load()
        if min(width, height) < min_side:
            raise ImageError("too_small", f"{width}x{height} is below the minimum side {min_side}")
        orientation = img.getexif().get(0x0112, 1)
        rgb = to_rgb(ImageOps.exif_transpose(img) if orientation != 1 else img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        # PIL's message names a BytesIO object's address, which would make reruns differ.
        raise ImageError("not_an_image", f"no known image format ({len(data)} bytes)") from None
    except Image.DecompressionBombError as err:
        raise ImageError("too_many_pixels", str(err)) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as err:
        # What PIL raises for bad bytes (its own fuzzers' list); a MemoryError or KeyboardInterrupt is
        # no property of the image and is never caught here.
        msg = str(err)
        reason = "truncated_image" if "truncated" in msg or "broken data stream" in msg else "decode_error"
        raise ImageError(reason, msg) from None
    needs_reencode = fmt != "JPEG" or img.mode != "RGB" or orientation != 1
    return DecodedImage(rgb, fmt, (width, height), needs_reencode)


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


def load_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes (a shard member, a file's content) for a model (raises ImageError on bad data)."""
    return decode_image(data, max_pixels).image


def open_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS,
             max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Image.Image:
    """An image file decoded for a model. Raises ImageError (naming the file) on bad data, OSError when
    unreadable: only a regular file of at most `max_bytes` is read (pipeline.io.read_regular_file), so a
    FIFO or /dev/zero is refused rather than read forever."""
    data = read_regular_file(path, max_bytes)
    try:
        return load_rgb(data, max_pixels)
    except ImageError as err:
        raise ImageError(err.reason, f"{path}: {str(err).partition(': ')[2] or err.reason}") from None
