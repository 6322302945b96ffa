"""Detector transfer: the training task on trainer/engine/ (base classes, frozen RPN proposals; the
engine's hooks give it checkpoints, resume, TensorBoard and a curve) and inference over a detection
set. The stage modules `stages/transfer.py` and `stages/evaluate.py` are recipes over these.

Proposals come from a frozen class-agnostic RPN and do not depend on the detector, so they are
computed once per image (at the RPN's own input size, unflipped) into a `ProposalStore`: float32 rows
in an unnamed temporary file, read back per image, so memory holds 8 bytes per image rather than
proposals_per_image x 20 bytes (2.4 GB for COCO train2017 at 1000 proposals). A flipped image gets its
proposals mirrored. The GT boxes are added to the proposals in training. `compute_proposals` can also
keep them in a Parquet file under a fingerprint (pipeline/sidecars.py, written as they are computed, renamed
into place at the end), which `load_proposals` reads back into a store while the fingerprint is current,
instead of running the RPN over the training set again.

Training images are read from disk per step by a DataLoader over the seeded training order
(`TrainSettings.num_workers` processes read ahead; 0 reads in the training process); memory holds the
images in flight, never the training set.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from trainer.data.detection import (DetectionSet, DetectorClasses, ImagesByPosition, hflip, repeat_factors,
                                    training_order)
from trainer.engine.checkpoint import seed_all
from trainer.engine.hooks import standard_hooks
from trainer.engine.loop import TrainFiles, TrainingInterrupted, TrainLoop
from trainer.engine.schedules import WarmupMultiStep
from trainer.evaluation import to_coco_results
from trainer.models.detector import OpenVocabDetector

log = logging.getLogger(__name__)

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
    num_workers: int = 0        # image-reading processes; the result does not depend on it


def rpn_proposal_fn(rpn, *, min_size: int, max_size: int, pre_nms_top_n: int, post_nms_top_n: int,
                    nms_thresh: float) -> BatchProposalFn:
    """Adapt trainer/models/rpn.py's ProposalNetwork.propose to a BatchProposalFn with fixed settings."""
    def propose(images: list) -> list:
        with torch.no_grad():
            return rpn.propose(images, min_size=min_size, max_size=max_size, pre_nms_top_n=pre_nms_top_n,
                               post_nms_top_n=post_nms_top_n, nms_thresh=nms_thresh)
    return propose


class ProposalStore:
    """Per image (boxes [N, 4] float32 original pixels, objectness [N]), as `store[image_id]`, kept as
    float32 rows x1, y1, x2, y2, objectness in an unnamed temporary file (in `folder`; gone when the store
    is, even after a kill): memory holds one (offset, count) per image."""

    def __init__(self, folder: Optional[os.PathLike] = None):
        self.file = tempfile.TemporaryFile(dir=folder)
        self.rows: dict[int, tuple[int, int]] = {}    # image id -> (first row, row count)
        self.end = 0

    def add(self, image_id: int, boxes: torch.Tensor, objectness: torch.Tensor) -> None:
        rows = np.concatenate([boxes.detach().float().cpu().reshape(-1, 4).numpy(),
                               objectness.detach().float().cpu().reshape(-1, 1).numpy()], axis=1)
        os.pwrite(self.file.fileno(), np.ascontiguousarray(rows, np.float32).tobytes(), self.end * 20)
        self.rows[image_id] = (self.end, len(rows))
        self.end += len(rows)

    def __contains__(self, image_id: int) -> bool:
        return image_id in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, image_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        first, count = self.rows[image_id]
        data = os.pread(self.file.fileno(), count * 20, first * 20)
        rows = torch.from_numpy(np.frombuffer(data, np.float32).reshape(count, 5).copy())
        return rows[:, :4].contiguous(), rows[:, 4].contiguous()


