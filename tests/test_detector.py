"""The open-vocabulary detector (trainer/models/detector.py), transfer/evaluate stages and `regionclip detect`.
Tiny random CLIPs, a stand-in RPN, a tiny synthetic world."""
from __future__ import annotations

import json
import logging
import math
import random
import warnings

import pytest
import torch
from torchvision.ops import box_iou

from tests.detection_helpers import StandInRPN, save_tiny_clip, text_embeddings, tiny_clip
from trainer.models.checkpoint import CheckpointError
from trainer.models.clip import EmbeddingDimError
from trainer.models.detector import (DetectorSettings, OpenVocabDetector, build_detector, rpn_weighted_scores,
                                     save_detector, select_detections, soft_nms)

SMALL = DetectorSettings(min_sizes=(64, 96), max_size=128, test_min_size=96, test_max_size=128,
                         rois_per_image=32)


def make_detector(names=("apple", "kite", "cup"), seed=0, settings=SMALL):
    model, tok = tiny_clip(seed)
    return OpenVocabDetector(model.visual, text_embeddings(model, tok, names), settings, arch="RN50-tiny"), model, tok


def batch():
    images = [torch.rand(3, 80, 100), torch.rand(3, 90, 70)]
    targets = [{"boxes": torch.tensor([[10.0, 10, 50, 60], [55, 20, 95, 75]]), "labels": torch.tensor([0, 2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    proposals = [torch.tensor([[12.0, 8, 52, 58], [0, 0, 100, 80], [60, 25, 90, 70]]),
                 torch.tensor([[5.0, 5, 40, 40], [20, 30, 65, 85]])]
    return images, proposals, targets


# -- soft-NMS -------------------------------------------------------------------------------------------

def naive_soft_nms(boxes, scores, sigma, threshold, prune):
    """Per class, the textbook loop (Bodla et al.) as detectron2 runs it: scores above `threshold` enter;
    pick the max, decay the rest, drop those decayed to `prune` or below."""
    kept = []
    for c in range(scores.shape[1]):
        live = {i: float(scores[i, c]) for i in range(len(boxes)) if scores[i, c] > threshold}
        while live:
            i = max(live, key=live.get)
            kept.append((i, c, live.pop(i)))
            for j in list(live):
                iou = float(box_iou(boxes[i:i + 1], boxes[j:j + 1]))
                live[j] *= math.exp(-iou * iou / sigma)
                if live[j] <= prune:
                    del live[j]
    return kept


@pytest.mark.parametrize("threshold,prune", [(0.05, 0.05), (0.02, 0.001)])   # COCO-like; LVIS' 0.02 / 0.001
def test_soft_nms_matches_the_textbook_loop(threshold, prune):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(40, 2, generator=g) * 60
    boxes = torch.cat([xy, xy + 10 + torch.rand(40, 2, generator=g) * 30], dim=1)
    scores = torch.rand(40, 3, generator=g) * 0.1
    idx, cls, score = soft_nms(boxes, scores, sigma=0.5, score_threshold=threshold, prune_threshold=prune)
    ours = sorted(zip(idx.tolist(), cls.tolist(), score.tolist()))
    theirs = sorted(naive_soft_nms(boxes, scores, 0.5, threshold, prune))
    assert [(i, c) for i, c, _ in ours] == [(i, c) for i, c, _ in theirs]
    assert [s for *_, s in ours] == pytest.approx([s for *_, s in theirs], rel=1e-5)
    decayed_below_threshold = sum(s <= threshold for *_, s in ours)
    assert (decayed_below_threshold > 0) == (prune < threshold)    # kept between the two only with LVIS'
    # Far-apart boxes are untouched; a duplicate decays by exp(-1 / sigma).
    two = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]])
    i, c, s = soft_nms(two, torch.tensor([[0.9], [0.8], [0.7]]), sigma=0.5, score_threshold=0.001)
    assert sorted(s.tolist()) == pytest.approx(sorted([0.9, 0.7, 0.8 * math.exp(-2)]))


def test_select_detections_topk_and_threshold():
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40]])
    probs = torch.tensor([[0.9, 0.0005], [0.3, 0.6]])
    found = select_detections(boxes, probs, DetectorSettings(detections_per_image=2), (50, 50))
    assert found["scores"].tolist() == pytest.approx([0.9, 0.6])
    assert found["labels"].tolist() == [0, 1]


# -- the model ---------------------------------------------------------------------------------------------

