"""Hostile detection annotations (round three): train-rpn, transfer and evaluate read every COCO-format
file through one loader (trainer.data.detection.load_coco). What cannot be used (NaN or infinite sizes,
a missing bbox, a bbox of text or of 3 numbers, ids of the wrong type) is an error naming the file and the
annotation; what is dropped (an unknown image or category, zero or negative size, a box outside its image,
a repeated id) is counted per reason in one warning, or refused with --strict; training boxes are clipped
to their image; an image listed twice counts once."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from pipeline.config import load_manifest
from stages.resolve import detection_images
from tests.corpora import jpeg_bytes
from trainer.data.detection import AnnotationError, DetectionSet, load_coco
from trainer.tasks.rpn import read_coco_boxes

# (manifest section, which set, the reader its stage uses)
READERS = [("transfer", "train", "DetectionSet"),      # transfer's training images
           ("transfer", "val", "DetectionSet"),        # evaluate's ground truth
           ("train_rpn", "train", "read_coco_boxes"),
           ("train_rpn", "val", "read_coco_boxes")]
W, H = 32, 24


def write_set(folder: Path, annotations: list[dict], images=None) -> Path:
    """Two 32x24 images (ids 1 and 2) with one good box each, then `annotations` (ids from 10 on)."""
    (folder / "images").mkdir(exist_ok=True)
    for i in (1, 2):
        (folder / "images" / f"{i}.jpg").write_bytes(jpeg_bytes(W, H, seed=i))
    images = images or [{"id": i, "file_name": f"{i}.jpg", "width": W, "height": H} for i in (1, 2)]
    good = [{"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 10, 10], "iscrowd": 0} for i in (1, 2)]
    path = folder / "instances.json"
    # allow_nan: Python's json writes NaN and Infinity, and reads them back
    path.write_text(json.dumps({"images": images, "categories": [{"id": 1, "name": "kite"}],
                                "annotations": good + [{"id": 10 + n, "image_id": 1, "category_id": 1, "iscrowd": 0,
                                                        **a} for n, a in enumerate(annotations)]}))
    return path


def manifest_for(folder: Path, ann: Path, overrides=()):
    sets = {"annotations": str(ann), "val_annotations": str(ann), "images_root": str(folder / "images"),
            "val_images_root": str(folder / "images")}
    path = folder / "m.yaml"
    path.write_text(json.dumps({"name": "t", "output_dir": str(folder / "run"), "corpus": {"format": "synthetic"},
                                "transfer": sets, "train_rpn": sets}))
    return load_manifest(path, list(overrides))


def read_set(reader: str, ann: Path, options: dict) -> dict[int, list]:
    """image id -> boxes [x1, y1, x2, y2] as the stage's reader sees them."""
    if reader == "DetectionSet":
        data = DetectionSet(ann, **options)
        return {im["id"]: data.targets(im["id"])[0].tolist() for im in data.images}
    boxes = read_coco_boxes(ann, **options)
    return {im["id"]: boxes.boxes.get(im["id"], []).tolist() if len(boxes.boxes.get(im["id"], [])) else []
            for im in boxes.images}


UNUSABLE = {
    "a NaN width": ({"bbox": [1, 1, math.nan, 4]}, "bbox must be 4 finite numbers"),
    "an infinite height": ({"bbox": [1, 1, 4, math.inf]}, "bbox must be 4 finite numbers"),
    "no bbox": ({}, "bbox must be 4 finite numbers [x, y, width, height] (got None)"),
    "a bbox of text": ({"bbox": ["a", "b", "c", "d"]}, "(got ['a', 'b', 'c', 'd'])"),
    "a bbox of 3 numbers": ({"bbox": [1, 2, 3]}, "(got [1, 2, 3])"),
    "a bbox of booleans": ({"bbox": [True, 1, 2, 3]}, "bbox must be 4 finite numbers"),
    "an image_id of text": ({"bbox": [1, 1, 4, 4], "image_id": "1"}, "image_id must be a whole number"),
}


@pytest.mark.parametrize("case", list(UNUSABLE))
@pytest.mark.parametrize("section,which,reader", READERS)
def test_what_cannot_be_used_is_an_error_naming_the_file_and_the_annotation(tmp_path, case, section, which, reader):
    record, message = UNUSABLE[case]
    ann = write_set(tmp_path, [record])
    options = detection_images(manifest_for(tmp_path, ann), which, section)
    with pytest.raises(AnnotationError) as err:
        read_set(reader, ann, options)
    assert str(err.value).startswith(f"{ann}: 1 record(s) cannot be used: annotation 10: ") and message in str(err.value)