def compute_proposals(propose: BatchProposalFn, data: DetectionSet, image_ids: Sequence[int],
                      batch_size: int = 8, progress: bool = True, desc: str = "proposals",
                      folder: Optional[os.PathLike] = None, keep: Optional[os.PathLike] = None,
                      fingerprint: str = "") -> ProposalStore:
    """The proposals of `image_ids` (see ProposalStore; its file goes in `folder`, default the system's
    temporary folder). `keep`: also write them to this Parquet file under `fingerprint`, for `load_proposals`."""
    from pipeline.sidecars import detection_proposals_writer

    store = ProposalStore(folder)
    ids = list(image_ids)
    with (detection_proposals_writer(keep, fingerprint) if keep else contextlib.nullcontext()) as write:
        for start in tqdm(range(0, len(ids), batch_size), desc=desc, unit="batch", disable=not progress,
                          dynamic_ncols=True, mininterval=2.0):
            chunk = ids[start:start + batch_size]
            images = [data.load_image(data.image_by_id[i]) for i in chunk]
            for image_id, (boxes, obj) in zip(chunk, propose(images)):
                store.add(image_id, boxes, obj)
                if write:
                    write(image_id, *store[image_id])
    return store


def load_proposals(path: os.PathLike, fingerprint: str, image_ids: Sequence[int],
                   folder: Optional[os.PathLike] = None) -> Optional[ProposalStore]:
    """The proposals `compute_proposals` kept in `path`, as a store (in `folder`, read a few hundred rows at a
    time), when they were made under `fingerprint` and hold every one of `image_ids`; None otherwise (no
    file, another fingerprint, a damaged file: compute them again)."""
    import pyarrow as pa

    from pipeline.sidecars import detection_proposals_fingerprint, iter_detection_proposals

    if detection_proposals_fingerprint(path) != fingerprint:
        return None
    store = ProposalStore(folder)
    try:
        for image_id, boxes, objectness in iter_detection_proposals(path):
            store.add(image_id, torch.tensor(boxes), torch.tensor(objectness))
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:
        log.warning("%s: unreadable (%s); computing the proposals again", path, e)
        return None
    return store if all(i in store for i in image_ids) else None


