"""Image-level CLIP training on the shards (the `train-teacher` stage's loop).

open_clip model + open_clip's contrastive loss (`open_clip.loss.ClipLoss`) over batches streamed from
the WebDataset tars (trainer/data/image_text.py); AdamW (no weight decay on gains, biases and the logit
scale, as open_clip's trainer), linear warmup then cosine decay, the logit scale clamped at 100.
Held-out image-to-caption retrieval (R@1, R@5 with their chance levels) after every epoch.

    history = train_clip(model, tokenizer, train_tars, heldout_tars, cfg, steps_per_epoch=...)
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import open_clip
import torch
from tqdm import tqdm

from trainer.data.image_text import image_text_batches
from trainer.engine.device import resolve_device

log = logging.getLogger(__name__)




def clip_transforms(model, min_crop_scale: float = 0.9):
    """open_clip's (train, eval) preprocess transforms for `model` at its native size, mean and std (a
    CLIP ResNet's attention pool only takes its native grid; a new size is a new model config); the
    train transform's RandomResizedCrop takes between `min_crop_scale` and all of the image."""
    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = cfg.get("size") or model.visual.image_size
    mean, std = cfg.get("mean"), cfg.get("std")
    aug = {"scale": (float(min_crop_scale), 1.0)}
    return (open_clip.image_transform(size, is_train=True, mean=mean, std=std, aug_cfg=aug),
            open_clip.image_transform(size, is_train=False, mean=mean, std=std))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's split: no weight decay on 1-d parameters (gains, biases), BN/LN and logit_scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier: linear warmup from 0 to 1 over warmup_steps, then cosine down to 0 at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


@torch.no_grad()
def retrieval_recall(model, tokenizer, samples: Sequence[dict], preprocess, *, ks=(1, 5),
                     batch_size: int = 128, device: torch.device | str = "cpu",
                     groups: Optional[Sequence] = None) -> dict:
    """Image-to-caption retrieval among `samples` ({'image', 'text'}): the share of images whose own
    caption is among the top k (k in `ks`), with the chance level k / N. Ties in caption text are
    counted strictly (only the image's own row is a hit).

    `groups`: one hashable per sample (e.g. the caption's concept set). Web-style captions repeat
    their content in other words ("a cup.", "one cup on white"), which no image can tell apart, so
    `r1_same_group` also counts a top-1 caption of the image's own group as a hit; its chance level
    is the mean share of captions in the image's group."""
    was_training = model.training
    model.eval()
    image_features, text_features = [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        images = torch.stack([preprocess(s["image"]) for s in chunk]).to(device)
        texts = tokenizer([s["text"] for s in chunk]).to(device)
        image_features.append(model.encode_image(images, normalize=True).float())
        text_features.append(model.encode_text(texts, normalize=True).float())
    model.train(was_training)
    n = len(samples)
    if n == 0:
        return {"num_images": 0}
    sims = torch.cat(image_features) @ torch.cat(text_features).T
    ranks = (sims > sims.diag()[:, None]).sum(dim=1)  # captions scoring above the image's own one
    out = {"num_images": n}
    for k in ks:
        out[f"r{k}"] = round(float((ranks < k).float().mean()), 4)
        out[f"r{k}_chance"] = round(min(1.0, k / n), 4)
    if groups is not None:
        if len(groups) != n:
            raise ValueError(f"retrieval_recall: {len(groups)} groups for {n} samples")
        ids = {g: i for i, g in enumerate(dict.fromkeys(groups))}
        group = torch.tensor([ids[g] for g in groups])
        same = group[:, None] == group[None, :]
        top1 = sims.argmax(dim=1).cpu()
        out["r1_same_group"] = round(float(same[torch.arange(n), top1].float().mean()), 4)
        out["r1_same_group_chance"] = round(float(same.float().mean()), 4)
    return out


@dataclass
class TeacherHistory:
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)   # {'epoch', 'step', 'loss', 'r1', ...}
    seconds: float = 0.0

    def epoch_mean_loss(self, epoch_index: int, steps_per_epoch: int) -> float:
        part = self.losses[epoch_index * steps_per_epoch:(epoch_index + 1) * steps_per_epoch]
        return sum(part) / max(1, len(part))


