"""Stage `transfer`: open-vocabulary detector transfer on base classes (docs/method.md §6).

    data      transfer.annotations (default: the synthetic world's instances_train.json, base boxes only)
    classes   the base categories of that file, embedded by the teacher's text encoder (81 templates)
    proposals the frozen class-agnostic RPN of transfer.rpn_checkpoint (one trained on the base classes
              only; null: proposals.checkpoint or train-rpn's output), computed once into
              checkpoints/transfer/train_proposals.parquet and reused by every later start (a resume after
              a kill, another init, other training settings) while the RPN, its settings and the
              annotations are the same
    init      each of transfer.init: `pretrain` (the student, checkpoints/pretrain/student.pt) and/or
              `teacher` (the plain CLIP: the baseline)
    output    checkpoints/transfer/detector_<init>.pt  (trainer.models.detector.build_detector loads it)

A detector whose settings and inputs (checkpoint hashes, annotation file) are unchanged is not retrained.
"""
from __future__ import annotations

import time

from pipeline.layout import RunLayout
from pipeline.runner import Stage, StageRun
from pipeline.stage import fingerprint_of
from stages.resolve import rpn_from_train_rpn, teacher_from_train_teacher


def reads(manifest) -> tuple[str, ...]:
    upstream = ()
    if manifest.transfer.annotations is None and manifest.corpus.format == "synthetic":
        upstream += ("synth",)
    if "pretrain" in manifest.transfer.init:
        upstream += ("pretrain",)
    if teacher_from_train_teacher(manifest):
        upstream += ("train-teacher",)
    return upstream + (("train-rpn",) if rpn_from_train_rpn(manifest, "transfer") else ())


def data_models_and_tests(run: StageRun) -> dict:
    """The RPN, teacher and test settings a detector depends on, and the checksums of the files it reads."""
    from pipeline.io import sha256_file
    from stages.resolve import annotation_file, clip_checkpoint, rpn_checkpoint_file, rpn_inference

    manifest = run.manifest
    e = manifest.evaluate
    rpn = rpn_checkpoint_file(manifest, "transfer")   # loaded (or refused) by the work
    # The RPN settings outside the transfer section (its NMS and top-n after NMS are in the section).
    proposing = rpn_inference(manifest, "transfer", training=True)
    return {"rpn": {k: proposing[k] for k in ("min_size", "max_size", "pre_nms_top_n")},
            "ensemble": manifest.embed.ensemble,
            "test": {"min_size": e.min_size, "max_size": e.max_size, "score_threshold": e.score_threshold,
                     "detections_per_image": e.detections_per_image, "soft_nms_sigma": e.soft_nms_sigma,
                     "soft_nms_prune": e.soft_nms_prune,
                     "multiply_rpn_score": e.multiply_rpn_score, "objectness": e.objectness},
            "annotations": sha256_file(annotation_file(manifest, "train")),
            "rpn_checkpoint": sha256_file(rpn) if rpn.is_file() else "missing",
            "init_checkpoints": {init: sha256_file(clip_checkpoint(manifest, init))
                                 for init in dict.fromkeys(["teacher", *manifest.transfer.init])}}


def detector_fingerprint(run: StageRun, init: str) -> str:
    """One detector's fingerprint: the stage's settings but the list of inits (adding an init retrains
    no other), and its own initial weights."""
    settings = {**run.settings, "transfer": {k: v for k, v in run.settings["transfer"].items() if k != "init"},
                "init_checkpoints": {"teacher": run.settings["init_checkpoints"]["teacher"],
                                     init: run.settings["init_checkpoints"][init]}}
    return fingerprint_of(f"transfer-{init}", settings, {})


def _todo(run: StageRun) -> list[str]:
    previous = (run.previous or {}).get("detectors", {})
    return [i for i in dict.fromkeys(run.manifest.transfer.init)
            if not (previous.get(i, {}).get("fingerprint") == detector_fingerprint(run, i)
                    and run.layout.transfer_checkpoint(i).is_file())]


def train_proposals_fingerprint(run: StageRun, rpn_settings: dict) -> str:
    """What the training images' proposals depend on: the RPN's checkpoint (content), the settings it
    proposes with (the keywords of its `propose`), the annotation file (content) and the images' folder."""
    return fingerprint_of("transfer-train-proposals", {
        "rpn_checkpoint": run.settings["rpn_checkpoint"], "rpn": rpn_settings,
        "annotations": run.settings["annotations"], "images_root": run.manifest.transfer.images_root}, {})


def detectors_done(run: StageRun) -> bool:
    return not _todo(run)