class DetectorTrainer(TrainLoop):
    """The detector on the base classes (docs/method.md §6): SGD with WarmupMultiStep, `batch_size` images a
    step drawn from `training_order` (shuffled or repeat-factor epochs), random flips. The images drawn so
    far are the data position: a resumed run draws them again from the seeded order and flip generator
    (no image is read) and continues. Images come from a DataLoader whose sampler is that order; its
    workers read ahead, the flips are drawn here as images are taken, so the run is the same for any
    number of workers."""

    def __init__(self, detector: OpenVocabDetector, data: DetectionSet, vocab: DetectorClasses, proposals: ProposalStore,
                 settings: TrainSettings, *, files: Optional[TrainFiles] = None, checkpoint_every: int = 1000,
                 fingerprint: str = "", progress: bool = True):
        if len(vocab) != detector.num_classes:
            raise ValueError(f"the detector scores {detector.num_classes} classes but the training vocabulary "
                             f"has {len(vocab)}")
        image_ids = [i for i in data.image_ids_with_boxes(vocab) if i in proposals]
        if not image_ids:
            raise ValueError("no training image has a box of the training vocabulary (and proposals)")
        self.factors = (repeat_factors(data, image_ids, settings.repeat_factor_threshold, vocab)
                        if settings.repeat_factor_threshold else None)
        self.data, self.vocab, self.proposals, self.image_ids, self.s = data, vocab, proposals, image_ids, settings
        self.start_order(images_drawn=0)
        seed_all(settings.seed)
        self.params = detector.trainable_parameters()
        optimizer = torch.optim.SGD(self.params, lr=settings.lr, momentum=settings.momentum,
                                    weight_decay=settings.weight_decay)
        detector.train()
        super().__init__("transfer", model=detector, optimizer=optimizer, max_steps=settings.steps,
                         schedule=WarmupMultiStep(settings.warmup_steps, tuple(settings.lr_steps),
                                                  settings.warmup_factor),
                         device=next(detector.parameters()).device, state_path=files.state if files else None,
                         fingerprint=fingerprint, settings=asdict(settings), images_per_step=settings.batch_size)
        self.register_hooks(standard_hooks(
            log_every=settings.log_every, checkpoint_every=checkpoint_every,
            tensorboard=files.tensorboard if files else None, curve=files.curve if files else None,
            progress=progress))

    def start_order(self, images_drawn: int) -> None:
        """The image order and the flip draws, advanced past the first `images_drawn` images."""
        self.order = training_order(len(self.image_ids), self.s.seed, self.factors)
        self.flip_rng = random.Random(self.s.seed + 1)
        for _ in range(images_drawn):
            next(self.order)
            if self.s.flip:
                self.flip_rng.random()
        self.images_drawn = images_drawn
        self.close_images()

    def next_image(self) -> tuple[int, torch.Tensor]:
        """(position in image_ids, image) of the next image of the order; the loader starts on first use,
        so a resume does not start workers twice."""
        if self.images is None:
            loader = DataLoader(ImagesByPosition(self.data, self.image_ids), batch_size=None, sampler=self.order,
                                num_workers=self.s.num_workers, persistent_workers=False,
                                # its own generator: the global RNG (restored on resume) is not drawn from
                                generator=torch.Generator().manual_seed(self.s.seed))
            self.images = iter(loader)
        return next(self.images)

    def close_images(self) -> None:
        """Stop the loader's workers (a new order, the end of training)."""
        self.images: Optional[Iterator] = None

    def run_step(self) -> dict[str, float]:
        images, props, targets = [], [], []
        for _ in range(self.s.batch_size):
            position, image = self.next_image()
            image_id = self.image_ids[position]
            self.images_drawn += 1
            boxes, labels = self.data.targets(image_id, self.vocab)
            p = self.proposals[image_id][0]
            if self.s.flip and self.flip_rng.random() < 0.5:
                image, boxes, p = hflip(image, boxes, p)
            images.append(image)
            props.append(p)
            targets.append({"boxes": boxes, "labels": labels})
        losses = self.model(images, props, targets)
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.s.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.s.grad_clip)
        self.optimizer.step()
        return {k.removeprefix("loss_"): float(v.detach()) for k, v in losses.items()}

    def data_state(self) -> dict:
        return {"images_drawn": self.images_drawn}

    def load_data_state(self, state: dict) -> None:
        self.start_order(int(state["images_drawn"]))


def train_detector(detector: OpenVocabDetector, data: DetectionSet, vocab: DetectorClasses, proposals: ProposalStore,
                   settings: TrainSettings, progress: bool = True, *, files: Optional[TrainFiles] = None,
                   checkpoint_every: int = 1000, fingerprint: str = "") -> dict:
    """Train `detector` (its vocabulary must be `vocab`) on the images of `data` holding at least one
    box of `vocab`; resumes from `files.state` when it holds this run's state (same `fingerprint`).
    Returns a report: steps, seconds, images, the loss history (means over `log_every` steps). SIGTERM:
    the state is saved and TrainingInterrupted (exit 143) is raised."""
    trainer = DetectorTrainer(detector, data, vocab, proposals, settings, files=files,
                              checkpoint_every=checkpoint_every, fingerprint=fingerprint, progress=progress)
    try:
        summary = trainer.train()
    finally:
        trainer.close_images()
    TrainingInterrupted.raise_if(trainer, summary)
    detector.eval()
    history = [{"step": h["step"], "lr": h["lr"], **{k: round(v, 4) for k, v in h.items() if k.startswith("loss_")}}
               for h in trainer.history]
    return {"steps": settings.steps, "seconds": round(trainer.seconds, 2), "train_images": len(trainer.image_ids),
            "loss_history": history, "final": history[-1] if history else {}}


def detect_dataset(detector: OpenVocabDetector, data: DetectionSet, vocab: DetectorClasses,
                   image_ids: Sequence[int], proposals: ProposalStore, progress: bool = True) -> list[dict]:
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
