"""Image-level CLIP training on the shards (the `train-teacher` stage's task on trainer/engine/).

open_clip model + open_clip's contrastive loss (`open_clip.loss.ClipLoss`) over batches streamed from
the WebDataset tars (trainer/data/image_text.py); AdamW (no weight decay on gains, biases and the logit
scale, as open_clip's trainer), linear warmup then cosine decay (WarmupCosine), the logit scale
clamped at 100. Held-out image-to-caption retrieval (R@1, R@5 with their chance levels) after every
epoch. Checkpoints, resume, TensorBoard, progress and the curve come from the engine's hooks.

    history = train_clip(model, tokenizer, train_tars, heldout, cfg, steps_per_epoch=...,
                         files=TrainFiles(layout.teacher_state, tensorboard, curve))
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import open_clip
import torch

from trainer.data.image_text import image_text_batches
from trainer.engine.checkpoint import rng_state, seed_all, set_rng_state
from trainer.engine.device import resolve_device
from trainer.engine.hooks import Callback, log_every_for, standard_hooks
from trainer.engine.loop import DataExhausted, TrainFiles, TrainingInterrupted, TrainLoop
from trainer.engine.schedules import WarmupCosine

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


class ClipTrainer(TrainLoop):
    """open_clip's ClipLoss on (image, caption) batches streamed from the tars, epoch after epoch.

    Epoch e reads the tars in an order drawn from (seed, e) (trainer/data/image_text.py); its end (after
    `steps_per_epoch` batches, or when its stream runs dry) runs the held-out retrieval. The data position
    is (epoch, batches read in it); a resumed run rebuilds the epoch's stream from the RNG state saved at
    the epoch's start (loader workers draw their seeds from it), reads the batches already trained on
    again and drops them, then restores the RNG state of the step it resumes at."""

    def __init__(self, model, tokenizer, train_tars: Sequence[Path], heldout: Sequence[dict], cfg, *,
                 steps_per_epoch: int, seed: int = 0, heldout_groups: Optional[Sequence] = None,
                 files: Optional[TrainFiles] = None, checkpoint_every: int = 500, fingerprint: str = "",
                 progress: bool = True):
        device = resolve_device(cfg.device)
        seed_all(seed)
        model.to(device).train()
        self.train_tf, self.eval_tf = clip_transforms(model, cfg.min_crop_scale)
        total = cfg.epochs * steps_per_epoch
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98),
                                      eps=1e-6)
        super().__init__("train-teacher", model=model, optimizer=optimizer, max_steps=total,
                         schedule=WarmupCosine(cfg.warmup_steps, total), device=device,
                         state_path=files.state if files else None, fingerprint=fingerprint,
                         settings={**cfg.model_dump(mode="json"), "seed": seed, "steps_per_epoch": steps_per_epoch},
                         images_per_step=cfg.batch_size)
        self.cfg, self.tokenizer, self.train_tars, self.seed = cfg, tokenizer, list(train_tars), seed
        self.heldout, self.heldout_groups, self.steps_per_epoch = heldout, heldout_groups, steps_per_epoch
        self.loss_fn = open_clip.loss.ClipLoss()
        self.epoch, self.epoch_batches, self.epoch_losses = 0, 0, []
        self._epoch_rng: Optional[dict] = None   # the RNG state when this epoch's stream was opened
        self._batches = None
        self.register_hooks(standard_hooks(
            log_every=log_every_for(total), checkpoint_every=checkpoint_every,
            tensorboard=files.tensorboard if files else None,
            curve=files.curve if files else None, progress=progress, epoch_keys=("r1", "r5", "r1_same_group"),
            task_hooks=[Callback(self._after_step)]))

    def run_step(self) -> dict[str, float]:
        images, texts = self.next_batch()
        images, texts = images.to(self.device, non_blocking=True), texts.to(self.device, non_blocking=True)
        image_features = self.model.encode_image(images, normalize=True)
        text_features = self.model.encode_text(texts, normalize=True)
        loss = self.loss_fn(image_features, text_features, self.model.logit_scale.exp())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():  # open_clip clamps the learned temperature at 100
            self.model.logit_scale.clamp_(0, math.log(100))
        self.epoch_losses.append(loss.item())
        self.put_scalar("logit_scale", self.model.logit_scale.exp().item(), mean=False)
        return {"contrastive": loss.item()}

    # -- data --------------------------------------------------------------------------------------------
    def next_batch(self):
        while True:
            if self._batches is None:
                if self.epoch >= self.cfg.epochs:
                    raise DataExhausted
                self._batches = self.open_epoch()
            try:
                batch = next(self._batches)
            except StopIteration:  # the stream ran dry early (loader workers drop their partial batches)
                self.end_epoch()
                continue
            self.epoch_batches += 1
            return batch

    def open_epoch(self):
        """This epoch's batch stream; when resuming mid-epoch, advanced past the batches already trained
        on. Those are decoded and cropped again: the crops draw on the RNG (of the loader workers, whose
        seeds come from the epoch's start), so skipping them undecoded would change every later crop."""
        resuming = self.epoch_batches > 0
        now = rng_state()
        if resuming:
            set_rng_state(self._epoch_rng)
        else:
            self._epoch_rng = now
        batches = iter(image_text_batches(self.train_tars, self.train_tf, self.tokenizer,
                                          batch_size=self.cfg.batch_size,
                                          shuffle_buffer=max(self.cfg.batch_size * 4, 256), seed=self.seed,
                                          epoch=self.epoch, num_workers=self.cfg.num_workers, drop_last=True))
        if resuming:
            for _ in range(self.epoch_batches):
                next(batches)
            set_rng_state(now)
        return batches

    def _after_step(self) -> None:
        if self.epoch_batches >= self.steps_per_epoch:
            next(self._batches, None)  # as a `for` over the stream: it ends (its partial batch read, dropped)
            self.end_epoch()

    def end_epoch(self) -> None:
        """Held-out retrieval and the epoch's record; the next step opens the next epoch."""
        self._batches = None
        metrics = (retrieval_recall(self.model, self.tokenizer, self.heldout, self.eval_tf, device=self.device,
                                    groups=self.heldout_groups) if self.heldout else {})
        losses = self.epoch_losses
        record = {"epoch": self.epoch + 1, "step": self.step,
                  "loss": round(sum(losses) / max(1, len(losses)), 5), **metrics}
        self.epoch_records.append(record)
        for k in ("r1", "r5", "r1_same_group"):
            if k in metrics:
                self.put_scalar(f"heldout_{k}", metrics[k], mean=False)
        log.info("train-teacher epoch %d: %s", self.epoch + 1, record)
        self.epoch, self.epoch_batches, self.epoch_losses = self.epoch + 1, 0, []

    def data_state(self) -> dict:
        return {"epoch": self.epoch, "batches": self.epoch_batches, "losses": list(self.epoch_losses),
                "epoch_rng": self._epoch_rng if self.epoch_batches else {}}

    def load_data_state(self, state: dict) -> None:
        self.epoch, self.epoch_batches = int(state["epoch"]), int(state["batches"])
        self.epoch_losses = list(state["losses"])
        self._epoch_rng = state["epoch_rng"] or None
        self._batches = None


def train_clip(model, tokenizer, train_tars: Sequence[Path], heldout: Sequence[dict], cfg, *,
               steps_per_epoch: int, seed: int = 0, heldout_groups: Optional[Sequence] = None,
               files: Optional[TrainFiles] = None, checkpoint_every: int = 500, fingerprint: str = "",
               progress: bool = True) -> TeacherHistory:
    """Train `model` (open_clip CLIP) in place with ClipLoss on (image, caption) batches of `train_tars`;
    resumes from `files.state` when it holds this run's state (same `fingerprint`).

    `cfg`: the manifest's TrainTeacherConfig (epochs, batch_size, lr, weight_decay, warmup_steps,
    min_crop_scale, device, num_workers). `heldout`: decoded samples for retrieval after each epoch;
    `heldout_groups`: their caption groups (retrieval_recall's `groups`). SIGTERM: the state is saved and
    TrainingInterrupted (exit 143) is raised."""
    trainer = ClipTrainer(model, tokenizer, train_tars, heldout, cfg, steps_per_epoch=steps_per_epoch, seed=seed,
                          heldout_groups=heldout_groups, files=files, checkpoint_every=checkpoint_every,
                          fingerprint=fingerprint, progress=progress)
    summary = trainer.train()
    TrainingInterrupted.raise_if(trainer, summary)
    model.eval()
    history = trainer.history
    return TeacherHistory(steps=[h["step"] for h in history], losses=[h["loss_contrastive"] for h in history],
                          lrs=[h["lr"] for h in history], epochs=list(trainer.epoch_records),
                          seconds=round(trainer.seconds, 2))