def test_training_step_trains_the_right_parts():
    detector, model, _ = make_detector()
    detector.train()
    images, proposals, targets = batch()
    losses = detector(images, proposals, targets)
    assert set(losses) == {"loss_cls", "loss_box"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    visual = detector.encoder.visual
    stem = [p for n in ("conv1", "conv2", "conv3", "layer1") for p in getattr(visual, n).parameters()]
    assert stem and all(p.grad is None for p in stem)
    assert all(not p.requires_grad for p in visual.layer1.parameters())
    assert visual.layer3[0].conv1.weight.grad is not None and visual.attnpool.q_proj.weight.grad is not None
    assert detector.bbox_pred.weight.grad is not None
    assert not detector.class_embeddings.requires_grad
    assert "class_embeddings" not in detector.state_dict()          # the vocabulary is not a weight
    # Frozen BatchNorm: train mode does not update statistics.
    from torchvision.ops import FrozenBatchNorm2d
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in detector.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in detector.modules())


def test_classification_loss_focal_and_background_weight():
    detector, _, _ = make_detector(settings=DetectorSettings(focal_gamma=0.5, background_weight=0.2))
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    labels = torch.tensor([0, 3, 3])                      # 3 = background (3 classes)
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    p = torch.exp(-ce)
    expected = (ce * (1 - p) ** 0.5 * torch.tensor([1.0, 0.2, 0.2])).mean()
    assert detector.classification_loss(logits, labels) == pytest.approx(float(expected), rel=1e-5)
    lvis, _, _ = make_detector(settings=DetectorSettings(focal_gamma=None, background_weight=0.8))
    weights = torch.tensor([1.0, 1.0, 1.0, 0.8])
    expected = torch.nn.functional.cross_entropy(logits, labels, weight=weights)
    assert lvis.classification_loss(logits, labels) == pytest.approx(float(expected), rel=1e-5)
    # Saturated logits (cos / 0.01): a finite gradient, not NaN.
    sat = torch.tensor([[100.0, -100.0, -100.0, 0.0]], requires_grad=True)
    detector.classification_loss(sat, torch.tensor([0])).backward()
    assert torch.isfinite(sat.grad).all()


def test_only_sample_fg_proposals_never_trains_on_background_rois():
    """RegionCLIP's ONLY_SAMPLE_FG_PROPOSALS: the classifier sees foreground RoIs only, so background
    proposals (where unlabelled novel objects sit) cannot change the loss; the default sampler can."""
    images, proposals, targets = batch()
    far = torch.tensor([[70.0, 0, 100, 8], [0, 70, 9, 80]])                  # IoU 0 with every GT box
    with_bg = [torch.cat([proposals[0], far]), proposals[1]]

    def loss(settings, props):
        detector, _, _ = make_detector(settings=settings)
        detector.train()
        torch.manual_seed(0)
        random.seed(0)                                                     # the multi-scale draw
        return {k: float(v.detach()) for k, v in detector(images, props, targets).items()}

    fg_only = DetectorSettings(**{**SMALL.__dict__, "only_sample_fg_proposals": True})
    assert loss(fg_only, proposals) == loss(fg_only, with_bg)
    assert loss(SMALL, proposals)["loss_cls"] != loss(SMALL, with_bg)["loss_cls"]
    detector, _, _ = make_detector(settings=fg_only)
    labels = torch.tensor([0, 1, 0, 1, 1, -1, 1, 0])                       # 1 = foreground
    picked = detector._sample_foreground(labels)
    assert sorted(picked.tolist()) == [1, 3, 4, 6]                          # 32 * 0.25 = 8 >= 4
    assert detector._sample_foreground(torch.tensor([0, 0, -1])).tolist() == [0]   # no GT: one bg RoI


def test_multiply_rpn_score_ranks_by_objectness():
    """MULTIPLY_RPN_SCORE: score = sqrt(p * sigmoid(objectness)); without it objectness is ignored."""
    detector, _, _ = make_detector(settings=DetectorSettings(
        **{**SMALL.__dict__, "nms": "hard", "score_threshold": 0.0, "detections_per_image": 100}))
    detector.eval()
    image = torch.rand(3, 96, 96)
    box = torch.tensor([[10.0, 10, 60, 60]])
    plain = detector.detect([image], [box], [torch.tensor([3.0])])[0]
    detector.settings.multiply_rpn_score = True
    for logit in (3.0, -2.0):
        found = detector.detect([image], [box], [torch.tensor([logit])])[0]
        assert found["labels"].tolist() == plain["labels"].tolist()
        expected = torch.sqrt(plain["scores"] * torch.sigmoid(torch.tensor(logit)))
        assert torch.allclose(found["scores"], expected, atol=1e-6)
    assert torch.equal(detector.detect([image], [box])[0]["scores"], plain["scores"])   # no objectness given