def transfer(run: StageRun) -> dict:
    import torch

    from trainer.data.detection import DetectionSet
    from trainer.models.detector import build_detector, save_detector
    from trainer.engine.device import resolve_device
    from stages.resolve import (annotation_file, class_embeddings, clip_checkpoint, detector_settings,
                                detection_images, load_frozen_rpn, load_teacher_clip, rpn_inference,
                                train_settings)
    from trainer.engine.loop import TrainFiles
    from trainer.tasks.transfer import compute_proposals, load_proposals, rpn_proposal_fn, train_detector

    manifest, layout = run.manifest, run.layout
    cfg = manifest.transfer
    device = resolve_device(cfg.device)
    annotations = annotation_file(manifest, "train")
    inits, todo = list(dict.fromkeys(cfg.init)), _todo(run)
    previous = (run.previous or {}).get("detectors", {})
    detectors = {i: previous[i] for i in inits if i not in todo}
    run.report = {"trained": todo}
    if not todo:        # e.g. an init dropped from the list: the others are kept as they are
        print(f"transfer: every detector is current ({', '.join(inits)})")
        return {"detectors": detectors}
    started = time.time()
    data = DetectionSet(annotations, **detection_images(manifest, "train"))  # images are read per step
    vocab = data.vocabulary("base")
    text_model = load_teacher_clip(manifest, device=device)
    embeddings = class_embeddings(manifest, vocab.names, device, text_model)
    del text_model
    image_ids = data.image_ids_with_boxes(vocab)
    print(f"transfer: {len(image_ids)} training images, {len(vocab)} base classes "
          f"({', '.join(vocab.names[:8])}{', ...' if len(vocab) > 8 else ''}); inits {', '.join(todo)}")
    rpn_settings = rpn_inference(manifest, "transfer", training=True)
    kept, fingerprint = layout.transfer_train_proposals, train_proposals_fingerprint(run, rpn_settings)
    t0 = time.time()
    proposals = load_proposals(kept, fingerprint, image_ids, folder=run.stage_dir.root)
    reused = proposals is not None
    if reused:
        print(f"transfer: the training proposals of {kept} are current (same RPN, settings and annotations)")
    else:
        rpn = load_frozen_rpn(manifest, "transfer", device)
        proposals = compute_proposals(rpn_proposal_fn(rpn, **rpn_settings), data, image_ids, desc="train proposals",
                                      folder=run.stage_dir.root, keep=kept, fingerprint=fingerprint)
        del rpn
    proposal_seconds = round(time.time() - t0, 2)
    for init in todo:
        torch.manual_seed(cfg.seed)
        checkpoint = clip_checkpoint(manifest, init)
        detector = build_detector(manifest.teacher.arch, checkpoint, embeddings, detector_settings(manifest),
                                  allow_partial=cfg.allow_partial, device=device, class_names=vocab.names,
                                  trust_torchscript=manifest.teacher.trust_torchscript)
        print(f"transfer[{init}]: from {checkpoint} ({cfg.steps} steps x {cfg.batch_size} images)")
        path = layout.transfer_checkpoint(init)
        report = train_detector(detector, data, vocab, proposals, train_settings(manifest),
                                files=TrainFiles(layout.transfer_state(init), layout.tensorboard / run.stage.name / init,
                                                 path.with_suffix(".png")),
                                checkpoint_every=cfg.checkpoint_every, fingerprint=detector_fingerprint(run, init))
        save_detector(detector, path, init=init, init_checkpoint=str(checkpoint),
                      train_category_ids=list(vocab.ids))
        print(f"transfer[{init}]: {report['seconds']}s, final losses {report['final']} -> {path}")
        detectors[init] = {"fingerprint": detector_fingerprint(run, init), "checkpoint": str(path),
                           "init_checkpoint": str(checkpoint), "seconds": report["seconds"],
                           "final_losses": report["final"], "loss_history": report["loss_history"]}
    return {"detectors": detectors, "train_images": len(image_ids), "classes": list(vocab.names),
            "proposal_seconds": proposal_seconds, "train_proposals": "reused" if reused else "computed",
            "device": str(device),
            "total_seconds": round(time.time() - started, 2)}


def detector_files(layout: RunLayout, manifest) -> list:
    return [layout.transfer_checkpoint(i) for i in dict.fromkeys(manifest.transfer.init)]


STAGE = Stage(
    name="transfer", help="open-vocabulary detector on base classes, per init (pretrain student, teacher)",
    reads=reads, sections=("transfer", "teacher"), identify=data_models_and_tests, outputs=detector_files,
    current=detectors_done, work=transfer, nothing_done={"trained": []})
run = STAGE.run
