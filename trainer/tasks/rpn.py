"""Training and evaluating the class-agnostic RPN (the `train-rpn` stage's task on trainer/engine/).

    train = read_coco_boxes("instances_train.json")          # every category's boxes, as one class
    history = train_rpn(model, train, cfg)                     # SGD, warmup, x0.1 steps, flips
    report = evaluate_recall(model, read_coco_boxes("instances_val.json"), min_size=.., max_size=..)
    report["novel"]["recall@300"]   # recall at IoU 0.5 of the novel categories' boxes
    train.boxed_category_names()    # what the RPN saw: recorded in its checkpoint (training_categories)
    novel_classes_seen(rpn.training_categories, evaluation_novel_names)   # evaluate's warning

A COCO-format set is read with plain JSON: `bbox` [x, y, w, h] -> x1y1x2y2, crowd and empty boxes
dropped; a category's `split` field ("base" / "novel", as in the synthetic world and LVIS's
frequency-based splits) groups the recall figures.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from pipeline.concepts import normalize_concept
from trainer.data.detection import image_files, load_coco
from trainer.data.images import read_image_tensor
from trainer.engine.checkpoint import seed_all
from trainer.engine.device import resolve_device
from trainer.engine.hooks import Callback, log_every_for, standard_hooks
from trainer.engine.loop import TrainFiles, TrainingInterrupted, TrainLoop
from trainer.engine.schedules import WarmupMultiStep
from trainer.models.rpn import ProposalNetwork, proposal_hits

log = logging.getLogger(__name__)


@dataclass
class CocoBoxes:
    """A COCO-format detection set, reduced to what an RPN needs."""
    images: list[dict]                      # {'id', 'path', 'width', 'height'}
    boxes: dict[int, np.ndarray]            # image id -> float32 [N, 4] x1y1x2y2
    categories: dict[int, np.ndarray]       # image id -> int64 [N] category ids
    split_of: dict[int, str]                # category id -> 'base' / 'novel' / ... (may be empty)
    names: dict[int, str] = field(default_factory=dict)   # category id -> name

    def with_boxes(self) -> "CocoBoxes":
        """Only the images that have at least one box (the OVD protocol's training images)."""
        keep = [im for im in self.images if len(self.boxes.get(im["id"], ())) > 0]
        return CocoBoxes(keep, self.boxes, self.categories, self.split_of, self.names)

    def boxed_category_names(self) -> list[str]:
        """Names of the categories that have a box in these images (what an RPN trained here saw)."""
        ids = {int(c) for im in self.images for c in self.categories.get(im["id"], ())}
        return sorted(self.names.get(c, str(c)) for c in ids)

    @property
    def num_boxes(self) -> int:
        return int(sum(len(self.boxes.get(im["id"], ())) for im in self.images))


def read_coco_boxes(annotations: Path, images_root: Optional[Path] = None, *, allow_outside_root: bool = False,
                    setting: str = "allow_outside_root", clip_boxes: bool = False, strict: bool = False,
                    strict_setting: str = "strict_annotations") -> CocoBoxes:
    """Read a COCO instances file through the one loader (trainer.data.detection.load_coco: validated,
    boxes clipped to the image with `clip_boxes`, `strict` refuses a file that loses annotations); image
    paths are `images_root / file_name` (default: the JSON's folder), each inside it unless
    `allow_outside_root` (trainer.data.detection.image_files: ImagesOutsideRoot naming `setting` otherwise)."""
    annotations = Path(annotations)
    data = load_coco(annotations, clip_boxes=clip_boxes, strict=strict, strict_setting=strict_setting)
    root = Path(images_root) if images_root else annotations.parent
    files = image_files(data["images"], root, allow_outside_root=allow_outside_root, setting=setting,
                        source=str(annotations))
    images = [{"id": im["id"], "path": str(path), "width": im.get("width"), "height": im.get("height")}
              for im, path in zip(data["images"], files)]
    boxes: dict[int, list] = {}
    cats: dict[int, list] = {}
    for ann in data.get("annotations", []):
        if ann.get("iscrowd", 0):
            continue
        x, y, w, h = ann["bbox"]
        if w < 1 or h < 1:
            continue
        boxes.setdefault(ann["image_id"], []).append([x, y, x + w, y + h])
        cats.setdefault(ann["image_id"], []).append(ann["category_id"])
    split_of = {c["id"]: c["split"] for c in data.get("categories", []) if "split" in c}
    names = {c["id"]: c.get("name", str(c["id"])) for c in data.get("categories", [])}
    return CocoBoxes(images, {k: np.asarray(v, np.float32) for k, v in boxes.items()},
                     {k: np.asarray(v, np.int64) for k, v in cats.items()}, split_of, names)


def _name_forms(name: str) -> set[str]:
    """A class name as compared across datasets: normalised (pipeline.concepts), with and without an
    LVIS-style qualifier in parentheses ('bus_(vehicle)' -> 'bus vehicle', 'bus')."""
    return {normalize_concept(name), normalize_concept(re.sub(r"\(.*?\)", " ", name))} - {""}


def novel_classes_seen(training_categories: Optional[Sequence[str]], novel_names: Sequence[str]) -> list[str]:
    """The novel classes whose boxes an RPN was trained on (names compared after normalisation, so a
    synonym such as LVIS' 'necktie' for COCO's 'tie' is not caught); [] when the RPN records none."""
    if not training_categories:
        return []
    trained = set().union(*(_name_forms(n) for n in training_categories))
    return [n for n in novel_names if _name_forms(n) & trained]


@dataclass
class RpnHistory:
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    loss_objectness: list[float] = field(default_factory=list)
    loss_box: list[float] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def rpn_schedule(cfg, total_steps: int) -> WarmupMultiStep:
    """Linear warmup (at most a quarter of training), then x0.1 at 2/3 and again at 8/9 of training
    (detectron2's step schedule shape)."""
    warmup = min(cfg.warmup_steps, max(1, total_steps // 4))
    return WarmupMultiStep(warmup, (int(total_steps * 2 / 3), int(total_steps * 8 / 9)))


class RpnTrainer(TrainLoop):
    """SGD on every box of a COCO-format set as one class: momentum 0.9, weight decay 1e-4, random
    horizontal flips, gradient-norm clip 10. Epoch e visits the images in a random order; the order and
    the flips are drawn from one seeded generator, whose state (with the epoch's order and place) is
    the data position."""

    def __init__(self, model: ProposalNetwork, data: CocoBoxes, cfg, *, seed: int = 0,
                 val: Optional[CocoBoxes] = None, files: Optional[TrainFiles] = None, checkpoint_every: int = 500,
                 fingerprint: str = "", progress: bool = True):
        device = resolve_device(cfg.device)
        self.generator = torch.Generator().manual_seed(seed)
        seed_all(seed)
        data = data.with_boxes()
        if not data.images:
            raise ValueError("train-rpn: the training set has no boxes")
        model.to(device).train()
        model.transform.min_size, model.transform.max_size = (int(cfg.min_size),), int(cfg.max_size)
        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(self.params, lr=cfg.lr, momentum=0.9, weight_decay=1e-4)
        total = cfg.epochs * math.ceil(len(data.images) / cfg.batch_size)
        super().__init__("train-rpn", model=model, optimizer=optimizer, max_steps=total,
                         schedule=rpn_schedule(cfg, total), device=device, state_path=files.state if files else None,
                         fingerprint=fingerprint, settings={**cfg.model_dump(mode="json"), "seed": seed},
                         images_per_step=cfg.batch_size)
        self.cfg, self.data, self.val = cfg, data, val
        self.epoch, self.order, self.place, self.epoch_losses = 0, None, 0, []
        self.register_hooks(standard_hooks(
            log_every=log_every_for(total), checkpoint_every=checkpoint_every,
            tensorboard=files.tensorboard if files else None,
            curve=files.curve if files else None, progress=progress,
            epoch_keys=("recall_all", "recall_base", "recall_novel"), task_hooks=[Callback(self._after_step)]))

    def run_step(self) -> dict[str, float]:
        if self.order is None:
            self.order = torch.randperm(len(self.data.images), generator=self.generator).tolist()
        chunk = self.order[self.place:self.place + self.cfg.batch_size]
        self.place += len(chunk)
        images, targets = [], []
        for i in chunk:
            record = self.data.images[i]
            image = read_image_tensor(record["path"], unit_range=True)
            boxes = torch.from_numpy(self.data.boxes[record["id"]].copy())
            if torch.rand((), generator=self.generator) < 0.5:       # horizontal flip
                image = image.flip(-1)
                width = image.shape[-1]
                boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
            images.append(image.to(self.device))
            targets.append({"boxes": boxes.to(self.device)})
        losses = self.model(images, targets)
        loss = losses["loss_objectness"] + losses["loss_rpn_box_reg"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 10.0)
        self.optimizer.step()
        self.epoch_losses.append(loss.item())
        return {"total": loss.item(), "objectness": losses["loss_objectness"].item(),
                "rpn_box_reg": losses["loss_rpn_box_reg"].item()}

    def _after_step(self) -> None:
        if self.place < len(self.order):
            return
        record = {"epoch": self.epoch + 1, "step": self.step, "loss": round(float(np.mean(self.epoch_losses)), 5)}
        if self.val is not None:
            report = evaluate_recall(self.model, self.val, min_size=self.cfg.min_size, max_size=self.cfg.max_size,
                                     device=self.device)
            record.update({f"recall_{name}": part["recall@300"] for name, part in report.items()
                           if isinstance(part, dict) and "recall@300" in part})
            self.model.train()
            for name, value in record.items():
                if name.startswith("recall_") and value is not None:
                    self.put_scalar(f"val_{name}", value, mean=False)
        self.epoch_records.append(record)
        log.info("train-rpn epoch %d: %s", self.epoch + 1, record)
        self.epoch, self.order, self.place, self.epoch_losses = self.epoch + 1, None, 0, []

    def data_state(self) -> dict:
        return {"epoch": self.epoch, "order": torch.tensor(self.order or [], dtype=torch.int64), "place": self.place,
                "losses": list(self.epoch_losses), "generator": self.generator.get_state()}

    def load_data_state(self, state: dict) -> None:
        self.epoch, self.place = int(state["epoch"]), int(state["place"])
        self.order = state["order"].tolist() or None
        self.epoch_losses = list(state["losses"])
        self.generator.set_state(state["generator"])


def train_rpn(model: ProposalNetwork, data: CocoBoxes, cfg, *, seed: int = 0, val: Optional[CocoBoxes] = None,
              files: Optional[TrainFiles] = None, checkpoint_every: int = 500, fingerprint: str = "",
              progress: bool = True) -> RpnHistory:
    """Train `model` in place on every box of `data` (one class); resumes from `files.state` when it holds
    this run's state (same `fingerprint`). `cfg`: TrainRpnConfig (epochs, batch_size, lr, min_size,
    max_size, device, warmup_steps). `val`: recall after each epoch. SIGTERM: the state is saved and
    TrainingInterrupted (exit 143) is raised."""
    trainer = RpnTrainer(model, data, cfg, seed=seed, val=val, files=files, checkpoint_every=checkpoint_every,
                         fingerprint=fingerprint, progress=progress)
    summary = trainer.train()
    TrainingInterrupted.raise_if(trainer, summary)
    model.eval()
    history = trainer.history
    return RpnHistory(steps=[h["step"] for h in history], losses=[h["loss_total"] for h in history],
                      loss_objectness=[h["loss_objectness"] for h in history],
                      loss_box=[h["loss_rpn_box_reg"] for h in history], epochs=list(trainer.epoch_records),
                      seconds=round(trainer.seconds, 2))


@torch.no_grad()
def evaluate_recall(model: ProposalNetwork, data: CocoBoxes, *, min_size: int, max_size: int,
                    top_ns: Sequence[int] = (100, 300), ious: Sequence[float] = (0.5, 0.7),
                    pre_nms_top_n: int = 1000, nms_thresh: float = 0.5, batch_size: int = 4,
                    device=None, progress: bool = False) -> dict:
    """Proposal recall on `data`, overall and per category split: {'all': {'recall@300': .., 'recall@300
    _iou0.7': .., 'num_boxes': ..}, 'base': {...}, 'novel': {...}, 'num_images': ..}. The keys without
    an IoU suffix are at IoU 0.5."""
    device = device or next(model.parameters()).device
    images = [im for im in data.images]
    post = max(top_ns)
    hits = {(n, iou): [] for n in top_ns for iou in ious}
    labels = []
    for start in tqdm(range(0, len(images), batch_size), desc="rpn recall", disable=not progress):
        chunk = images[start:start + batch_size]
        tensors = [read_image_tensor(im["path"], unit_range=True).to(device) for im in chunk]
        results = model.propose(tensors, min_size=min_size, max_size=max_size, pre_nms_top_n=pre_nms_top_n,
                                post_nms_top_n=post, nms_thresh=nms_thresh)
        gts = [torch.from_numpy(data.boxes.get(im["id"], np.zeros((0, 4), np.float32))) for im in chunk]
        for n in top_ns:
            for iou in ious:
                hits[(n, iou)] += proposal_hits(results, gts, iou=iou, top_n=n)
        labels += [data.categories.get(im["id"], np.zeros(0, np.int64)) for im in chunk]
    categories = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    groups = {"all": np.ones(len(categories), bool)}
    for split in sorted(set(data.split_of.values())):
        groups[split] = np.array([data.split_of.get(int(c)) == split for c in categories], bool)
    report: dict = {"num_images": len(images)}
    for name, mask in groups.items():
        part = {"num_boxes": int(mask.sum())}
        for (n, iou), per_image in hits.items():
            flat = torch.cat(per_image).numpy() if per_image else np.zeros(0, bool)
            key = f"recall@{n}" + ("" if iou == 0.5 else f"_iou{iou}")
            part[key] = round(float(flat[mask].mean()), 4) if mask.any() else None
        report[name] = part
    return report
