"""Evaluation (trainer/evaluation.py), detection data and splits (trainer/data/detection.py)."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import random

import pytest
import torch

from tests.detection_helpers import text_embeddings, tiny_clip
from trainer.data.detection import (COCO_OVD_BASE, COCO_OVD_NOVEL, DetectionSet, category_split,
                                    coco_ovd_split, hflip, repeat_factor_epoch, repeat_factors)
from trainer.evaluation import (LvisNotInstalledError, coco_evaluate, ground_truth_as_detections,
                                lvis_evaluate, merge_summary, region_recognition, zero_shot_detect)
from trainer.models.region_encoder import RegionEncoder


def toy_gt(num_images: int = 8, seed: int = 0) -> dict:
    """A COCO-format set with 5 categories (2 novel) and a few boxes per image."""
    rng = random.Random(seed)
    cats = [{"id": i, "name": n, "split": s} for i, n, s in
            [(1, "apple", "base"), (2, "kite", "base"), (3, "cup", "novel"), (5, "boat", "novel"),
             (7, "tree", "base")]]
    images, anns = [], []
    for i in range(1, num_images + 1):
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 200, "height": 160})
        for _ in range(rng.randint(1, 4)):
            w, h = rng.uniform(20, 60), rng.uniform(20, 60)
            x, y = rng.uniform(0, 200 - w), rng.uniform(0, 160 - h)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": rng.choice([1, 2, 3, 5, 7]),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    return {"images": images, "annotations": anns, "categories": cats}


def perturb(gt: dict, seed: int = 1) -> list[dict]:
    """GT shifted a little (some beyond IoU 0.5), some dropped, some relabelled, false positives."""
    rng = random.Random(seed)
    dets = []
    for a in gt["annotations"]:
        if rng.random() < 0.15:
            continue
        x, y, w, h = a["bbox"]
        shift = rng.choice([0.05, 0.1, 0.4])
        cat = a["category_id"] if rng.random() > 0.1 else rng.choice([1, 2, 3, 5, 7])
        dets.append({"image_id": a["image_id"], "category_id": cat, "bbox": [x + shift * w, y, w, h],
                     "score": rng.random()})
    for im in gt["images"]:
        for _ in range(2):
            dets.append({"image_id": im["id"], "category_id": rng.choice([1, 2, 3, 5, 7]),
                         "bbox": [rng.uniform(0, 150), rng.uniform(0, 110), 40, 40], "score": rng.random() * 0.5})
    return dets


def pycocotools_ap50(gt: dict, dets: list[dict], cat_ids: list[int]) -> float:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(dets)), "bbox")
        ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[1] * 100


# -- COCO AP50 by split ---------------------------------------------------------------------------------

def test_ground_truth_as_detections_scores_100_on_every_split():
    gt = toy_gt()
    result = coco_evaluate(gt, ground_truth_as_detections(gt), category_split(gt["categories"]))
    assert result["AP50"] == {"all": 100.0, "base": 100.0, "novel": 100.0}
    assert result["coco"]["AP"] == 100.0
    assert all(v == 100.0 for v in result["per_category_AP50"].values())


def test_perturbed_detections_match_pycocotools_directly():
    gt = toy_gt()
    dets = perturb(gt)
    split = category_split(gt["categories"])
    result = coco_evaluate(gt, dets, split)
    for group, ids in [("all", [1, 2, 3, 5, 7]), ("base", split["base"]), ("novel", split["novel"])]:
        direct = pycocotools_ap50(gt, dets, ids)
        assert result["AP50"][group] == pytest.approx(direct, abs=1e-3), group
        assert 0 < result["AP50"][group] < 100
    assert result["coco"]["AP50"] == pytest.approx(pycocotools_ap50(gt, dets, [1, 2, 3, 5, 7]), abs=1e-3)


def test_no_detections_and_missing_categories():
    gt = toy_gt()
    split = category_split(gt["categories"])
    assert coco_evaluate(gt, [], split)["AP50"] == {"all": 0.0, "base": 0.0, "novel": 0.0}
    # A split with no ground truth at all is null, not zero.
    gt2 = {**gt, "annotations": [a for a in gt["annotations"] if a["category_id"] not in (3, 5)]}
    result = coco_evaluate(gt2, ground_truth_as_detections(gt2), split)
    assert result["AP50"]["novel"] is None and result["AP50"]["base"] == 100.0


# -- LVIS ------------------------------------------------------------------------------------------------

def toy_lvis(tmp_path):
    gt = toy_gt()
    freq = {1: "f", 2: "c", 3: "r", 5: "r", 7: "f"}
    for c in gt["categories"]:
        c.pop("split")
        c.update(frequency=freq[c["id"]], synset=c["name"], image_count=1, instance_count=1)
    for im in gt["images"]:
        im.update(neg_category_ids=[], not_exhaustive_category_ids=[],
                  coco_url=f"http://images.cocodataset.org/val2017/{im.pop('file_name')}")
    path = tmp_path / "lvis_val.json"
    path.write_text(json.dumps(gt))
    return gt, path


def test_lvis_split_and_ground_truth_ap(tmp_path):
    gt, path = toy_lvis(tmp_path)
    data = DetectionSet(path)
    assert data.kind == "lvis"
    assert data.category_split == {"base": [1, 2, 7], "novel": [3, 5]}
    assert str(data.image_path(data.images[0])).endswith("val2017/1.jpg")
    # An image without a box is not evaluated, as the reference's LVIS loader skips it; COCO keeps all.
    empty = {**gt["images"][0], "id": 99, "coco_url": "http://images.cocodataset.org/val2017/99.jpg"}
    (tmp_path / "with_empty.json").write_text(json.dumps({**gt, "images": gt["images"] + [empty]}))
    assert DetectionSet(tmp_path / "with_empty.json").evaluation_image_ids() == [im["id"] for im in gt["images"]]
    coco = toy_gt()
    coco_images = coco["images"] + [{**coco["images"][0], "id": 99}]
    (tmp_path / "coco.json").write_text(json.dumps({**coco, "images": coco_images}))
    assert DetectionSet(tmp_path / "coco.json").evaluation_image_ids() == [im["id"] for im in coco_images]
    import lvis  # noqa: F401  (installed by the test extra; the LVIS API must really run here)
    result = lvis_evaluate(path, ground_truth_as_detections(gt))
    assert result["AP"] == pytest.approx(100.0) and result["APr"] == pytest.approx(100.0)


def test_lvis_missing_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lvis(name, *args, **kwargs):
        if name == "lvis" or name.startswith("lvis."):
            raise ImportError("No module named 'lvis'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lvis)
    with pytest.raises(LvisNotInstalledError, match="pip install"):
        lvis_evaluate(tmp_path / "x.json", [])


# -- splits, sampling, augmentation -------------------------------------------------------------------------

def test_category_split_sources():
    assert category_split([{"id": 1, "name": "a", "split": "novel"}, {"id": 2, "name": "b", "split": "base"}]) \
        == {"base": [2], "novel": [1]}
    coco = [{"id": i, "name": n} for i, n in enumerate(COCO_OVD_BASE + COCO_OVD_NOVEL + ("hair drier",))]
    split = category_split(coco)
    assert len(split["novel"]) == 17 and len(split["base"]) == 49   # hair drier is neither: base here
    assert category_split([{"id": 1, "name": "x"}]) == {"base": [1], "novel": []}


def test_coco_ovd_split():
    names = list(COCO_OVD_BASE + COCO_OVD_NOVEL) + ["hair drier", "teddy bear"]
    cats = [{"id": i + 1, "name": n, "supercategory": "x"} for i, n in enumerate(names)]
    cid = {n: i + 1 for i, n in enumerate(names)}
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 10, "height": 10} for i in range(1, 6)]
    box = [1, 1, 5, 5]
    anns = [(1, "person"), (1, "cat"), (2, "dog"), (3, "hair drier"), (4, "cup"), (4, "tv"), (5, "teddy bear")]
    anns = [{"id": k, "image_id": i, "category_id": cid[n], "bbox": box, "area": 25, "iscrowd": 0}
            for k, (i, n) in enumerate(anns)]
    data = {"info": {}, "images": images, "annotations": anns, "categories": cats}
    train, val = coco_ovd_split(data, copy.deepcopy(data))
    assert len(train["categories"]) == 48 and len(val["categories"]) == 65
    assert {c["split"] for c in train["categories"]} == {"base"}
    assert sum(c["split"] == "novel" for c in val["categories"]) == 17
    assert [im["id"] for im in train["images"]] == [1, 4]          # images with a base box
    assert {a["category_id"] for a in train["annotations"]} == {cid["person"], cid["tv"]}
    assert [im["id"] for im in val["images"]] == [1, 2, 4]
    assert len(val["annotations"]) == 5
    with pytest.raises(ValueError, match="categories missing"):
        coco_ovd_split({"categories": cats[:10]}, data)


def test_repeat_factors():
    # 1000 images: category 1 in all, category 2 in one. f(2) = 0.001 / ... threshold 0.01
    gt = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(1000)],
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
          "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [0, 0, 5, 5]} for i in range(1000)]
          + [{"id": 5000, "image_id": 7, "category_id": 2, "bbox": [0, 0, 5, 5]}]}
    data = DetectionSet(gt)
    factors = repeat_factors(data, list(range(1000)), threshold=0.01)
    assert factors[7] == pytest.approx(math.sqrt(0.01 / 0.001))   # sqrt(10)
    assert factors[0] == 1.0 and float(factors.sum()) == pytest.approx(999 + math.sqrt(10))
    epoch = repeat_factor_epoch(factors, random.Random(0))
    assert epoch.count(7) in (3, 4) and len(epoch) in (1002, 1003)


def test_repeat_factors_at_the_lvis_threshold():
    # 4000 training images, threshold t = 0.001; r(c) = max(1, sqrt(t / f(c))), f(c) = images with c / 4000:
    #   category 1 in every image:   f = 1         -> r = 1
    #   category 2 in image 0 only:  f = 0.00025   -> r = sqrt(4) = 2
    #   category 3 in images 1, 2:   f = 0.0005    -> r = sqrt(2) = 1.414214
    #   category 4 in images 2..5:   f = 0.001     -> r = 1
    #   category 5 (novel, not in the training vocabulary) in image 7 only: ignored -> image 7 r = 1
    # An image repeats max over its categories: image 2 (categories 1, 3, 4) -> sqrt(2).
    n = 4000
    anns = [(i, 1) for i in range(n)] + [(0, 2), (1, 3), (2, 3)] + [(i, 4) for i in range(2, 6)] + [(7, 5)]
    gt = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(n)],
          "categories": [{"id": c, "name": f"c{c}", "split": "novel" if c == 5 else "base"} for c in range(1, 6)],
          "annotations": [{"id": k, "image_id": i, "category_id": c, "bbox": [0, 0, 5, 5]}
                          for k, (i, c) in enumerate(anns)]}
    data = DetectionSet(gt)
    factors = repeat_factors(data, list(range(n)), threshold=0.001, vocab=data.vocabulary("base"))
    assert factors[:8].tolist() == pytest.approx([2.0, math.sqrt(2), math.sqrt(2), 1.0, 1.0, 1.0, 1.0, 1.0])
    assert float(factors.sum()) == pytest.approx(3997 + 2 + 2 * math.sqrt(2))
    # detectron2's stochastic rounding: image 0 twice in every epoch, images 1 and 2 once or twice
    for seed in range(5):
        epoch = repeat_factor_epoch(factors, random.Random(seed))
        assert epoch.count(0) == 2 and epoch.count(1) in (1, 2) and epoch.count(7) == 1
        assert len(epoch) == 3997 + 2 + epoch.count(1) + epoch.count(2)


def test_hflip_boxes():
    image = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(3, 2, 4)
    flipped, boxes = hflip(image, torch.tensor([[0.0, 0.0, 1.0, 2.0]]))
    assert torch.equal(flipped[:, :, 0], image[:, :, 3])
    assert boxes.tolist() == [[3.0, 0.0, 4.0, 2.0]]


def test_synthetic_world_targets(tmp_path):
    from pipeline.config import SynthConfig
    from pipeline.synth import generate_world

    generate_world(SynthConfig(num_images=6, num_val_images=3, min_side=64, max_side=96), tmp_path, progress=False)
    train = DetectionSet(tmp_path / "instances_train.json")
    base = train.vocabulary("base")
    assert len(base) == 18 and len(train.vocabulary("novel")) == 6
    ids = train.image_ids_with_boxes(base)
    boxes, labels = train.targets(ids[0], base)
    assert len(boxes) == len(labels) > 0 and (boxes[:, 2:] > boxes[:, :2]).all()
    image = train.load_image(train.image_by_id[ids[0]])
    assert image.shape[0] == 3 and 0 <= float(image.min()) and float(image.max()) <= 1


# -- zero-shot ----------------------------------------------------------------------------------------------

def test_zero_shot_scores_objectness_modes():
    model, tok = tiny_clip(0)
    encoder = RegionEncoder.from_clip(model).eval()
    emb = text_embeddings(model, tok, ["apple", "kite", "cup"])
    image = torch.rand(3, 80, 100)
    boxes = torch.tensor([[5.0, 5, 40, 40], [50, 20, 95, 70], [10, 40, 60, 78]])
    plain = zero_shot_detect(encoder, image, boxes, emb, min_size=80, max_size=128, nms_thresh=1.0,
                             score_threshold=0.0, detections_per_image=100)
    # GT boxes: every box x class above the threshold, score = p_c; box_labels = argmax per box.
    assert len(plain["scores"]) == 9
    logits = torch.tensor([2.0, -1.0, 0.5])
    sig = zero_shot_detect(encoder, image, boxes, emb, objectness=logits, min_size=80, max_size=128,
                           nms_thresh=1.0, score_threshold=0.0)
    raw = zero_shot_detect(encoder, image, boxes, emb, objectness=logits, objectness_mode="raw",
                           min_size=80, max_size=128, nms_thresh=1.0, score_threshold=0.0)
    for found in (plain, sig, raw):
        assert torch.equal(found["box_labels"], plain["box_labels"])
    # The softmax has the background logit 0 in its denominator (the reference's head): with cosines
    # made near 0 by a huge temperature, each of 3 classes scores about 1/4, not 1/3.
    flat = zero_shot_detect(encoder, image, boxes, emb, min_size=80, max_size=128, nms_thresh=1.0,
                            score_threshold=0.0, temperature=1000.0)
    assert flat["scores"].tolist() == pytest.approx([0.25] * 9, abs=1e-3)

    def table(found):
        return {(tuple(b.tolist()), int(c)): float(s) for b, s, c in
                zip(found["boxes"], found["scores"], found["labels"])}

    p, s, r = table(plain), table(sig), table(raw)
    for (box, c), prob in p.items():
        k = [tuple(b.tolist()) for b in boxes].index(box)
        assert s[(box, c)] == pytest.approx(math.sqrt(prob * torch.sigmoid(logits[k]).item()), rel=1e-5)
        if logits[k] > 0:
            assert r[(box, c)] == pytest.approx(math.sqrt(prob * logits[k].item()), rel=1e-5)
        else:
            assert (box, c) not in r        # the reference's NaN: dropped


def test_region_recognition_counts(tmp_path):
    from PIL import Image

    gt = toy_gt(num_images=3)
    for im in gt["images"]:
        Image.new("RGB", (200, 160), (120, 30, 200)).save(tmp_path / im["file_name"])
    data = DetectionSet(gt, images_root=tmp_path)
    model, tok = tiny_clip(0)
    vocab = data.vocabulary("all")
    emb = text_embeddings(model, tok, vocab.names)
    result = region_recognition(RegionEncoder.from_clip(model).eval(), data, emb, vocab, [1, 2, 3],
                                min_size=96, max_size=128)
    n = sum(1 for a in gt["annotations"] if a["image_id"] <= 3)
    assert result["regions"]["all"] == n == result["regions"]["base"] + result["regions"]["novel"]
    assert 0 <= result["top1"]["all"] <= 100


def test_merge_summary_keeps_other_sections(tmp_path):
    path = tmp_path / "eval" / "summary.json"
    merge_summary(path, "demo_table", {"rows": [1, 2]})
    merge_summary(path, "evaluate", {"detector": {"pretrain": {"novel": 1.0}}})
    merge_summary(path, "evaluate", {"detector": {"teacher": {"novel": 2.0}}})
    summary = json.loads(path.read_text())
    assert summary == {"demo_table": {"rows": [1, 2]}, "evaluate": {"detector": {"teacher": {"novel": 2.0}}}}


def test_coco_ovd_split_command(write_manifest, tmp_path):
    from stages.cli import main

    names = list(COCO_OVD_BASE + COCO_OVD_NOVEL)
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    data = {"images": [{"id": 1, "file_name": "1.jpg", "width": 9, "height": 9},
                       {"id": 2, "file_name": "2.jpg", "width": 9, "height": 9}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3], "area": 9},
                            {"id": 2, "image_id": 2, "category_id": names.index("cat") + 1, "bbox": [1, 1, 3, 3],
                             "area": 9}],
            "categories": cats}
    (tmp_path / "train.json").write_text(json.dumps(data))
    (tmp_path / "val.json").write_text(json.dumps(data))
    manifest = write_manifest("transfer: {annotations: ovd/train_base.json, val_annotations: ovd/val_all.json}\n")
    assert main(["coco-ovd-split", manifest.source_path, "--train", str(tmp_path / "train.json"),
                 "--val", str(tmp_path / "val.json")]) == 0
    train = json.loads((tmp_path / "ovd" / "train_base.json").read_text())
    val = json.loads((tmp_path / "ovd" / "val_all.json").read_text())
    assert [im["id"] for im in train["images"]] == [1] and len(val["images"]) == 2
    assert main(["coco-ovd-split", manifest.source_path, "--train", str(tmp_path / "train.json"),
                 "--val", str(tmp_path / "val.json"), "--out-dir", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "instances_val2017_ovd65.json").is_file()


# -- the margins' bootstrap intervals -------------------------------------------------------------------

def test_ap50_matches_reproduce_pycocotools_and_a_resampled_set():
    import numpy as np

    from trainer.evaluation import Ap50Matches

    gt = toy_gt(num_images=20, seed=3)
    dets = perturb(gt, seed=4)
    ids = [im["id"] for im in gt["images"]]
    matches = Ap50Matches(gt, dets, ids)
    direct = coco_evaluate(gt, dets, category_split(gt["categories"]))["per_category_AP50"]
    ones = matches.ap50(np.ones((1, len(ids))))[0]
    names = {c["id"]: c["name"] for c in gt["categories"]}
    for k, cid in enumerate(matches.category_ids):
        assert ones[k] == pytest.approx(direct[names[cid]], abs=1e-3), names[cid]

    # a draw that takes image 1 three times, image 2 twice and leaves out images 3..6 scores as
    # pycocotools scores that resampled set written out (copies under new ids)
    counts = np.ones(len(ids))
    counts[0], counts[1], counts[2:6] = 3, 2, 0
    resampled = {"images": [], "annotations": [], "categories": gt["categories"]}
    resampled_dets = []
    for i, image in enumerate(gt["images"]):
        for copy_index in range(int(counts[i])):
            new_id = image["id"] * 100 + copy_index
            resampled["images"].append({**image, "id": new_id})
            resampled["annotations"] += [{**a, "id": len(resampled["annotations"]) + j + 1, "image_id": new_id}
                                         for j, a in enumerate(a for a in gt["annotations"]
                                                               if a["image_id"] == image["id"])]
            resampled_dets += [{**d, "image_id": new_id} for d in dets if d["image_id"] == image["id"]]
    expected = coco_evaluate(resampled, resampled_dets, category_split(gt["categories"]))["per_category_AP50"]
    weighted = matches.ap50(counts[None, :])[0]
    for k, cid in enumerate(matches.category_ids):
        if expected[names[cid]] is None:
            assert np.isnan(weighted[k])
        else:
            assert weighted[k] == pytest.approx(expected[names[cid]], abs=1e-3), names[cid]


def _tally(correct_novel: list[int], correct_base: list[int]):
    """A RecognitionTally over images holding one novel and one base region each (vocabulary: the toy
    categories; novel ids 3 and 5), with the given per-image hits."""
    from trainer.data.detection import DetectorClasses
    from trainer.evaluation import RecognitionTally

    vocab = DetectorClasses(ids=[1, 2, 3, 5, 7], names=["apple", "kite", "cup", "boat", "tree"])
    tally = RecognitionTally(vocab, novel_ids=[3, 5])
    for novel_hit, base_hit in zip(correct_novel, correct_base):
        labels = torch.tensor([2, 0])                       # cup (novel), apple (base)
        tally.add(torch.tensor([2 if novel_hit else 3, 0 if base_hit else 1]), labels)
    return tally


def test_paired_bootstrap_interval_of_the_top1_margin():
    import numpy as np

    from trainer.evaluation import margin_intervals

    rng = np.random.default_rng(7)
    n = 600
    student = (rng.random(n) < 0.6).astype(int)
    teacher = (rng.random(n) < 0.4).astype(int)
    recognition = {"pretrain": _tally(student, student), "teacher": _tally(teacher, 1 - teacher)}
    assert recognition["pretrain"].result()["regions"] == {"all": 2 * n, "base": n, "novel": n}
    split = {"novel": [3, 5], "base": [1, 2, 7]}
    low, high = margin_intervals(split, n, recognition=recognition)["region_top1_novel"]
    margin = 100.0 * (student.mean() - teacher.mean())
    # the percentile interval of a mean of paired differences is close to margin +- 1.96 standard errors
    standard_error = 100.0 * (student - teacher).std(ddof=1) / np.sqrt(n)
    assert low < margin < high
    assert low == pytest.approx(margin - 1.96 * standard_error, abs=0.4 * standard_error)
    assert high == pytest.approx(margin + 1.96 * standard_error, abs=0.4 * standard_error)
    # seeded: the same draws give the same interval, another seed a (slightly) different one
    assert margin_intervals(split, n, recognition=recognition)["region_top1_novel"] == [low, high]
    assert margin_intervals(split, n, recognition=recognition, seed=1)["region_top1_novel"] != [low, high]
    # pairing: a student that is the teacher plus the same extra hits everywhere has a narrow interval
    same = {"pretrain": _tally(np.maximum(teacher, student), teacher), "teacher": _tally(teacher, teacher)}
    paired = margin_intervals(split, n, recognition=same)["region_top1_novel"]
    assert paired[1] - paired[0] < high - low


def test_headline_figures_and_table_show_intervals_and_counts():
    from trainer.evaluation import headline_figures, results_table

    summary = {"images": 1100, "regions": {"all": 2700, "base": 2050, "novel": 650},
               "region_recognition_top1": {"teacher": {"novel": 30.0, "base": 40.0},
                                           "pretrain": {"novel": 42.3, "base": 55.0}},
               "zero_shot_gt_boxes": {"teacher": {"novel": 50.0, "base": 60.0},
                                      "pretrain": {"novel": 70.0, "base": 75.0}},
               "detector": {"teacher": {"novel": 8.0, "base": 30.0, "all": 25.0},
                            "pretrain": {"novel": 13.0, "base": 35.0, "all": 30.0}},
               "intervals": {"region_top1_novel": [7.1, 17.6], "transfer_ap50_novel": [1.5, 8.24]},
               "bootstrap": {"resamples": 1000, "seed": 0}}
    f = headline_figures(summary)
    assert f["margin_region_top1_novel"] == pytest.approx(12.3)
    assert f["margin_region_top1_novel_ci95"] == [7.1, 17.6]
    assert f["margin_transfer_ap50_novel_ci95"] == [1.5, 8.24]
    assert f["margin_gt_ap50_base_ci95"] is None
    assert (f["novel_regions"], f["base_regions"], f["images"]) == (650, 2050, 1100)
    table = results_table(summary)
    assert "| student - teacher | +12.3 [+7.1, +17.6] | +15.0 | +20.0 | +15.0 |" in table
    assert "| student - teacher | +5.0 [+1.5, +8.2] | +5.0 | +5.0 |" in table
    assert "1100 images: 650 novel and 2050 base regions" in table