def test_rpn_weighted_scores_raw_and_sigmoid_forms():
    probs = torch.tensor([[0.64, 0.25]])
    # raw (the reference's sqrt(p * logit)): logit 2.25 -> sqrt(1.44) = 1.2 (above 1) and sqrt(0.5625) = 0.75;
    # logit 0.04 -> sqrt(0.0256) = 0.16, sqrt(0.01) = 0.1; logit -1 -> NaN in the reference (dropped): -1 here
    raw = rpn_weighted_scores(probs.expand(3, 2), torch.tensor([2.25, 0.04, -1.0]), "raw")
    assert torch.allclose(raw, torch.tensor([[1.2, 0.75], [0.16, 0.1], [-1.0, -1.0]]), atol=1e-6)
    # sigmoid: logit 0 -> o = 0.5: sqrt(0.32) = 0.565685, sqrt(0.125) = 0.353553;
    # logit ln 3 -> o = 0.75: sqrt(0.48) = 0.692820, sqrt(0.1875) = 0.433013
    sig = rpn_weighted_scores(probs.expand(2, 2), torch.tensor([0.0, math.log(3.0)]), "sigmoid")
    assert torch.allclose(sig, torch.tensor([[0.565685, 0.353553], [0.692820, 0.433013]]), atol=1e-6)
    with pytest.raises(ValueError, match="objectness mode"):
        rpn_weighted_scores(probs, torch.tensor([1.0]), "softplus")


def test_multiply_rpn_score_raw_form_in_the_detector():
    """settings.objectness = raw: sqrt(p * logit); a proposal with a negative logit yields no detection."""
    detector, _, _ = make_detector(settings=DetectorSettings(
        **{**SMALL.__dict__, "nms": "hard", "score_threshold": 0.0, "detections_per_image": 100}))
    detector.eval()
    image, box = torch.rand(3, 96, 96), torch.tensor([[10.0, 10, 60, 60]])
    plain = detector.detect([image], [box])[0]
    detector.settings.multiply_rpn_score, detector.settings.objectness = True, "raw"
    found = detector.detect([image], [box], [torch.tensor([2.25])])[0]
    assert found["labels"].tolist() == plain["labels"].tolist()
    assert torch.allclose(found["scores"], 1.5 * torch.sqrt(plain["scores"]), atol=1e-6)   # sqrt(2.25) = 1.5
    assert len(detector.detect([image], [box], [torch.tensor([-2.0])])[0]["scores"]) == 0


def test_lvis_manifest_runs_the_reference_settings():
    from pipeline.config import load_manifest
    from stages.resolve import detector_settings, train_settings
    from tests.conftest import REPO

    manifest = load_manifest(REPO / "manifests" / "lvis.yaml")
    train = train_settings(manifest)
    assert (train.steps, train.lr_steps, train.warmup_steps) == (180000, [120000, 160000], 5000)
    assert train.repeat_factor_threshold == 0.001
    test = detector_settings(manifest)
    assert (test.score_threshold, test.soft_nms_prune, test.detections_per_image) == (0.02, 0.001, 300)
    assert test.multiply_rpn_score and test.objectness == "raw" and test.nms == "soft"
    assert (test.focal_gamma, test.background_weight) == (None, 0.8)


def test_classifier_is_cosine_over_temperature_with_zero_background():
    detector, _, _ = make_detector()
    x = torch.randn(5, detector.embed_dim)
    detector.bbox_pred.weight.data.zero_()
    from trainer.models.detector import class_logits
    logits = class_logits(x, detector.class_embeddings, 0.01)
    expected = torch.nn.functional.normalize(x, dim=-1) @ detector.class_embeddings.t() / 0.01
    assert torch.allclose(logits[:, :3], expected, atol=1e-4) and torch.all(logits[:, 3] == 0)


def test_vocabulary_swap_at_test_time_needs_no_class_count():
    detector, model, tok = make_detector(("apple", "kite"))
    state = {k: v.clone() for k, v in detector.state_dict().items()}
    detector.eval()
    images, proposals, _ = batch()
    detector.set_vocabulary(text_embeddings(model, tok, ["apple", "kite", "cup", "boat", "tree"]))
    assert detector.num_classes == 5
    assert set(detector.state_dict()) == set(state)
    found = detector(images, proposals)
    assert len(found) == 2 and all(int(f["labels"].max()) < 5 for f in found if len(f["labels"]))
    for f, image in zip(found, images):
        h, w = image.shape[-2:]
        assert (f["boxes"][:, 2] <= w + 1e-4).all() and (f["boxes"][:, 3] <= h + 1e-4).all()
    with pytest.raises(EmbeddingDimError):
        detector.set_vocabulary(torch.randn(3, detector.embed_dim + 1))


