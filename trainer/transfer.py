"""Detector transfer: the training loop (base classes, frozen RPN proposals) and inference over a
detection set. The stage modules `stages/transfer.py` and `stages/evaluate.py` are recipes over these.

Proposals come from a frozen class-agnostic RPN and do not depend on the detector, so they are
computed once per training image (at the RPN's own input size, unflipped) and kept in memory; a
flipped image gets its proposals mirrored. The GT boxes are added to the proposals in training.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from trainer.detection_data import DetectionSet, Vocabulary, hflip, repeat_factors, training_order
from trainer.detector import DetectorSettings, OpenVocabDetector
from trainer.evaluation import to_coco_results

# images (float [3, H, W] in 0..1) -> per image (boxes [N, 4] original pixels, objectness logits [N])
BatchProposalFn = Callable[[list], list]


@dataclass
class TrainSettings:
    steps: int = 1000
    batch_size: int = 4
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    warmup_factor: float = 0.001
    lr_steps: list = field(default_factory=list)
    grad_clip: Optional[float] = None
    repeat_factor_threshold: Optional[float] = None     # LVIS: 0.001
    flip: bool = True
    seed: int = 0
    log_every: int = 20


def rpn_proposal_fn(rpn, *, min_size: int, max_size: int, pre_nms_top_n: int, post_nms_top_n: int,
                    nms_thresh: float) -> BatchProposalFn:
    """Adapt trainer/rpn.py's ProposalNetwork.propose to a BatchProposalFn with fixed settings."""
    def propose(images: list) -> list:
        with torch.no_grad():
            return rpn.propose(images, min_size=min_size, max_size=max_size, pre_nms_top_n=pre_nms_top_n,
                               post_nms_top_n=post_nms_top_n, nms_thresh=nms_thresh)
    return propose


def compute_proposals(propose: BatchProposalFn, data: DetectionSet, image_ids: Sequence[int],
                      batch_size: int = 8, progress: bool = True, desc: str = "proposals") -> dict:
    """{image_id: (boxes [N, 4] float32 original pixels, objectness [N])} on the CPU."""
    out = {}
    ids = list(image_ids)
    for start in tqdm(range(0, len(ids), batch_size), desc=desc, unit="batch", disable=not progress,
                      dynamic_ncols=True, mininterval=2.0):
        chunk = ids[start:start + batch_size]
        images = [data.load_image(data.image_by_id[i]) for i in chunk]
        for image_id, (boxes, obj) in zip(chunk, propose(images)):
            out[image_id] = (boxes.detach().float().cpu().reshape(-1, 4), obj.detach().float().cpu().reshape(-1))
    return out


def lr_factor(step: int, s: TrainSettings) -> float:
    """Linear warmup from warmup_factor, then x0.1 at each of lr_steps (detectron2's WarmupMultiStepLR)."""
    factor = 0.1 ** sum(step >= m for m in s.lr_steps)
    if step < s.warmup_steps:
        alpha = step / max(1, s.warmup_steps)
        factor *= s.warmup_factor * (1 - alpha) + alpha
    return factor


