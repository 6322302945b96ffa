"""Tiny corpora made on the fly, including every kind of hostile row the shard stage must survive."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(w: int, h: int, seed: int = 0, mode: str = "RGB", quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png() -> bytes:
    """A 1-bit 20000x20000 PNG: a few KB on disk, 400 megapixels decoded."""
    return png_bytes(Image.new("1", (20000, 20000)))


def hostile_images() -> dict[str, bytes]:
    """name -> bytes for each bad or unusual image; names say what they are."""
    good = jpeg_bytes(64, 48, seed=1)
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 128))
    palette = Image.new("RGB", (40, 30), (0, 128, 255)).convert("P")
    gray16 = Image.fromarray(np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50)
    return {
        "truncated.jpg": good[: len(good) // 2],
        "zero_bytes.jpg": b"",
        "not_an_image.jpg": b"<html>this is not an image</html>",
        "bomb.png": bomb_png(),
        "cmyk.jpg": jpeg_bytes(40, 30, seed=2, mode="CMYK"),
        "gray.jpg": jpeg_bytes(40, 30, seed=3, mode="L"),
        "rgba.png": png_bytes(rgba),
        "palette.png": png_bytes(palette),
        "gray16.png": png_bytes(gray16),
    }


def make_folder_corpus(root: Path, n_good: int = 6, hostile: bool = True) -> dict:
    """Images with same-name .txt captions. Returns {'rows': n, 'expected_rejected': {stem: reason}}."""
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    for i in range(n_good):
        (root / f"good{i:02d}.jpg").write_bytes(jpeg_bytes(64 + 8 * i, 48, seed=10 + i))
        (root / f"good{i:02d}.txt").write_text(f"a photo of {i + 1} red apples on a table")
    if hostile:
        for name, data in hostile_images().items():
            (root / name).write_bytes(data)
            (root / name).with_suffix(".txt").write_text(f"caption for {name}")
        expected.update({"truncated": "truncated_image", "zero_bytes": "empty_file",
                         "not_an_image": "not_an_image", "bomb": "too_many_pixels"})
        (root / "empty_caption.jpg").write_bytes(jpeg_bytes(32, 32, seed=4))
        (root / "empty_caption.txt").write_text("   \n")
        (root / "latin1_caption.jpg").write_bytes(jpeg_bytes(32, 32, seed=5))
        (root / "latin1_caption.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
        (root / "no_caption.jpg").write_bytes(jpeg_bytes(32, 32, seed=6))
        expected.update({"empty_caption": "empty_caption", "latin1_caption": "caption_not_utf8",
                         "no_caption": "missing_caption"})
    rows = len(list(root.glob("*.jpg"))) + len(list(root.glob("*.png")))
    return {"rows": rows, "expected_rejected": expected}


def make_tsv_corpus(root: Path, header: bool = True, n: int = 5) -> Path:
    """A CC3M-style TSV of caption and local path / file:// URL, with a missing file and a duplicate."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = ["caption\turl"] if header else []
    for i in range(n):
        (images / f"{i}.jpg").write_bytes(jpeg_bytes(50, 40, seed=i))
        url = f"file://{images / f'{i}.jpg'}" if i % 2 else f"images/{i}.jpg"
        lines.append(f"two dogs and a cat number {i}\t{url}")
    lines.append("a missing picture\timages/missing.jpg")
    lines.append(lines[-2])  # an exact duplicate row
    lines.append("a remote picture\thttp://example.com/x.jpg")
    path = root / "captions.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def make_coco_captions(root: Path, n_images: int = 3, per_image: int = 3) -> Path:
    images = root / "train2017"
    images.mkdir(parents=True, exist_ok=True)
    data = {"images": [], "annotations": []}
    ann_id = 1
    for i in range(n_images):
        name = f"{i:012d}.jpg"
        (images / name).write_bytes(jpeg_bytes(60, 40, seed=20 + i))
        data["images"].append({"id": i + 1, "file_name": name, "width": 60, "height": 40})
        for j in range(per_image):
            data["annotations"].append({"id": ann_id, "image_id": i + 1, "caption": f"caption {j} of image {i}"})
            ann_id += 1
    data["annotations"].append({"id": ann_id, "image_id": 999, "caption": "an orphan caption"})
    path = root / "captions_train2017.json"
    path.write_text(json.dumps(data))
    return path


def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_img2dataset_folder(root: Path, n: int = 4, unsafe: bool = True) -> Path:
    """An img2dataset-style output folder with one tar (plus an unsafe `../` member and a symlink)."""
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "00000.tar", "w") as tar:
        for i in range(n):
            key = f"00000{i:04d}"
            add_tar_member(tar, f"{key}.jpg", jpeg_bytes(48, 48, seed=30 + i))
            add_tar_member(tar, f"{key}.txt", f"a kite and a boat {i}".encode())
            add_tar_member(tar, f"{key}.json", json.dumps({"key": key}).encode())
        if unsafe:
            add_tar_member(tar, "../evil.jpg", jpeg_bytes(16, 16))
            link = tarfile.TarInfo("000009999.jpg")
            link.type = tarfile.SYMTYPE
            link.linkname = "/etc/passwd"
            tar.addfile(link)
    return root
