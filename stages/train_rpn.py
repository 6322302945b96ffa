"""Stage `train-rpn`: a class-agnostic region proposal network trained on the boxes of a COCO-format
set (by default the synthetic world's instances_train.json, which boxes the *base* categories only).
Optional: runs when `train_rpn.enabled` is true.

Builds the RPN (trainer/models/rpn.py: ResNet-50-FPN / ResNet-18-FPN from a local weights file or from
scratch, or a CLIP ResNet's res4 map), trains it with SGD (trainer/tasks/rpn.py), measures proposal
recall at 100/300 proposals (IoU 0.5 and 0.7) on `train_rpn.val_annotations`, per category split
(novel vs base), and writes `checkpoints/rpn/rpn.pt` (trainer.models.rpn.load_rpn) with a training curve
and the names of the categories whose boxes it trained on (`evaluate` warns when they include
evaluation-novel classes).
The `proposals` stage uses it when `proposals.checkpoint` is null.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.layout import RunLayout, synthetic_world
from pipeline.runner import Stage, StageRun


def enabled(manifest) -> bool:
    return manifest.train_rpn.enabled


def uses_synthetic_world(manifest) -> bool:
    cfg = manifest.train_rpn
    return cfg.annotations is None or cfg.val_annotations is None


def reads(manifest) -> tuple[str, ...]:
    return ("synth",) if uses_synthetic_world(manifest) and manifest.corpus.format == "synthetic" else ()


def annotation_files(manifest) -> tuple[Path, Path]:
    """(train, val) COCO files: the manifest's, or the synthetic world's."""
    cfg = manifest.train_rpn
    train, val = manifest.resolve(cfg.annotations), manifest.resolve(cfg.val_annotations)
    if uses_synthetic_world(manifest):
        if manifest.corpus.format != "synthetic":
            raise ValueError("train_rpn.annotations and train_rpn.val_annotations are required unless "
                             "corpus.format is synthetic (a COCO-format file with base-category boxes)")
        world = synthetic_world(manifest)
        train = train or world / "instances_train.json"
        val = val or world / "instances_val.json"
    return train, val


def data_and_weights(run: StageRun) -> dict:
    from pipeline.io import sha256_file

    manifest, cfg = run.manifest, run.manifest.train_rpn
    train_file, val_file = run.memo["annotations"] = annotation_files(manifest)
    weights = manifest.resolve(cfg.backbone_weights)
    derived = {"clip_arch": (cfg.clip_arch or manifest.teacher.arch) if cfg.backbone == "clip_res4" else None,
               "seed": manifest.seed, "annotations": sha256_file(train_file),
               "val_annotations": sha256_file(val_file)}
    if weights is not None:
        derived["backbone_weights"] = sha256_file(weights)
    return derived


def train(run: StageRun) -> dict:
    import torch

    from trainer.models.rpn import RpnConfig, build_rpn, save_rpn_checkpoint
    from trainer.engine.loop import TrainFiles
    from trainer.tasks.rpn import evaluate_recall, read_coco_boxes, train_rpn
    from stages.resolve import detection_images

    manifest, layout = run.manifest, run.layout
    cfg = manifest.train_rpn
    train_file, val_file = run.memo["annotations"]
    clip_arch = run.settings["clip_arch"]
    weights = manifest.resolve(cfg.backbone_weights)
    checkpoint = layout.rpn_checkpoint

    train = read_coco_boxes(train_file, **detection_images(manifest, "train", "train_rpn")).with_boxes()
    val = read_coco_boxes(val_file, **detection_images(manifest, "val", "train_rpn"))

    torch.manual_seed(manifest.seed)  # the random init too: a rerun (after a kill) trains the same RPN
    config = RpnConfig(cfg.backbone, clip_arch=clip_arch, anchor_sizes=cfg.anchor_sizes, min_size=cfg.min_size,
                       max_size=cfg.max_size)
    model = build_rpn(config, weights, trust_torchscript=manifest.teacher.trust_torchscript)
    print(f"train-rpn: {cfg.backbone}{f' ({clip_arch})' if clip_arch else ''}, "
          f"{'weights ' + str(weights) if weights else 'from scratch'}; {len(train.images)} images, "
          f"{train.num_boxes} boxes, {cfg.epochs} epochs")
    curve = checkpoint.with_name("training_curve.png")
    history = train_rpn(model, train, cfg, seed=manifest.seed, val=val if cfg.eval_each_epoch else None,
                        files=TrainFiles(layout.rpn_state, layout.tensorboard / run.stage.name, curve),
                        checkpoint_every=cfg.checkpoint_every, fingerprint=run.fingerprint)
    recall = evaluate_recall(model, val, min_size=cfg.min_size, max_size=cfg.max_size)
    recall["val_annotations"] = str(val_file)
    save_rpn_checkpoint(model, checkpoint, recall=recall, training_categories=train.boxed_category_names())
    parts = [f"{name} {recall[name]['recall@300']} ({recall[name]['num_boxes']} boxes)"
             for name in ("novel", "base", "all") if name in recall]
    print(f"train-rpn: val recall@300 (IoU 0.5): {'; '.join(parts)}")
    metrics = {"recall": recall, "loss_first_epoch": history.epochs[0]["loss"],
               "loss_last_epoch": history.epochs[-1]["loss"], "steps": len(history.steps),
               "train_images": len(train.images), "train_boxes": train.num_boxes,
               "train_seconds": history.seconds, "epochs": history.epochs}
    return {"metrics": metrics, "checkpoint": str(checkpoint), "curve": str(curve),
            "counts": {"in": len(train.images), "out": 1}}


def checkpoint_and_curve(layout: RunLayout, manifest) -> list:
    return [layout.rpn_checkpoint, layout.rpn_checkpoint.with_name("training_curve.png")]


STAGE = Stage(
    name="train-rpn", help="optional: class-agnostic RPN on base-category boxes, recall report -> checkpoints/rpn",
    reads=reads, sections=("train_rpn",), identify=data_and_weights, outputs=checkpoint_and_curve,
    enabled=enabled, work=train)
run = STAGE.run
