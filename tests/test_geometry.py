"""One resize rule (trainer/models/geometry.py): the teacher labels, the student trains and the detector
runs each image at exactly the same size, including the sizes where rounding half up and Python's
round-half-to-even disagree."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.layout import StageDir
from pipeline.sidecars import ShardSidecarReader, write_caption_embeddings
from trainer.data.pretrain_stream import DataOptions, prepare_sample
from trainer.models.detector import prepare_images
from trainer.models.geometry import PAD_MULTIPLE, padded, resized_size
from trainer.offline.labels import resize_canonical

# (width, height, min_size, max_size): the first two scale a side to exactly x.5 pixels.
CASES = [(125, 100, 50, 1000), (5, 4, 2, 100), (640, 480, 800, 1333), (1000, 333, 800, 1333), (97, 61, 64, 96)]


def test_the_rule_rounds_half_up_and_caps_the_long_side():
    assert resized_size(125, 100, 50, 1000) == (63, 50)          # 62.5 -> 63 (round() would give 62)
    assert resized_size(5, 4, 2, 100) == (3, 2)                  # 2.5 -> 3 (round() would give 2)
    assert resized_size(640, 480, 800, 1333) == (1067, 800)
    assert resized_size(2000, 500, 800, 1333) == (1333, 333)     # long side capped: 333.25 -> 333
    assert [padded(n) for n in (1, 32, 33, 800)] == [32, 32, 64, 800]
    assert PAD_MULTIPLE == 32


@pytest.mark.parametrize("width,height,min_size,max_size", CASES)
def test_teacher_student_and_detector_resize_an_image_to_the_same_size(width, height, min_size, max_size, tmp_path):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))

    teacher_size = resize_canonical(image, min_size, max_size).size

    png = io.BytesIO()
    image.save(png, format="PNG")
    captions = StageDir(tmp_path)
    write_caption_embeddings(captions, 0, ["k"], np.zeros((1, 4), np.float16))
    side = ShardSidecarReader(captions.parquet(0))
    opts = DataOptions(batch_size=1, min_size=min_size, max_size=max_size, flip=False, online=True)
    sample = prepare_sample("k", {"png": png.getvalue()}, side, opts, np.random.default_rng(0))
    student_h, student_w = sample["size"]

    tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    _, _, sizes = prepare_images([tensor], min_size, max_size, "cpu")
    detector_h, detector_w = sizes[0]

    assert teacher_size == (student_w, student_h) == (detector_w, detector_h) == resized_size(
        width, height, min_size, max_size)