def test_detector_checkpoint_round_trip(tmp_path):
    detector, model, tok = make_detector()
    detector.train()
    images, proposals, targets = batch()
    sum(detector(images, proposals, targets).values()).backward()
    torch.optim.SGD(detector.trainable_parameters(), lr=0.1).step()
    detector.eval()
    path = save_detector(detector, tmp_path / "det.pt", init="teacher")
    loaded = build_detector("RN50-tiny", path, detector.class_embeddings).eval()
    assert loaded.settings == detector.settings
    a, b = detector.detect(images, proposals), loaded.detect(images, proposals)
    for x, y in zip(a, b):
        assert torch.allclose(x["scores"], y["scores"]) and torch.allclose(x["boxes"], y["boxes"])


def test_mismatched_checkpoint_fails_loudly_with_key_lists(tmp_path):
    detector, _, _ = make_detector()
    path = save_detector(detector, tmp_path / "det.pt")
    payload = torch.load(path, weights_only=True)
    state = payload["state_dict"]
    state.pop("bbox_pred.weight")
    state["roi_heads.extra.weight"] = torch.zeros(2)
    state["encoder.visual.attnpool.c_proj.bias"] = torch.zeros(7)
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        build_detector("RN50-tiny", tmp_path / "bad.pt", detector.class_embeddings)
    message = str(err.value)
    assert "missing from the checkpoint (1): bbox_pred.weight" in message
    assert "unexpected in the checkpoint (1): roi_heads.extra.weight" in message
    assert "encoder.visual.attnpool.c_proj.bias [7]" in message
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        partial = build_detector("RN50-tiny", tmp_path / "bad.pt", detector.class_embeddings, allow_partial=True)
    assert any("allow_partial" in str(w.message) for w in caught)
    assert torch.equal(partial.encoder.visual.layer3[0].conv1.weight, detector.encoder.visual.layer3[0].conv1.weight)
    # A CLIP checkpoint of another architecture: load_clip's key lists.
    other = save_tiny_clip(tmp_path / "small.pt", arch="RN50-small")
    with pytest.raises(CheckpointError, match="missing|other shape"):
        build_detector("RN50-tiny", other, detector.class_embeddings)


def test_init_from_clip_checkpoint_copies_the_visual_tower(tmp_path):
    path = save_tiny_clip(tmp_path / "clip.pt", seed=3)
    model, tok = tiny_clip(3)
    detector = build_detector("RN50-tiny", path, text_embeddings(model, tok, ["a", "b"]), SMALL)
    assert torch.equal(detector.encoder.visual.layer4[0].conv1.weight, model.visual.layer4[0].conv1.weight)
    assert float(detector.bbox_pred.weight.detach().abs().max()) < 0.01


# -- stages ---------------------------------------------------------------------------------------------------

MANIFEST = """
synth: {num_images: 8, num_val_images: 3, min_side: 64, max_side: 96, max_objects: 3}
teacher: {arch: RN50-tiny, checkpoint: teacher.pt}
transfer: {init: [teacher, pretrain], steps: 2, batch_size: 1, min_sizes: [64, 96], max_size: 128,
           rois_per_image: 32, proposals_per_image: 48, warmup_steps: 1, rpn_pre_nms_top_n: 600}
evaluate: {min_size: 96, max_size: 128, proposals_per_image: 48, zero_shot_rpn_pre_nms_top_n: 400}
"""