DROPPED = [{"bbox": [1, 1, 4, 4], "image_id": 99},                 # unknown image_id
           {"bbox": [1, 1, 4, 4], "category_id": 7},               # unknown category_id
           {"bbox": [5, 5, -4, 6]},                                # negative width
           {"bbox": [5, 5, 0, 6]},                                 # zero width
           {"bbox": [500, 500, 40, 40]},                           # entirely outside the 32x24 image
           {"bbox": [-100, -100, 50, 50]},                         # entirely outside, above-left
           {"bbox": [1, 1, 4, 4], "id": 1}]                        # repeats annotation id 1


@pytest.mark.parametrize("section,which,reader", READERS)
def test_what_is_dropped_is_counted_per_reason_or_refused_with_strict(tmp_path, caplog, section, which, reader):
    ann = write_set(tmp_path, DROPPED)
    with caplog.at_level(logging.WARNING, logger="trainer.data.detection"):
        boxes = read_set(reader, ann, detection_images(manifest_for(tmp_path, ann), which, section))
    assert boxes == {1: [[2, 2, 12, 12]], 2: [[2, 2, 12, 12]]}
    warning = " ".join(r.getMessage() for r in caplog.records)
    for counted in ("unknown image_id 1", "unknown category_id 1", "zero or negative width or height 2",
                    "entirely outside its image 2", "annotation id listed twice (the first kept) 1",
                    "(of 9 annotations, 2 images)", f"{section}.strict_annotations: true (--strict) refuses"):
        assert counted in warning, (counted, warning)
    with pytest.raises(AnnotationError) as err:
        strict = manifest_for(tmp_path, ann, [f"{section}.strict_annotations=true"])
        read_set(reader, ann, detection_images(strict, which, section))
    assert str(err.value).startswith(f"{ann}: ") and "zero or negative width or height 2" in str(err.value)
    assert f"refused because of {section}.strict_annotations: true (--strict)" in str(err.value)


@pytest.mark.parametrize("section,which,reader", READERS)
def test_training_boxes_are_clipped_to_the_image_and_evaluation_boxes_kept(tmp_path, caplog, section, which, reader):
    far = {"bbox": [-1000, -1000, 2020, 1015]}          # reaches 1020 x 15: far outside, partly inside
    ann = write_set(tmp_path, [far])
    with caplog.at_level(logging.WARNING, logger="trainer.data.detection"):
        boxes = read_set(reader, ann, detection_images(manifest_for(tmp_path, ann), which, section))
    if which == "train":
        assert boxes[1] == [[2, 2, 12, 12], [0, 0, W, 15]]
        assert "clipped to the image 1" in caplog.text
    else:
        assert boxes[1] == [[2, 2, 12, 12], [-1000, -1000, 1020, 15]]
        assert "clipped" not in caplog.text


@pytest.mark.parametrize("section,which,reader", READERS)
def test_an_image_listed_twice_counts_once(tmp_path, caplog, section, which, reader):
    images = [{"id": i, "file_name": f"{i}.jpg", "width": W, "height": H} for i in (1, 2, 1)]
    ann = write_set(tmp_path, [], images=images)
    with caplog.at_level(logging.WARNING, logger="trainer.data.detection"):
        boxes = read_set(reader, ann, detection_images(manifest_for(tmp_path, ann), which, section))
    assert sorted(boxes) == [1, 2] and "image id listed twice (the first kept) 1" in caplog.text


@pytest.mark.parametrize("content,message", [
    (b"{", "not valid JSON"), (b"[]", "a COCO-format file is a JSON object"),
    (b'{"images": {}, "categories": []}', "'images' must be a list (got dict)"),
    (b'{"images": [{"id": 1, "file_name": "1.jpg"}], "categories": [{"id": 1}]}', "category #0 needs"),
    (b'{"images": [{"id": 1, "file_name": "1.jpg", "width": -3, "height": 4}], "categories": []}',
     "image 1: width and height must be positive numbers"),
])
def test_a_file_of_the_wrong_shape_is_an_error_naming_it(tmp_path, content, message):
    path = tmp_path / "instances.json"
    path.write_bytes(content)
    with pytest.raises(AnnotationError) as err:
        load_coco(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_a_training_image_without_a_size_is_refused_and_an_evaluation_one_read(tmp_path):
    ann = write_set(tmp_path, [], images=[{"id": i, "file_name": f"{i}.jpg"} for i in (1, 2)])
    with pytest.raises(AnnotationError, match="image 1: width and height must be positive numbers"):
        load_coco(ann, clip_boxes=True)
    assert len(load_coco(ann)["annotations"]) == 2


def test_the_cli_says_so_in_one_line(tmp_path, capsys):
    from stages.cli import main

    ann = write_set(tmp_path, [{"bbox": [1, 1, math.nan, 4]}])
    manifest = manifest_for(tmp_path, ann)
    code = main(["train-rpn", manifest.source_path, "--set", "train_rpn.enabled=true", "--set",
                 "corpus.format=folder", "--set", f"corpus.path={tmp_path / 'images'}"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and err.count("\n") == 1
    assert f"error: {ann}: 1 record(s) cannot be used: annotation 10: bbox must be 4 finite numbers" in err
