"""Training and evaluating the class-agnostic RPN (the `train-rpn` stage's loop).

    train = read_coco_boxes("instances_train.json")          # every category's boxes, as one class
    history = train_rpn(model, train, cfg)                     # SGD, warmup, x0.1 steps, flips
    report = evaluate_recall(model, read_coco_boxes("instances_val.json"), min_size=.., max_size=..)
    report["novel"]["recall@300"]   # recall at IoU 0.5 of the novel categories' boxes

A COCO-format set is read with plain JSON: `bbox` [x, y, w, h] -> x1y1x2y2, crowd and empty boxes
dropped; a category's `split` field ("base" / "novel", as in the synthetic world and LVIS's
frequency-based splits) groups the recall figures.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from trainer.data.images import read_image_tensor
from trainer.models.rpn import ProposalNetwork, proposal_hits
from trainer.engine.device import resolve_device
from trainer.tasks.teacher import _save_figure, _summary_writer

log = logging.getLogger(__name__)


@dataclass
class CocoBoxes:
    """A COCO-format detection set, reduced to what an RPN needs."""
    images: list[dict]                      # {'id', 'path', 'width', 'height'}
    boxes: dict[int, np.ndarray]            # image id -> float32 [N, 4] x1y1x2y2
    categories: dict[int, np.ndarray]       # image id -> int64 [N] category ids
    split_of: dict[int, str]                # category id -> 'base' / 'novel' / ... (may be empty)

    def with_boxes(self) -> "CocoBoxes":
        """Only the images that have at least one box (the OVD protocol's training images)."""
        keep = [im for im in self.images if len(self.boxes.get(im["id"], ())) > 0]
        return CocoBoxes(keep, self.boxes, self.categories, self.split_of)

    @property
    def num_boxes(self) -> int:
        return int(sum(len(self.boxes.get(im["id"], ())) for im in self.images))


def read_coco_boxes(annotations: Path, images_root: Optional[Path] = None) -> CocoBoxes:
    """Read a COCO instances file; image paths are `images_root / file_name` (default: the JSON's folder)."""
    annotations = Path(annotations)
    if not annotations.is_file():
        raise FileNotFoundError(f"{annotations}: no such COCO annotations file")
    data = json.loads(annotations.read_text(encoding="utf-8"))
    root = Path(images_root) if images_root else annotations.parent
    images = [{"id": im["id"], "path": str(root / im["file_name"]), "width": im.get("width"),
               "height": im.get("height")} for im in data["images"]]
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
    return CocoBoxes(images, {k: np.asarray(v, np.float32) for k, v in boxes.items()},
                     {k: np.asarray(v, np.int64) for k, v in cats.items()}, split_of)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then x0.1 at 2/3 and again at 8/9 of training (detectron2's step schedule shape)."""
    if step < warmup:
        return 0.001 + (1 - 0.001) * step / warmup
    return 0.1 ** sum(step >= m for m in (int(total * 2 / 3), int(total * 8 / 9)))


@dataclass
class RpnHistory:
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    loss_objectness: list[float] = field(default_factory=list)
    loss_box: list[float] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def train_rpn(model: ProposalNetwork, data: CocoBoxes, cfg, *, seed: int = 0,
              tensorboard_dir: Optional[Path] = None, val: Optional[CocoBoxes] = None,
              progress: bool = True) -> RpnHistory:
    """Train `model` in place on every box of `data` (one class): SGD momentum 0.9, weight decay 1e-4,
    warmup, step decay, random horizontal flips, gradient-norm clip 10. `cfg`: TrainRpnConfig (epochs,
    batch_size, lr, min_size, max_size, device, warmup_steps). `val`: recall after each epoch."""
    device = resolve_device(cfg.device)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    data = data.with_boxes()
    if not data.images:
        raise ValueError("train-rpn: the training set has no boxes")
    model.to(device).train()
    model.transform.min_size, model.transform.max_size = (int(cfg.min_size),), int(cfg.max_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(data.images) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warmup = min(getattr(cfg, "warmup_steps", 100), max(1, total // 4))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
    writer = _summary_writer(tensorboard_dir)
    history = RpnHistory()
    started, step = time.time(), 0
    bar = tqdm(total=total, desc="train-rpn", unit="step", disable=not progress)
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(data.images), generator=generator).tolist()
        for start in range(0, len(order), cfg.batch_size):
            images, targets = [], []
            for i in order[start:start + cfg.batch_size]:
                record = data.images[i]
                image = read_image_tensor(record["path"], unit_range=True)
                boxes = torch.from_numpy(data.boxes[record["id"]].copy())
                if torch.rand((), generator=generator) < 0.5:       # horizontal flip
                    image = image.flip(-1)
                    width = image.shape[-1]
                    boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
                images.append(image.to(device))
                targets.append({"boxes": boxes.to(device)})
            losses = model(images, targets)
            loss = losses["loss_objectness"] + losses["loss_rpn_box_reg"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            optimizer.step()
            schedule.step()
            step += 1
            history.steps.append(step)
            history.losses.append(loss.item())
            history.loss_objectness.append(losses["loss_objectness"].item())
            history.loss_box.append(losses["loss_rpn_box_reg"].item())
            if writer:
                writer.add_scalar("train/loss", loss.item(), step)
                writer.add_scalar("train/loss_objectness", losses["loss_objectness"].item(), step)
                writer.add_scalar("train/loss_rpn_box_reg", losses["loss_rpn_box_reg"].item(), step)
                writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        record = {"epoch": epoch + 1, "step": step,
                  "loss": round(float(np.mean(history.losses[-steps_per_epoch:])), 5)}
        if val is not None:
            report = evaluate_recall(model, val, min_size=cfg.min_size, max_size=cfg.max_size, device=device)
            record.update({f"recall_{name}": part["recall@300"] for name, part in report.items()
                           if isinstance(part, dict) and "recall@300" in part})
            model.train()
            if writer:
                for name, value in record.items():
                    if name.startswith("recall_"):
                        writer.add_scalar(f"val/{name}", value, step)
        history.epochs.append(record)
        log.info("train-rpn epoch %d: %s", epoch + 1, record)
    bar.close()
    if writer:
        writer.close()
    model.eval()
    history.seconds = round(time.time() - started, 2)
    return history


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


def plot_rpn_curve(history: RpnHistory, path: Path) -> Path:
    """Loss per step (total, objectness, box) and val recall per epoch, as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(history.steps, history.losses, lw=1, label="total")
    ax[0].plot(history.steps, history.loss_objectness, lw=1, label="objectness")
    ax[0].plot(history.steps, history.loss_box, lw=1, label="box")
    ax[0].set_xlabel("step")
    ax[0].set_title("train-rpn: loss")
    ax[0].legend()
    for key in sorted({k for e in history.epochs for k in e if k.startswith("recall_")}):
        ax[1].plot([e["epoch"] for e in history.epochs if key in e],
                   [e[key] for e in history.epochs if key in e], marker="o", label=key[len("recall_"):])
    ax[1].set_ylim(0, 1)
    ax[1].set_xlabel("epoch")
    ax[1].set_title("val recall@300, IoU 0.5")
    if any(k.startswith("recall_") for e in history.epochs for k in e):
        ax[1].legend()
    fig.tight_layout()
    return _save_figure(fig, path)
