"""Stage `train-rpn`: a class-agnostic region proposal network trained on the boxes of a COCO-format
set (by default the synthetic world's instances_train.json, which boxes the *base* categories only).
Optional: runs when `train_rpn.enabled` is true.

Builds the RPN (trainer/models/rpn.py: ResNet-50-FPN / ResNet-18-FPN from a local weights file or from
scratch, or a CLIP ResNet's res4 map), trains it with SGD (trainer/tasks/rpn.py), measures proposal
recall at 100/300 proposals (IoU 0.5 and 0.7) on `train_rpn.val_annotations`, per category split
(novel vs base), and writes `checkpoints/rpn/rpn.pt` (trainer.models.rpn.load_rpn) with a training curve.
The `proposals` stage uses it when `proposals.checkpoint` is null.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.config import RunManifest
from pipeline.io import read_json, sha256_file
from pipeline.layout import RunLayout
from pipeline.stage import StageState

STAGE = "train-rpn"


def enabled(manifest: RunManifest) -> bool:
    return manifest.train_rpn.enabled


def annotation_files(manifest: RunManifest) -> tuple[Path, Path]:
    """(train, val) COCO files: the manifest's, or the synthetic world's (generated when missing)."""
    cfg = manifest.train_rpn
    train, val = manifest.resolve(cfg.annotations), manifest.resolve(cfg.val_annotations)
    if train is None or val is None:
        if manifest.corpus.format != "synthetic":
            raise ValueError("train_rpn.annotations and train_rpn.val_annotations are required unless "
                             "corpus.format is synthetic (a COCO-format file with base-category boxes)")
        from pipeline.synth import generate_world

        world = Path(manifest.resolve(manifest.corpus.path) or RunLayout.of(manifest).synth)
        generate_world(manifest.synth, world)   # a no-op when the world is already there
        train = train or world / "instances_train.json"
        val = val or world / "instances_val.json"
    return train, val


def run(manifest: RunManifest) -> dict:
    import torch

    from trainer.models.rpn import build_rpn, save_rpn_checkpoint
    from trainer.engine.loop import TrainFiles
    from trainer.tasks.rpn import evaluate_recall, read_coco_boxes, train_rpn

    layout = RunLayout.of(manifest)
    cfg = manifest.train_rpn
    train_file, val_file = annotation_files(manifest)
    clip_arch = (cfg.clip_arch or manifest.teacher.arch) if cfg.backbone == "clip_res4" else None
    weights = manifest.resolve(cfg.backbone_weights)
    settings = {"train_rpn": manifest.section_dict("train_rpn"), "clip_arch": clip_arch, "seed": manifest.seed}
    inputs = {"annotations": sha256_file(train_file), "val_annotations": sha256_file(val_file)}
    if weights is not None:
        inputs["backbone_weights"] = sha256_file(weights)
    stage_dir = layout.stage(STAGE)
    state = StageState.open(STAGE, stage_dir, settings, inputs)
    checkpoint = layout.rpn_checkpoint
    if state.is_done() and checkpoint.exists():
        print(f"train-rpn: up to date ({checkpoint})")
        return read_json(stage_dir.manifest)
    state.clean_temporaries()

    train = read_coco_boxes(train_file, manifest.resolve(cfg.images_root)).with_boxes()
    val = read_coco_boxes(val_file, manifest.resolve(cfg.val_images_root))

    torch.manual_seed(manifest.seed)  # the random init too: a rerun (after a kill) trains the same RPN
    torch.manual_seed(manifest.seed)   # the initial weights, too, follow the run's seed
    model = build_rpn(cfg.backbone, weights, clip_arch, cfg.anchor_sizes, min_size=cfg.min_size,
                      max_size=cfg.max_size)
    print(f"train-rpn: {cfg.backbone}{f' ({clip_arch})' if clip_arch else ''}, "
          f"{'weights ' + str(weights) if weights else 'from scratch'}; {len(train.images)} images, "
          f"{train.num_boxes} boxes, {cfg.epochs} epochs")
    curve = checkpoint.with_name("training_curve.png")
    history = train_rpn(model, train, cfg, seed=manifest.seed, val=val if cfg.eval_each_epoch else None,
                        files=TrainFiles(layout.rpn_state, layout.tensorboard / STAGE, curve),
                        checkpoint_every=cfg.checkpoint_every, fingerprint=state.fingerprint)
    recall = evaluate_recall(model, val, min_size=cfg.min_size, max_size=cfg.max_size)
    recall["val_annotations"] = str(val_file)
    save_rpn_checkpoint(model, checkpoint, recall=recall)
    parts = [f"{name} {recall[name]['recall@300']} ({recall[name]['num_boxes']} boxes)"
             for name in ("novel", "base", "all") if name in recall]
    print(f"train-rpn: val recall@300 (IoU 0.5): {'; '.join(parts)}")
    metrics = {"recall": recall, "loss_first_epoch": history.epochs[0]["loss"],
               "loss_last_epoch": history.epochs[-1]["loss"], "steps": len(history.steps),
               "train_images": len(train.images), "train_boxes": train.num_boxes,
               "train_seconds": history.seconds, "epochs": history.epochs}
    return state.finish(outputs=[checkpoint, curve],
                        extra={"metrics": metrics, "checkpoint": str(checkpoint),
                               "counts": {"in": len(train.images), "out": 1}})


if __name__ == "__main__":
    from stages.cli import stage_main

    stage_main(STAGE)
