"""The class-agnostic RPN: proposals in original pixels, recall, checkpoints, training, the stage."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.layout import RunLayout
from trainer.models.checkpoint import CheckpointError
from trainer.models.rpn import RpnConfig, build_rpn, load_rpn, proposal_recall, save_rpn_checkpoint


def _small_rpn(**kwargs):
    torch.manual_seed(0)
    return build_rpn(RpnConfig("clip_res4", clip_arch="RN50-tiny", anchor_sizes=(16, 32, 64, 128), min_size=96,
                               max_size=160, **kwargs))


def test_recall_on_hand_made_boxes():
    gt = [torch.tensor([[0, 0, 10, 10], [20, 20, 40, 40]], dtype=torch.float32),
          torch.tensor([[0, 0, 100, 50]], dtype=torch.float32)]
    proposals = [
        # image 0: the first proposal misses everything, the second covers box 0 (IoU 0.81)
        torch.tensor([[50, 50, 60, 60], [0, 0, 9, 9], [20, 20, 40, 40]], dtype=torch.float32),
        # image 1: IoU exactly 0.5 with the gt (half of it), counts as a hit at 0.5
        (torch.tensor([[0, 0, 50, 50]], dtype=torch.float32), torch.tensor([3.0])),
    ]
    assert proposal_recall(proposals, gt, iou=0.5, top_n=300) == pytest.approx(1.0)
    assert proposal_recall(proposals, gt, iou=0.5, top_n=2) == pytest.approx(2 / 3)
    assert proposal_recall(proposals, gt, iou=0.5, top_n=1) == pytest.approx(1 / 3)
    assert proposal_recall(proposals, gt, iou=0.85, top_n=300) == pytest.approx(1 / 3)
    assert proposal_recall([torch.zeros(0, 4)], [gt[0]]) == 0.0
    assert proposal_recall([torch.zeros(0, 4)], [torch.zeros(0, 4)]) != proposal_recall(
        [torch.zeros(0, 4)], [torch.zeros(0, 4)])                           # NaN without any gt


def test_training_losses_and_gradients_equal_torchvision_rpn():
    # The lean training path skips torchvision's proposal decoding and NMS; losses, gradients and the
    # random anchor sampling must stay exactly torchvision's.
    model = _small_rpn().train()
    images = [torch.rand(3, 120, 150, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0]])},
               {"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0], [60.0, 50.0, 140.0, 110.0]])}]

    def losses_and_grads(fn):
        torch.manual_seed(7)
        model.zero_grad()
        losses = fn()
        sum(losses.values()).backward()
        return ({k: v.detach() for k, v in losses.items()},
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    def reference():
        image_list, t = model.transform(images, [dict(x) for x in targets])
        return model.rpn(image_list, model._features(image_list.tensors), t)[1]

    lean, lean_grads = losses_and_grads(lambda: model(images, targets))
    full, full_grads = losses_and_grads(reference)
    assert set(lean) == {"loss_objectness", "loss_rpn_box_reg"} and all(v > 0 for v in lean.values())
    for k in full:
        torch.testing.assert_close(lean[k], full[k], rtol=0, atol=0)
    assert lean_grads.keys() == full_grads.keys() and len(lean_grads) > 10
    for n in full_grads:
        torch.testing.assert_close(lean_grads[n], full_grads[n], rtol=0, atol=0)


def test_propose_gives_sorted_boxes_in_original_pixels():
    model = _small_rpn()
    with torch.no_grad():                                   # spread the objectness scores out
        torch.nn.init.normal_(model.rpn.head.cls_logits.weight, std=1.0)
        model.rpn.head.cls_logits.bias.fill_(-5.0)
    images = [torch.rand(3, 100, 200), torch.rand(3, 150, 90)]
    model.train()
    results = model.propose(images, min_size=200, max_size=400, pre_nms_top_n=500, post_nms_top_n=50,
                            nms_thresh=0.5)
    assert model.training                                   # the mode is restored
    assert not any(p.requires_grad for p in [r[0] for r in results])
    for (boxes, logits), image in zip(results, images):
        height, width = image.shape[-2:]
        assert boxes.dtype == torch.float32 and logits.dtype == torch.float32
        assert 0 < len(boxes) <= 50 and boxes.shape == (len(logits), 4)
        assert torch.all(logits[:-1] >= logits[1:])         # ordered by objectness
        assert boxes[:, 0].min() >= 0 and boxes[:, 1].min() >= 0
        assert boxes[:, 2].max() <= width and boxes[:, 3].max() <= height
        assert torch.all(boxes[:, 2] > boxes[:, 0]) and torch.all(boxes[:, 3] > boxes[:, 1])
    # The first image is resized x2 internally; boxes come back in its own pixels: large anchors
    # are clipped at its right edge (200), not at the resized one (400).
    assert results[0][0][:, 2].max() == pytest.approx(200)
    # Logits, not probabilities (the bias of -5 makes them mostly negative), and not all equal.
    logits = torch.cat([r[1] for r in results])
    assert logits.min() < 0 and logits.max() > logits.min()


def test_checkpoint_round_trip_and_refusals(tmp_path):
    model = _small_rpn()
    path = save_rpn_checkpoint(model, tmp_path / "rpn" / "rpn.pt", recall={"novel": {"recall@300": 0.5}},
                               training_categories=["apple", "kite"])
    assert not list(path.parent.glob(".*tmp*"))
    loaded = load_rpn(path)
    assert not loaded.training and loaded.config["backbone"] == "clip_res4"
    assert loaded.recall == {"novel": {"recall@300": 0.5}}
    assert loaded.training_categories == ["apple", "kite"]
    assert load_rpn(save_rpn_checkpoint(model, tmp_path / "plain.pt")).training_categories is None
    image = [torch.rand(3, 80, 120)]
    a = model.propose(image, min_size=96, max_size=160)[0]
    b = loaded.propose(image, min_size=96, max_size=160)[0]
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])

    with pytest.raises(FileNotFoundError, match=r"train-rpn stage.*proposals\.checkpoint"):
        load_rpn(tmp_path / "missing.pt")

    class Payload:                                          # pickled code: never unpickled
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"state_dict": {}, "config": {}, "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_rpn(tmp_path / "evil.pt")


def test_fpn_backbones_build_and_check_anchor_sizes():
    model = build_rpn(RpnConfig("resnet18_fpn", anchor_sizes=(16, 32, 64, 128, 256), min_size=64, max_size=96))
    (boxes, logits), = model.propose([torch.rand(3, 64, 80)], min_size=64, max_size=96, post_nms_top_n=20)
    assert len(boxes) <= 20
    with pytest.raises(ValueError, match="one size per FPN level"):
        build_rpn(RpnConfig("resnet18_fpn", anchor_sizes=(32, 64)))
    with pytest.raises(ValueError, match="clip_arch"):
        build_rpn(RpnConfig("clip_res4"))
    with pytest.raises(ValueError, match="unknown RPN backbone"):
        build_rpn(RpnConfig("vgg16"))


def test_resnet_weights_file_loads_into_backbone(tmp_path):
    import torchvision

    resnet = torchvision.models.resnet18(weights=None)
    torch.nn.init.constant_(resnet.conv1.weight, 0.125)
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    model = build_rpn(RpnConfig("resnet18_fpn", min_size=64, max_size=96), backbone_weights=tmp_path / "resnet18.pth")
    assert torch.all(model.backbone.body.conv1.weight == 0.125)
    assert model.config["frozen_bn"] and not model.backbone.body.conv1.weight.requires_grad
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="fit"):
        build_rpn(RpnConfig("resnet18_fpn"), backbone_weights=tmp_path / "other.pth")


@pytest.mark.slow
def test_stage_trains_and_reports_recall_by_split(write_manifest):
    from stages import synth, train_rpn
    from trainer.tasks.rpn import novel_classes_seen, read_coco_boxes

    manifest = write_manifest("""
        corpus: {format: synthetic}
        synth: {seed: 2, num_images: 12, num_val_images: 4}
        teacher: {arch: RN50-tiny}
        train_rpn: {enabled: true, backbone: clip_res4, epochs: 3, batch_size: 4, lr: 0.02,
                    warmup_steps: 2, min_size: 112, max_size: 160, anchor_sizes: [16, 32, 64, 128],
                    device: cpu}
        """)
    assert train_rpn.enabled(manifest)
    synth.run(manifest)
    train_rpn.run(manifest)
    layout = RunLayout.of(manifest)
    stage = json.loads(layout.stage("train-rpn").manifest.read_text())
    assert stage["status"] == "done"
    metrics = stage["metrics"]
    assert metrics["loss_last_epoch"] < metrics["loss_first_epoch"]
    recall = metrics["recall"]
    val = read_coco_boxes(layout.synth / "instances_val.json")
    assert recall["all"]["num_boxes"] == val.num_boxes
    assert recall["novel"]["num_boxes"] + recall["base"]["num_boxes"] == val.num_boxes
    assert recall["novel"]["num_boxes"] > 0
    for part in ("all", "base", "novel"):
        assert 0 <= recall[part]["recall@300"] <= 1
        assert recall[part]["recall@100"] <= recall[part]["recall@300"]
    model = load_rpn(layout.rpn_checkpoint)
    assert model.recall["novel"] == recall["novel"]
    # It records the categories it saw: the world's base ones (its train set boxes no novel category),
    # so evaluating on the world's novel classes raises no warning.
    world = json.loads((layout.synth / "world.json").read_text())
    assert set(model.training_categories) <= set(world["base_categories"]) and model.training_categories
    assert novel_classes_seen(model.training_categories, world["novel_categories"]) == []
    assert (layout.rpn_checkpoint.parent / "training_curve.png").exists()
    assert torch.load(layout.rpn_state, weights_only=True)["step"] == metrics["steps"] > 0
    stamp = layout.rpn_checkpoint.stat().st_mtime_ns
    train_rpn.run(manifest)                                  # up to date: skipped
    assert layout.rpn_checkpoint.stat().st_mtime_ns == stamp
    assert not train_rpn.enabled(write_manifest("", name="plain"))


# -- one RPN per purpose ------------------------------------------------------------------------------

def test_novel_classes_seen_compares_normalised_names():
    from trainer.tasks.rpn import novel_classes_seen

    lvis_base = ["airplane", "bus_(vehicle)", "Hot_dog", "necktie", "person"]
    coco_novel = ["airplane", "bus", "hot dog", "tie", "cat"]
    # 'bus_(vehicle)' counts as 'bus' (LVIS qualifier dropped); the synonym necktie/tie is not caught.
    assert novel_classes_seen(lvis_base, coco_novel) == ["airplane", "bus", "hot dog"]
    assert novel_classes_seen(["person"], coco_novel) == []
    assert novel_classes_seen(None, coco_novel) == []          # not recorded (e.g. a foreign checkpoint)


def test_each_shipped_manifest_names_its_rpn_per_purpose():
    from pipeline.config import RPN_PURPOSES, load_manifest
    from stages import evaluate, pretrain, proposals, transfer
    from stages.resolve import rpn_checkpoint_file
    from tests.conftest import REPO

    lvis_866, coco_48 = "/weights/rpn/rpn_lvis_866.pth", "/weights/rpn/rpn_coco_48.pth"
    expected = {   # purpose -> file: pretraining's proposals, the detector's (train and test), zero-shot
        "cc3m-rn50.yaml": {"proposals": lvis_866, "transfer": coco_48, "zero_shot": lvis_866},
        "coco-ovd.yaml": {"proposals": lvis_866, "transfer": coco_48, "zero_shot": lvis_866},
        "lvis.yaml": {"proposals": lvis_866, "transfer": "/weights/rpn/rpn_lvis_866_lsj.pth",
                      "zero_shot": lvis_866},
        "demo.yaml": dict.fromkeys(RPN_PURPOSES, "train-rpn"),
        "demo-small.yaml": dict.fromkeys(RPN_PURPOSES, "train-rpn"),
    }
    for name, want in expected.items():
        manifest = load_manifest(REPO / "manifests" / name)
        trained = RunLayout.of(manifest).rpn_checkpoint
        got = {purpose: rpn_checkpoint_file(manifest, purpose) for purpose in RPN_PURPOSES}
        assert got == {k: trained if v == "train-rpn" else Path(v) for k, v in want.items()}, name
        # the stages that run an RPN ask for their purpose's, and wait for train-rpn only when it makes it
        assert evaluate.rpn_purposes(manifest) == ["transfer", "zero_shot"], name
        from_train_rpn = "train-rpn" in want.values()
        for stage in (proposals, pretrain, transfer, evaluate):
            if stage is pretrain and not manifest.pretrain.online_teacher:
                continue
            assert ("train-rpn" in stage.reads(manifest)) == from_train_rpn, (name, stage.__name__)


def test_rpn_purposes_fall_back_to_the_proposals_rpn(write_manifest):
    from stages.resolve import rpn_checkpoint_file, rpn_checkpoint_path

    m = write_manifest("proposals: {checkpoint: lvis.pt}\ntransfer: {rpn_checkpoint: coco.pt}\n")
    base = Path(m.source_path).parent
    assert rpn_checkpoint_file(m, "proposals") == base / "lvis.pt"
    assert rpn_checkpoint_file(m, "transfer") == base / "coco.pt"
    assert rpn_checkpoint_file(m, "zero_shot") == base / "lvis.pt"          # unset: the proposals' RPN
    with pytest.raises(FileNotFoundError, match=r"transfer\.rpn_checkpoint or proposals\.checkpoint"):
        rpn_checkpoint_path(m, "transfer")
    with pytest.raises(ValueError, match="unknown RPN purpose"):
        m.rpn_checkpoint("detect")
    plain = write_manifest("", name="plain")                                 # nothing set: train-rpn's output
    assert rpn_checkpoint_file(plain, "zero_shot") == RunLayout.of(plain).rpn_checkpoint


def test_anchors_stay_fp32_under_bf16_autocast():
    """torchvision makes anchors in the feature maps' dtype; under bf16 autocast a 1216-px-wide image's
    anchors would be rounded by up to several pixels. propose() builds them from fp32 features."""
    torch.manual_seed(0)
    rpn = build_rpn(RpnConfig("resnet18_fpn", min_size=256, max_size=1216)).eval()
    made = []
    generate = rpn.rpn.anchor_generator.forward
    rpn.rpn.anchor_generator.forward = lambda images, features: made.append(generate(images, features)) or made[-1]
    image = [torch.rand(3, 200, 1216)]
    with torch.no_grad():
        rpn.propose(image, min_size=256, max_size=1216, pre_nms_top_n=50, post_nms_top_n=10)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rpn.propose(image, min_size=256, max_size=1216, pre_nms_top_n=50, post_nms_top_n=10)
    fp32, bf16 = made[0][0], made[1][0]
    assert bf16.dtype == torch.float32
    assert torch.equal(fp32, bf16)
    assert fp32[:, 2].max() > 1000    # anchors out where bf16 spacing (8 px) would have rounded them
