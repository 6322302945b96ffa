"""Hostile detection annotations (train-rpn, transfer, evaluate): an image `file_name` (or LVIS
`coco_url`) that leads outside its images root refuses the whole annotation file before any image is
read, naming the offending names and the setting that allows them; a private picture outside
(`sentinel`) is never read nor changed."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import trainer.data.images
from pipeline.config import load_manifest
from stages.resolve import detection_images
from tests.corpora import jpeg_bytes
from trainer.data.detection import DetectionSet, ImagesOutsideRoot
from trainer.data.images import read_image_tensor
from trainer.tasks.rpn import read_coco_boxes

# (manifest section, which set, the reader its stage uses)
READERS = [("transfer", "train", "DetectionSet"),      # transfer's training images
           ("transfer", "val", "DetectionSet"),        # evaluate's ground truth
           ("train_rpn", "train", "read_coco_boxes"),
           ("train_rpn", "val", "read_coco_boxes")]


@pytest.fixture
def world(tmp_path):
    """coco/images/ (the images root, one real picture) beside coco/secret.jpg (the sentinel)."""
    root = tmp_path / "coco" / "images"
    root.mkdir(parents=True)
    (root / "inside.jpg").write_bytes(jpeg_bytes(32, 24, seed=1))
    sentinel = tmp_path / "coco" / "secret.jpg"
    sentinel.write_bytes(jpeg_bytes(40, 40, seed=999))
    before = (sentinel.read_bytes(), sentinel.stat().st_mtime_ns)
    yield root, sentinel
    assert (sentinel.read_bytes(), sentinel.stat().st_mtime_ns) == before


@pytest.fixture
def opened(monkeypatch):
    """Every image file the trainer's image reader opens (DetectionSet.load_image, the RPN trainer)."""
    paths = []
    real = trainer.data.images.open_rgb

    def recording(path, *args, **kwargs):
        paths.append(os.path.realpath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(trainer.data.images, "open_rgb", recording)
    return paths


def annotations(folder: Path, records: list[dict]) -> Path:
    path = folder / "instances.json"
    images = [{"id": i + 1, "width": 32, "height": 24, **r} for i, r in enumerate(records)]
    path.write_text(json.dumps({"images": images, "categories": [{"id": 1, "name": "thing"}],
                                "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1,
                                                 "bbox": [2, 2, 10, 10], "iscrowd": 0}
                                                for i in range(len(images))]}))
    return path


def manifest_for(folder: Path, ann: Path, root: Path, overrides=()):
    sets = {"annotations": str(ann), "val_annotations": str(ann), "images_root": str(root),
            "val_images_root": str(root)}
    path = folder / "m.yaml"
    path.write_text(json.dumps({"name": "t", "output_dir": str(folder / "run"), "corpus": {"format": "synthetic"},
                                "transfer": sets, "train_rpn": sets}))
    return load_manifest(path, list(overrides))


def read_set(reader: str, ann: Path, images: dict) -> list[Path]:
    """Read the set as its stage does, then read every image as training / evaluation would."""
    if reader == "DetectionSet":
        data = DetectionSet(ann, **images)
        for record in data.images:
            data.load_image(record)
        return [data.image_path(r) for r in data.images]
    boxes = read_coco_boxes(ann, **images)
    for record in boxes.images:
        read_image_tensor(record["path"], unit_range=True)
    return [Path(r["path"]) for r in boxes.images]


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "link_out", "lvis_coco_url"])
@pytest.mark.parametrize("section,which,reader", READERS)
def test_an_image_outside_the_images_root_refuses_the_set_before_any_image_is_read(
        tmp_path, world, opened, kind, section, which, reader):
    root, sentinel = world
    named = {"dotdot": {"file_name": "../secret.jpg"},
             "absolute": {"file_name": str(sentinel)},
             "link_out": {"file_name": "link.jpg"},
             "lvis_coco_url": {"coco_url": "http://images.cocodataset.org/../secret.jpg"}}[kind]
    if kind == "link_out":
        os.symlink(sentinel, root / "link.jpg")
    ann = annotations(tmp_path, [{"file_name": "inside.jpg"}, named])
    manifest = manifest_for(tmp_path, ann, root)

    with pytest.raises(ImagesOutsideRoot) as err:
        read_set(reader, ann, detection_images(manifest, which, section))
    message = str(err.value)
    shown = named.get("file_name", "../secret.jpg")
    assert f"{ann}: 1 of 2 image file names lead outside the images root {root}: {shown!r}" in message
    assert f"set {section}.allow_outside_root: true" in message
    assert opened == [], "no image is read from a refused set"


@pytest.mark.parametrize("section,which,reader", READERS)
def test_allow_outside_root_reads_them(tmp_path, world, opened, section, which, reader):
    root, sentinel = world
    ann = annotations(tmp_path, [{"file_name": "inside.jpg"}, {"file_name": "../secret.jpg"}])
    manifest = manifest_for(tmp_path, ann, root, [f"{section}.allow_outside_root=true"])
    files = read_set(reader, ann, detection_images(manifest, which, section))
    assert [os.path.realpath(f) for f in files] == [str((root / "inside.jpg").resolve()), str(sentinel.resolve())]
    assert opened == [os.path.realpath(f) for f in files]   # the recorder sees what is read


def test_the_refusal_lists_a_few_names_and_counts_all(tmp_path, world, opened):
    root, _ = world
    ann = annotations(tmp_path, [{"file_name": "inside.jpg"}] + [{"file_name": f"../x{i}.jpg"} for i in range(7)])
    with pytest.raises(ImagesOutsideRoot) as err:
        DetectionSet(ann, images_root=root)
    message = str(err.value)
    assert "7 of 8 image file names" in message
    assert "'../x4.jpg', ..." in message and "../x5.jpg" not in message
    assert opened == []


def test_names_inside_the_root_read_as_before(tmp_path, world, opened):
    root, _ = world
    (root / "val2017").mkdir()
    (root / "val2017" / "2.jpg").write_bytes(jpeg_bytes(32, 24, seed=2))
    os.symlink(root / "inside.jpg", root / "same.jpg")          # a link that stays inside
    ann = annotations(tmp_path, [{"file_name": "inside.jpg"}, {"coco_url": "http://x/val2017/2.jpg"},
                                 {"file_name": "same.jpg"}])
    data = DetectionSet(ann, images_root=root)
    assert [data.image_path(r) for r in data.images] == [root / "inside.jpg", root / "val2017" / "2.jpg",
                                                         root / "same.jpg"]
    assert data.load_image(data.images[1]).shape == (3, 24, 32)
    boxes = read_coco_boxes(ann, root)
    assert [r["path"] for r in boxes.images] == [str(p) for p in map(data.image_path, data.images)]


def test_allow_outside_root_is_a_strict_runtime_only_setting(tmp_path, world):
    from pipeline.config import ManifestError, fingerprinted_settings

    root, _ = world
    ann = annotations(tmp_path, [{"file_name": "inside.jpg"}])
    for section in ("transfer", "train_rpn"):
        with pytest.raises(ManifestError, match=f"{section}.allow_outside_root"):
            manifest_for(tmp_path, ann, root, [f"{section}.allow_outside_root='yes'"])
        manifest = manifest_for(tmp_path, ann, root, [f"{section}.allow_outside_root=true"])
        assert getattr(manifest, section).allow_outside_root is True
        assert "allow_outside_root" not in fingerprinted_settings(getattr(manifest, section))
