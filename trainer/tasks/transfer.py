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

import torch
from tqdm import tqdm

from trainer.data.detection import DetectionSet, DetectorClasses, hflip, repeat_factors, training_order
from trainer.models.detector import OpenVocabDetector
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
    """Adapt trainer/models/rpn.py's ProposalNetwork.propose to a BatchProposalFn with fixed settings."""
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


def train_detector(detector: OpenVocabDetector, data: DetectionSet, vocab: DetectorClasses, proposals: dict,
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


def detect_dataset(detector: OpenVocabDetector, data: DetectionSet, vocab: DetectorClasses,
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
