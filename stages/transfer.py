"""Stage `transfer`: open-vocabulary detector transfer on base classes (REFERENCE §6).

    data      transfer.annotations (default: the synthetic world's instances_train.json, base boxes only)
    classes   the base categories of that file, embedded by the teacher's text encoder (81 templates)
    proposals the frozen class-agnostic RPN (proposals.checkpoint or train-rpn's output), computed once
    init      each of transfer.init: `pretrain` (the student, checkpoints/pretrain/student.pt) and/or
              `teacher` (the plain CLIP: the baseline)
    output    checkpoints/transfer/detector_<init>.pt  (trainer.models.detector.build_detector loads it)

A detector whose settings and inputs (checkpoint hashes, annotation file) are unchanged is not retrained.
"""
from __future__ import annotations

import time

from pipeline.config import RunManifest
from pipeline.io import file_record
from pipeline.layout import RunLayout
from pipeline.stage import StageState, fingerprint_of, read_stage_manifest

STAGE = "transfer"


def run(manifest: RunManifest) -> dict:
    import torch

    from trainer.data.detection import DetectionSet
    from trainer.models.detector import build_detector, save_detector
    from trainer.engine.device import resolve_device
    from stages.resolve import (annotation_file, class_embeddings, clip_checkpoint, detector_settings,
                                images_root, load_frozen_rpn, load_teacher_clip, train_settings)
    from trainer.engine.loop import TrainFiles
    from trainer.tasks.transfer import compute_proposals, rpn_proposal_fn, train_detector

    layout = RunLayout.of(manifest)
    cfg = manifest.transfer
    device = resolve_device(cfg.device)
    annotations = annotation_file(manifest, "train")
    rpn_path = manifest.resolve(manifest.proposals.checkpoint) or layout.rpn_checkpoint
    p = manifest.proposals
    rpn_settings = {"min_size": p.min_size, "max_size": p.max_size, "pre_nms_top_n": p.pre_nms_top_n}
    settings = {"transfer": manifest.section_dict("transfer"), "rpn": rpn_settings,
                "teacher": manifest.section_dict("teacher"), "ensemble": manifest.embed.ensemble,
                "test": {k: manifest.section_dict("evaluate")[k] for k in
                         ("min_size", "max_size", "score_threshold", "detections_per_image", "soft_nms_sigma",
                          "multiply_rpn_score")}}
    settings["transfer"].pop("device")
    settings["transfer"].pop("num_workers", None)  # runtime only: the detector does not depend on it
    common = {"annotations": file_record(annotations)["sha256"],
              "rpn": file_record(rpn_path)["sha256"] if rpn_path.is_file() else "missing",
              "teacher": file_record(clip_checkpoint(manifest, "teacher"))["sha256"]}
    inits = list(dict.fromkeys(cfg.init))
    fingerprints = {init: fingerprint_of(f"transfer-{init}", settings,
                                         {**common, "init": file_record(clip_checkpoint(manifest, init))["sha256"]})
                    for init in inits}
    state = StageState.open(STAGE, layout.stage(STAGE), settings,
                            {"annotations": common["annotations"], **fingerprints})
    previous = (read_stage_manifest(state.stage_dir) or {}).get("detectors", {})
    todo = [i for i in inits if not (previous.get(i, {}).get("fingerprint") == fingerprints[i]
                                    and layout.transfer_checkpoint(i).is_file())]
    detectors = {i: previous[i] for i in inits if i not in todo}
    if not todo:
        print(f"transfer: up to date ({', '.join(str(layout.transfer_checkpoint(i)) for i in inits)})")
        return state.finish([], outputs=[layout.transfer_checkpoint(i) for i in inits],
                            extra={"detectors": detectors})
    state.clean_temporaries()

    started = time.time()
    data = DetectionSet(annotations, images_root(manifest, "train"))  # images are read per step
    vocab = data.vocabulary("base")
    text_model = load_teacher_clip(manifest, device=device)
    embeddings = class_embeddings(manifest, vocab.names, device, text_model)
    del text_model
    image_ids = data.image_ids_with_boxes(vocab)
    print(f"transfer: {len(image_ids)} training images, {len(vocab)} base classes "
          f"({', '.join(vocab.names[:8])}{', ...' if len(vocab) > 8 else ''}); inits {', '.join(todo)}")
    rpn = load_frozen_rpn(manifest, device)
    propose = rpn_proposal_fn(rpn, **rpn_settings, post_nms_top_n=cfg.proposals_per_image,
                              nms_thresh=cfg.rpn_nms_thresh)
    t0 = time.time()
    proposals = compute_proposals(propose, data, image_ids, desc="train proposals", folder=state.stage_dir.root)
    proposal_seconds = round(time.time() - t0, 2)
    del rpn
    for init in todo:
        torch.manual_seed(cfg.seed)
        checkpoint = clip_checkpoint(manifest, init)
        detector = build_detector(manifest.teacher.arch, checkpoint, embeddings, detector_settings(manifest),
                                  allow_partial=cfg.allow_partial, device=device, class_names=vocab.names)
        print(f"transfer[{init}]: from {checkpoint} ({cfg.steps} steps x {cfg.batch_size} images)")
        path = layout.transfer_checkpoint(init)
        report = train_detector(detector, data, vocab, proposals, train_settings(manifest),
                                files=TrainFiles(layout.transfer_state(init), layout.tensorboard / STAGE / init,
                                                 path.with_suffix(".png")),
                                checkpoint_every=cfg.checkpoint_every, fingerprint=fingerprints[init])
        save_detector(detector, path, init=init, init_checkpoint=str(checkpoint),
                      train_category_ids=list(vocab.ids))
        print(f"transfer[{init}]: {report['seconds']}s, final losses {report['final']} -> {path}")
        detectors[init] = {"fingerprint": fingerprints[init], "checkpoint": str(path),
                           "init_checkpoint": str(checkpoint), "seconds": report["seconds"],
                           "final_losses": report["final"], "loss_history": report["loss_history"]}
    return state.finish([], outputs=[layout.transfer_checkpoint(i) for i in inits], extra={
        "detectors": detectors, "train_images": len(image_ids), "classes": list(vocab.names),
        "proposal_seconds": proposal_seconds, "device": str(device),
        "total_seconds": round(time.time() - started, 2)})


if __name__ == "__main__":
    from stages.cli import stage_main

    stage_main(STAGE)