def train_clip(model, tokenizer, train_tars: Sequence[Path], heldout: Sequence[dict], cfg, *,
               steps_per_epoch: int, seed: int = 0, tensorboard_dir: Optional[Path] = None,
               progress: bool = True, heldout_groups: Optional[Sequence] = None) -> TeacherHistory:
    """Train `model` (open_clip CLIP) in place with ClipLoss on (image, caption) batches of `train_tars`.

    `cfg`: the manifest's TrainTeacherConfig (epochs, batch_size, lr, weight_decay, warmup_steps,
    min_crop_scale, device, num_workers). `heldout`: decoded samples for retrieval after each epoch;
    `heldout_groups`: their caption groups (retrieval_recall's `groups`)."""
    device = resolve_device(cfg.device)
    torch.manual_seed(seed)
    model.to(device).train()
    train_tf, eval_tf = clip_transforms(model, cfg.min_crop_scale)
    total = cfg.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98),
                                  eps=1e-6)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, total))
    loss_fn = open_clip.loss.ClipLoss()
    writer = _summary_writer(tensorboard_dir)
    history = TeacherHistory()
    started, step = time.time(), 0
    bar = tqdm(total=total, desc="train-teacher", unit="step", disable=not progress)
    for epoch in range(cfg.epochs):
        batches = image_text_batches(train_tars, train_tf, tokenizer, batch_size=cfg.batch_size,
                                     shuffle_buffer=max(cfg.batch_size * 4, 256), seed=seed, epoch=epoch,
                                     num_workers=cfg.num_workers, drop_last=True)
        for images, texts in batches:
            if step >= (epoch + 1) * steps_per_epoch:
                break
            images, texts = images.to(device, non_blocking=True), texts.to(device, non_blocking=True)
            image_features = model.encode_image(images, normalize=True)
            text_features = model.encode_text(texts, normalize=True)
            loss = loss_fn(image_features, text_features, model.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():  # open_clip clamps the learned temperature at 100
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            lr = optimizer.param_groups[0]["lr"]
            history.steps.append(step)
            history.losses.append(loss.item())
            history.lrs.append(lr)
            if writer:
                writer.add_scalar("train/loss", loss.item(), step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/logit_scale", model.logit_scale.exp().item(), step)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        metrics = (retrieval_recall(model, tokenizer, heldout, eval_tf, device=device, groups=heldout_groups)
                   if heldout else {})
        record = {"epoch": epoch + 1, "step": step,
                  "loss": round(sum(history.losses[-steps_per_epoch:]) / max(1, min(steps_per_epoch,
                                                                                    len(history.losses))), 5),
                  **metrics}
        history.epochs.append(record)
        if writer and metrics:
            for k in ("r1", "r5", "r1_same_group"):
                if k in metrics:
                    writer.add_scalar(f"heldout/{k}", metrics[k], step)
        log.info("train-teacher epoch %d: %s", epoch + 1, record)
    bar.close()
    if writer:
        writer.close()
    model.eval()
    history.seconds = round(time.time() - started, 2)
    return history


def _summary_writer(folder: Optional[Path]):
    if folder is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: scalars are still in the stage manifest
        log.warning("tensorboard is not installed; no TensorBoard scalars written")
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return SummaryWriter(str(folder))


def plot_teacher_curve(history: TeacherHistory, path: Path) -> Path:
    """Training loss per step and held-out R@1 per epoch, as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(history.steps, history.losses, lw=1)
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("contrastive loss")
    ax[0].set_title("train-teacher: loss")
    epochs = [e for e in history.epochs if "r1" in e]
    if epochs:
        ax[1].plot([e["epoch"] for e in epochs], [e["r1"] for e in epochs], marker="o", label="R@1")
        ax[1].plot([e["epoch"] for e in epochs], [e["r5"] for e in epochs], marker="o", label="R@5")
        ax[1].axhline(epochs[-1]["r1_chance"], ls="--", c="gray", label="R@1 chance")
        if "r1_same_group" in epochs[-1]:
            ax[1].plot([e["epoch"] for e in epochs], [e["r1_same_group"] for e in epochs], marker="o",
                       label="R@1, same concepts")
            ax[1].axhline(epochs[-1]["r1_same_group_chance"], ls=":", c="gray", label="same-concepts chance")
        ax[1].legend()
    ax[1].set_xlabel("epoch")
    ax[1].set_title("held-out image->caption retrieval")
    fig.tight_layout()
    return _save_figure(fig, path)


def _save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from pipeline.io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path