@pytest.mark.slow
def test_transfer_evaluate_detect_on_a_tiny_world(write_manifest, monkeypatch, tmp_path, caplog):
    import stages.resolve
    from pipeline.io import write_json
    from pipeline.layout import RunLayout
    from stages import evaluate, synth, transfer
    from stages.cli import main

    manifest = write_manifest(MANIFEST)
    layout = RunLayout.of(manifest)
    synth.run(manifest)
    save_tiny_clip(manifest.resolve("teacher.pt"), seed=0)
    save_tiny_clip(layout.student_checkpoint, seed=1)    # stands in for pretrain's output
    write_json(layout.stage("pretrain").manifest, {"stage": "pretrain", "status": "done", "fingerprint": "test"})
    rpn = StandInRPN()
    purposes = []          # which RPN each stage asks for (transfer, evaluate and detect)
    monkeypatch.setattr(stages.resolve, "load_frozen_rpn",
                        lambda m, purpose, device="cpu": purposes.append(purpose) or rpn)

    first = transfer.run(manifest)
    assert set(first["detectors"]) == {"teacher", "pretrain"}
    assert layout.transfer_checkpoint("teacher").is_file() and layout.transfer_checkpoint("pretrain").is_file()
    assert (rpn.calls[0]["pre_nms_top_n"], rpn.calls[0]["post_nms_top_n"]) == (600, 48)
    for init in ("teacher", "pretrain"):             # the training state, TensorBoard scalars, the curve
        assert torch.load(layout.transfer_state(init), weights_only=True)["step"] == 2
        assert list((layout.tensorboard / "transfer" / init).glob("events.*"))
        assert layout.transfer_checkpoint(init).with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    again = transfer.run(manifest)                   # up to date: nothing retrained
    assert again["detectors"]["teacher"]["seconds"] == first["detectors"]["teacher"]["seconds"]
    assert purposes == ["transfer"]

    (layout.summary_json.parent).mkdir(parents=True, exist_ok=True)
    layout.summary_json.write_text(json.dumps({"demo_table": {"kept": True}}))
    # An RPN that trained on boxes of every category (novel ones too): evaluate says so, naming them.
    world = json.loads((layout.synth / "instances_val.json").read_text())["categories"]
    rpn.training_categories = [c["name"] for c in world]
    novel = sorted(c["name"] for c in world if c["split"] == "novel")
    with caplog.at_level(logging.WARNING, logger="stages.evaluate"):
        result = evaluate.run(manifest)["results"]
    assert purposes == ["transfer", "transfer"]      # one file serves detectors and zero-shot: loaded once
    warned = [r.getMessage() for r in caplog.records if "evaluation-novel" in r.getMessage()]
    assert len(warned) == 1 and all(name in warned[0] for name in novel), warned
    summary = json.loads(layout.summary_json.read_text())
    assert summary["demo_table"] == {"kept": True}
    assert set(summary["evaluate"]["detector"]) == {"teacher", "pretrain"}
    for group in ("novel", "base", "all"):
        assert group in summary["evaluate"]["detector"]["pretrain"]
        assert group in summary["evaluate"]["zero_shot_gt_boxes"]["teacher"]
    assert set(result["region_recognition_top1"]) == {"teacher", "pretrain"}
    for name in ("detector_teacher", "zeroshot_gt_pretrain", "zeroshot_rpn_teacher"):
        assert json.loads(layout.eval_metrics(name).read_text())["AP50"]
        assert isinstance(json.loads(layout.eval_detections(name).read_text()), list)
        assert layout.eval_picture(name).read_bytes()[:4] == b"\x89PNG"
    assert layout.eval_detections_picture.read_bytes()[:4] == b"\x89PNG"   # every model side by side
    # each RPN purpose with its own settings: the detectors' (transfer's) and zero-shot inference's
    assert {(c["pre_nms_top_n"], c["nms_thresh"]) for c in rpn.calls[1:]} == {(600, 0.7), (400, 0.9)}

    # detect: a detector and a plain CLIP checkpoint, custom vocabulary, an image file.
    from PIL import Image
    image = tmp_path / "photo.jpg"
    Image.new("RGB", (90, 70), (200, 120, 40)).save(image)
    out = tmp_path / "det"
    code = main(["detect", str(manifest.source_path), "--images", str(image), "--vocabulary", "sun,car,tree",
                 "--out", str(out)])
    assert code == 0
    report = json.loads((out / "detections.json").read_text())
    assert report["kind"] == "detector" and report["vocabulary"] == ["sun", "car", "tree"]
    assert (out / "photo.png").read_bytes()[:4] == b"\x89PNG"
    code = main(["detect", str(manifest.source_path), "--images", str(tmp_path), "--vocabulary", "sun,car",
                 "--checkpoint", str(layout.student_checkpoint), "--out", str(out / "zs")])
    assert code == 0
    report = json.loads((out / "zs" / "detections.json").read_text())
    assert report["kind"] == "clip" and all(d["label"] in ("sun", "car") for d in report["images"][0]["detections"])
    assert purposes[2:] == ["transfer", "zero_shot"]   # detect: a detector's RPN, then zero-shot's
    assert [c["pre_nms_top_n"] for c in rpn.calls[-2:]] == [600, 400]
