"""Safe decoding: every PIL mode to RGB, EXIF orientation, and a reason for every bad input."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.images import ImageError, decode_image, resize_max_side, to_rgb
from tests.corpora import bomb_png, hostile_images, jpeg_bytes, png_bytes

LIMIT = 10_000_000


@pytest.mark.parametrize("name,reason", [("truncated.jpg", "truncated_image"), ("zero_bytes.jpg", "empty_file"),
                                         ("not_an_image.jpg", "not_an_image"), ("bomb.png", "too_many_pixels")])
def test_bad_bytes_get_a_reason(name, reason):
    with pytest.raises(ImageError) as err:
        decode_image(hostile_images()[name], max_pixels=LIMIT)
    assert err.value.reason == reason


def test_bomb_is_refused_before_decoding():
    data = bomb_png()
    assert len(data) < 200_000  # tiny on disk, 400 megapixels decoded
    with pytest.raises(ImageError, match="20000x20000"):
        decode_image(data, max_pixels=LIMIT)


def test_modes_become_rgb_with_the_right_pixels():
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 0))  # fully transparent red -> white background
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 2), (0, 0, 0, 128))
    assert to_rgb(half).getpixel((0, 0)) == (127, 127, 127)
    gray16 = Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16))
    assert to_rgb(gray16).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("RGB", (3, 3), (0, 128, 255)).convert("P")
    assert to_rgb(palette).getpixel((1, 1)) == palette.convert("RGB").getpixel((1, 1))
    cmyk = decode_image(hostile_images()["cmyk.jpg"], LIMIT)
    assert cmyk.image.mode == "RGB" and cmyk.needs_reencode
    for mode in ("1", "L", "LA", "I", "F"):
        assert to_rgb(Image.new(mode, (3, 3))).mode == "RGB"


def test_exif_orientation_is_applied():
    img = Image.fromarray(np.zeros((20, 40, 3), dtype=np.uint8))  # 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    decoded = decode_image(buf.getvalue(), LIMIT)
    assert decoded.image.size == (20, 40)
    assert decoded.original_size == (40, 20)
    assert decoded.needs_reencode  # the stored bytes would show it unrotated to readers without EXIF


def test_plain_jpeg_keeps_its_bytes_and_resize_only_shrinks():
    decoded = decode_image(jpeg_bytes(30, 20), LIMIT)
    assert not decoded.needs_reencode
    assert resize_max_side(decoded.image, 100) is decoded.image
    assert resize_max_side(Image.new("RGB", (400, 100)), 200).size == (200, 50)
    assert decode_image(png_bytes(Image.new("RGB", (5, 5))), LIMIT).needs_reencode
