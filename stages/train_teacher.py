"""Stage `train-teacher`: an image-level CLIP trained on the shards, for a world without CLIP weights
(or a new domain). Optional: runs when `train_teacher.enabled` is true.

Reads the shards' image + caption pairs as a stream (trainer/data/image_text.py), trains the open_clip model
`teacher.arch` with open_clip's ClipLoss (trainer/tasks/teacher.py), holds out the *last shard*
for image-to-caption retrieval (R@1, R@5 and their chance levels; the synthetic world's val images
have no captions), and writes `checkpoints/teacher/teacher.pt` in open_clip's format: it loads with
`open_clip.create_model(arch, pretrained=path)` and with trainer.models.clip.load_clip. Later stages use it
when `teacher.checkpoint` is null.
"""
from __future__ import annotations

from pipeline.layout import RunLayout
from pipeline.runner import Stage, StageRun


def enabled(manifest) -> bool:
    return manifest.train_teacher.enabled


def arch_seed_and_init(run: StageRun) -> dict:
    manifest, cfg = run.manifest, run.manifest.train_teacher
    derived = {"arch": manifest.teacher.arch, "seed": manifest.seed}
    if cfg.init_checkpoint:
        from pipeline.io import sha256_file
        derived["init_checkpoint"] = sha256_file(manifest.resolve(cfg.init_checkpoint))
    return derived


def train(run: StageRun) -> dict:
    import torch

    from pipeline.sidecars import read_caption_concepts
    from pipeline.io import read_json
    from pipeline.layout import inside
    from trainer.models.clip import create_clip, load_clip, save_clip_checkpoint
    from trainer.engine.loop import TrainFiles
    from trainer.tasks.teacher import retrieval_recall, train_clip, clip_transforms
    from trainer.data.image_text import read_image_text

    manifest, layout = run.manifest, run.layout
    cfg, arch = manifest.train_teacher, manifest.teacher.arch
    sizes = read_json(layout.sizes_json)
    # sizes.json names the tars: each name must stay inside shards/ (pipeline.layout.inside).
    tars = [inside(layout.shards.root, name) for name in sorted(sizes) if sizes[name] > 0]
    if not tars:
        raise ValueError("train-teacher: the shards hold no images")
    # The last shard is held out for retrieval; with a single shard it is both (flagged in_sample).
    train_tars, heldout_tars = (tars[:-1], tars[-1:]) if len(tars) > 1 else (tars, tars)
    num_train = sum(sizes[t.name] for t in train_tars)
    checkpoint = layout.teacher_checkpoint

    torch.manual_seed(manifest.seed)  # the random init too: a rerun (after a kill) trains the same model
    if cfg.init_checkpoint:
        model, tokenizer = load_clip(arch, manifest.resolve(cfg.init_checkpoint),
                                     trust_torchscript=manifest.teacher.trust_torchscript)
    else:
        model, tokenizer = create_clip(arch)
    heldout = list(read_image_text(heldout_tars))
    # retrieval also counts a caption naming the same concepts as the image's own (r1_same_group)
    caption_concepts = read_caption_concepts(layout.caption_concepts, int(heldout_tars[0].stem))
    groups = [frozenset(caption_concepts.get(s["key"]) or ()) for s in heldout]
    batch_size = min(cfg.batch_size, num_train)
    steps_per_epoch = max(1, num_train // batch_size)
    print(f"train-teacher: {arch} on {num_train} images ({len(train_tars)} shards), {cfg.epochs} epochs x "
          f"{steps_per_epoch} steps; held out: {heldout_tars[0].name} ({len(heldout)} images)")
    _, eval_tf = clip_transforms(model)
    curve = checkpoint.with_name("training_curve.png")
    before = retrieval_recall(model, tokenizer, heldout, eval_tf, groups=groups)
    history = train_clip(model, tokenizer, train_tars, heldout, cfg.model_copy(update={"batch_size": batch_size}),
                         steps_per_epoch=steps_per_epoch, seed=manifest.seed, heldout_groups=groups,
                         files=TrainFiles(layout.teacher_state, layout.tensorboard / run.stage.name, curve),
                         checkpoint_every=cfg.checkpoint_every, fingerprint=run.fingerprint)
    final = history.epochs[-1]
    metrics = {"heldout": {"shard": heldout_tars[0].name, "in_sample": len(tars) == 1, **{
                   k: v for k, v in final.items() if k.startswith("r") or k == "num_images"}},
               "heldout_before_training": before,
               "loss_first_epoch": history.epochs[0]["loss"], "loss_last_epoch": final["loss"],
               "steps": history.steps[-1] if history.steps else 0, "train_images": num_train,
               "train_seconds": history.seconds, "epochs": history.epochs}
    save_clip_checkpoint(model, checkpoint, arch=arch, epoch=cfg.epochs, recall=metrics["heldout"])
    h = metrics["heldout"]
    print(f"train-teacher: held-out image->caption R@1 {h.get('r1')} (chance {h.get('r1_chance')}), "
          f"R@5 {h.get('r5')} (chance {h.get('r5_chance')}), R@1 counting a caption with the same concepts "
          f"{h.get('r1_same_group')} (chance {h.get('r1_same_group_chance')}) on {h.get('num_images')} images; "
          f"loss {metrics['loss_first_epoch']} -> {metrics['loss_last_epoch']}")
    return {"metrics": metrics, "checkpoint": str(checkpoint), "arch": arch, "curve": str(curve),
            "counts": {"in": num_train, "out": 1}}


def checkpoint_and_curve(layout: RunLayout, manifest) -> list:
    return [layout.teacher_checkpoint, layout.teacher_checkpoint.with_name("training_curve.png")]


STAGE = Stage(
    name="train-teacher", help="optional: image-level CLIP (open_clip, ClipLoss) on the shards -> checkpoints/teacher",
    reads=("shard", "concepts"), sections=("train_teacher",), identify=arch_seed_and_init,
    outputs=checkpoint_and_curve, enabled=enabled, work=train)
run = STAGE.run
