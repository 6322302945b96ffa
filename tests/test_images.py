"""Safe decoding: every PIL mode to RGB, EXIF orientation, and a reason for every bad input."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.images import ImageError, decode_image, load_rgb, open_rgb, resize_max_side, to_rgb
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
    # Beyond twice PIL's own limit PIL refuses while reading the header; the reason is the same.
    with pytest.raises(ImageError, match="too_many_pixels: .*400000000 pixels"):
        decode_image(data, max_pixels=LIMIT)


def test_the_pixel_limit_is_per_call_and_pil_keeps_its_own():
    import pipeline.images

    assert Image.MAX_IMAGE_PIXELS == pipeline.images.DEFAULT_MAX_PIXELS  # never switched off process-wide
    data = png_bytes(Image.new("1", (4000, 3000)))  # 12 megapixels, under PIL's limit
    with pytest.raises(ImageError, match="too_many_pixels: 4000x3000 exceeds the limit of 10000000 pixels"):
        decode_image(data, max_pixels=10_000_000)
    assert decode_image(data, max_pixels=12_000_000).image.size == (4000, 3000)
    with pytest.raises(ImageError, match="4000x3000"):
        load_rgb(data, max_pixels=11_999_999)


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


# -- the one decode -> tensor path -----------------------------------------------------------------------

def _rotated_jpeg(tmp_path):
    """A 40x20 JPEG whose EXIF says 'rotate 90 degrees clockwise', left half red, right half blue."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, format="JPEG", quality=100, exif=exif.tobytes())
    return path


def test_files_decode_like_shard_bytes_upright_for_every_stage(tmp_path):
    """Detection images (train-rpn, transfer, evaluate, detect) follow the shard stage's EXIF rule."""
    import torch

    from trainer.data.detection import DetectionSet
    from trainer.data.images import image_tensor, read_image_tensor

    path = _rotated_jpeg(tmp_path)
    shard_image = decode_image(path.read_bytes(), LIMIT).image  # what the shard stage stores
    assert shard_image.size == (20, 40)                           # upright: 20 wide, 40 high
    upright = image_tensor(shard_image)
    assert upright.dtype == torch.uint8 and upright.shape == (3, 40, 20)
    assert upright[0, 5, 10] > 200 and upright[2, 35, 10] > 200   # red on top, blue below after rotation
    assert torch.equal(read_image_tensor(path), upright)
    assert torch.equal(image_tensor(open_rgb(path)), upright)
    unit = read_image_tensor(path, unit_range=True)
    assert unit.dtype == torch.float32 and torch.equal(unit, upright.float() / 255.0)
    data = DetectionSet({"images": [{"id": 1, "file_name": path.name, "width": 20, "height": 40}],
                         "annotations": [], "categories": []}, images_root=tmp_path, cache_images=True)
    for _ in range(2):  # read, then from the cache
        assert torch.equal(data.load_image(data.image_by_id[1]), unit)


def test_image_tensor_takes_only_decoded_rgb_and_bad_files_are_image_errors(tmp_path):
    from trainer.data.images import image_tensor, read_image_tensor

    with pytest.raises(ValueError, match="RGB"):
        image_tensor(Image.new("L", (4, 4)))
    (tmp_path / "bad.jpg").write_bytes(b"<html>")
    with pytest.raises(ImageError, match="not_an_image"):
        read_image_tensor(tmp_path / "bad.jpg")


def test_image_tensor_is_defined_once():
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    definition = re.compile(r"^\s*def\s+image_tensor\(", re.M)
    found = [str(p.relative_to(repo)) for folder in ("pipeline", "trainer", "stages", "bench")
             for p in sorted((repo / folder).rglob("*.py")) if definition.search(p.read_text(encoding="utf-8"))]
    assert found == ["trainer/data/images.py"]
