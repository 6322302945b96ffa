"""The one resize rule and the one padding multiple, shared by the teacher, the student and the detector.

detectron2's ResizeShortestEdge (which RegionCLIP trains and tests with): the short side becomes
`min_size` unless the long side would then exceed `max_size`; each side is rounded half up
(`int(x + 0.5)`). The teacher labels, the student trains and the detector runs at exactly these sizes,
so a box the teacher saw at some pixel is the box the student sees.
"""
from __future__ import annotations

import math

# Batches are padded to a multiple of this: the stride of res5 (detectron2 calls it the size divisibility).
PAD_MULTIPLE = 32


def resize_scale(width: int, height: int, min_size: int, max_size: int) -> float:
    """The factor that maps the short side to min_size, capped so the long side stays <= max_size."""
    scale = min_size / min(width, height)
    if max(width, height) * scale > max_size:
        scale = max_size / max(width, height)
    return scale


def resized_size(width: int, height: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(new_width, new_height) of an image under the resize rule."""
    scale = resize_scale(width, height, min_size, max_size)
    return max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5))


def padded(length: int) -> int:
    """A side length rounded up to the padding multiple."""
    return int(math.ceil(length / PAD_MULTIPLE) * PAD_MULTIPLE)
