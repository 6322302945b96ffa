"""Images as model input: the one conversion from a decoded image to a tensor.

Decoding is pipeline/images.py's (`load_rgb` for bytes, `open_rgb` for files): RGB, EXIF orientation
applied as the shard stage stores images, and the pixel limit checked before any pixel is decoded.
Every stage that feeds a model (proposals, label, pretrain, train-teacher, train-rpn, transfer,
evaluate, detect) goes through it and through `image_tensor` here.

    image = image_tensor(load_rgb(data))                     # uint8 [3, H, W]
    image = read_image_tensor(path, unit_range=True)         # float32 [3, H, W] in 0..1
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from pipeline.images import DEFAULT_MAX_PIXELS, open_rgb


def image_tensor(image: Image.Image, *, unit_range: bool = False) -> torch.Tensor:
    """An RGB image as [3, H, W]: uint8 as decoded, or float32 in 0..1 with `unit_range`.

    The tensor is a channels-first view of the decoded pixels (not contiguous); `.contiguous()` where
    a copy is kept."""
    if image.mode != "RGB":
        raise ValueError(f"image_tensor takes an RGB image (as pipeline.images decodes), not mode {image.mode}")
    pixels = torch.from_numpy(np.asarray(image, np.uint8).copy()).permute(2, 0, 1)
    return as_unit_range(pixels) if unit_range else pixels


def as_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape, any device) -> float32 in 0..1."""
    return pixels.float() / 255.0


def read_image_tensor(path: str | os.PathLike, *, unit_range: bool = False,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """An image file as [3, H, W] (see `image_tensor`); raises pipeline.images.ImageError on bad data."""
    return image_tensor(open_rgb(path, max_pixels), unit_range=unit_range)