def train_detector(detector: OpenVocabDetector, data: DetectionSet, vocab: Vocabulary, proposals: dict,
                   settings: TrainSettings, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Train `detector` (its vocabulary must be `vocab`) on the images of `data` holding at least one
    box of `vocab`. Returns a report: steps, seconds, loss history, images seen."""
    if len(vocab) != detector.num_classes:
        raise ValueError(f"the detector scores {detector.num_classes} classes but the training vocabulary "
                         f"has {len(vocab)}")
    image_ids = [i for i in data.image_ids_with_boxes(vocab) if i in proposals]
    if not image_ids:
        raise ValueError("no training image has a box of the training vocabulary (and proposals)")
    factors = (repeat_factors(data, image_ids, settings.repeat_factor_threshold, vocab)
               if settings.repeat_factor_threshold else None)
    order = training_order(len(image_ids), settings.seed, factors)
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    flip_rng = random.Random(settings.seed + 1)
    params = detector.trainable_parameters()
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    detector.train()
    history, window = [], []
    started = time.time()
    bar = tqdm(range(settings.steps), desc="transfer", unit="step", disable=not progress,
               dynamic_ncols=True, mininterval=2.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * lr_factor(step, settings)
        images, props, targets = [], [], []
        for _ in range(settings.batch_size):
            image_id = image_ids[next(order)]
            image = data.load_image(data.image_by_id[image_id])
            boxes, labels = data.targets(image_id, vocab)
            p = proposals[image_id][0]
            if settings.flip and flip_rng.random() < 0.5:
                image, boxes, p = hflip(image, boxes, p)
            images.append(image)
            props.append(p)
            targets.append({"boxes": boxes, "labels": labels})
        losses = detector(images, props, targets)
        loss = sum(losses.values())
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"transfer: loss is {float(loss)} at step {step}: "
                                     f"{ {k: float(v) for k, v in losses.items()} }")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        optimizer.step()
        window.append({k: float(v.detach()) for k, v in losses.items()})
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            mean = {k: round(sum(w[k] for w in window) / len(window), 4) for k in window[0]}
            history.append({"step": step + 1, "lr": optimizer.param_groups[0]["lr"], **mean})
            bar.set_postfix(mean)
            window = []
    detector.eval()
    return {"steps": settings.steps, "seconds": round(time.time() - started, 2),
            "train_images": len(image_ids), "loss_history": history,
            "final": history[-1] if history else {}}


def detect_dataset(detector: OpenVocabDetector, data: DetectionSet, vocab: Vocabulary,
                   image_ids: Sequence[int], proposals: dict, progress: bool = True) -> list[dict]:
    """COCO results of the detector over `image_ids` with `vocab` (the detector's current vocabulary)."""
    if len(vocab) != detector.num_classes:
        raise ValueError(f"vocabulary of {len(vocab)} classes for a detector scoring {detector.num_classes}")
    detector.eval()
    results = []
    for image_id in tqdm(list(image_ids), desc="detect", unit="img", disable=not progress,
                         dynamic_ncols=True, mininterval=2.0):
        image = data.load_image(data.image_by_id[image_id])
        boxes, objectness = proposals[image_id]
        (found,) = detector.detect([image], [boxes], [objectness])
        results += to_coco_results(image_id, found["boxes"].cpu(), found["scores"].cpu(),
                                   found["labels"].cpu(), vocab)
    return results


# -- what the transfer / evaluate / detect recipes share (manifest -> files and models) ----------------

def annotation_file(manifest, which: str) -> "Path":
    """transfer.annotations (which='train') or transfer.val_annotations ('val'); default: the
    synthetic world's instances_train.json / instances_val.json."""
    from pathlib import Path

    from pipeline.layout import RunLayout
    from pipeline.stage import StageInputError

    cfg = manifest.transfer
    explicit = cfg.annotations if which == "train" else cfg.val_annotations
    if explicit:
        path = Path(manifest.resolve(explicit))
        if not path.is_file():
            raise FileNotFoundError(f"transfer.{'annotations' if which == 'train' else 'val_annotations'}: "
                                    f"{path}: no such file")
        return path
    if manifest.corpus.format != "synthetic":
        raise StageInputError(f"set transfer.{'annotations' if which == 'train' else 'val_annotations'} to "
                              "a COCO/LVIS-format file (the default is the synthetic world's)")
    world = Path(manifest.resolve(manifest.corpus.path) or RunLayout.of(manifest).synth)
    path = world / f"instances_{which}.json"
    if not path.is_file():
        raise StageInputError(f"{path}: the synthetic world is not there; run `regionclip synth MANIFEST`")
    return path


def images_root(manifest, which: str):
    cfg = manifest.transfer
    root = cfg.images_root if which == "train" else cfg.val_images_root
    return manifest.resolve(root) if root else None


def clip_checkpoint(manifest, which: str) -> "Path":
    """The CLIP checkpoint of `teacher` (teacher.checkpoint or train-teacher's output) or `pretrain`
    (the exported student); a missing file is an error naming the stage that makes it."""
    from pathlib import Path

    from pipeline.layout import RunLayout
    from trainer.clip import CheckpointNotFoundError
    from trainer.text_embed import teacher_checkpoint_path

    if which == "teacher":
        path = Path(teacher_checkpoint_path(manifest))
        hint = "set teacher.checkpoint or run `regionclip train-teacher MANIFEST`"
    elif which == "pretrain":
        path = RunLayout.of(manifest).student_checkpoint
        hint = "run `regionclip pretrain MANIFEST` first"
    else:
        raise ValueError(f"unknown model {which!r}; use teacher or pretrain")
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: no {which} checkpoint; {hint}")
    return path


def class_embeddings(manifest, names: Sequence[str], device="cpu", text_model=None) -> torch.Tensor:
    """Class text embeddings [C, D] (L2-normalized) from the teacher's text encoder over the 81
    templates (embed.ensemble), checked against the teacher's width."""
    from trainer.clip import check_embedding_dim, embedding_dim
    from trainer.text_embed import embed_names, load_teacher

    if text_model is None:
        text_model = load_teacher(manifest, device=device)
    model, tokenizer = text_model
    emb = embed_names(model, tokenizer, list(names), manifest.embed.ensemble, device=device, progress=False)
    check_embedding_dim(embedding_dim(model), emb.shape[1], "the class embeddings", manifest.teacher.arch)
    return torch.from_numpy(emb).to(device)


def load_frozen_rpn(manifest, device="cpu"):
    """The class-agnostic RPN (proposals.checkpoint, or train-rpn's output), frozen."""
    from pipeline.layout import RunLayout
    from trainer.rpn import load_rpn

    rpn = load_rpn(manifest.resolve(manifest.proposals.checkpoint) or RunLayout.of(manifest).rpn_checkpoint,
                   device)
    rpn.requires_grad_(False)
    return rpn.eval()


def detector_settings(manifest) -> "DetectorSettings":
    from trainer.detector import DetectorSettings

    t, e = manifest.transfer, manifest.evaluate
    return DetectorSettings(
        min_sizes=tuple(t.min_sizes), max_size=t.max_size, test_min_size=e.min_size, test_max_size=e.max_size,
        flip=t.flip, rois_per_image=t.rois_per_image, positive_fraction=t.positive_fraction,
        iou_threshold=t.iou_threshold, focal_gamma=t.focal_gamma, background_weight=t.background_weight,
        only_sample_fg_proposals=t.only_sample_fg_proposals, score_threshold=e.score_threshold,
        detections_per_image=e.detections_per_image, soft_nms_sigma=e.soft_nms_sigma,
        multiply_rpn_score=e.multiply_rpn_score)


def apply_test_settings(detector, evaluate_cfg) -> None:
    """The manifest's `evaluate` section decides how a trained detector is tested (sizes, scores,
    suppression), whatever its checkpoint recorded."""
    s, e = detector.settings, evaluate_cfg
    s.test_min_size, s.test_max_size = e.min_size, e.max_size
    s.score_threshold, s.detections_per_image = e.score_threshold, e.detections_per_image
    s.soft_nms_sigma, s.multiply_rpn_score = e.soft_nms_sigma, e.multiply_rpn_score


def train_settings(manifest) -> TrainSettings:
    t = manifest.transfer
    return TrainSettings(steps=t.steps, batch_size=t.batch_size, lr=t.lr, momentum=t.momentum,
                         weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, lr_steps=list(t.lr_steps),
                         repeat_factor_threshold=t.repeat_factor_threshold, flip=t.flip, seed=t.seed)
