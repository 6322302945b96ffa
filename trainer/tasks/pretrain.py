"""The lean streaming pretraining loop (REFERENCE §4-5), in detectron2's hooks style.

    trainer = PretrainTrainer(cfg, clip_model, concept_embeddings, sources=..., codec=..., paths=...)
    summary = trainer.train()            # resumes from paths.state when cfg.resume == "auto"

One step: `grad_accum` micro-batches; each one runs the student once over the whole batch (res4 of
every image, then RoIAlign -> res5 -> attention pool for the sampled regions *and* one whole-image
box per image), decodes the teacher's stored codes into concept logits on the device, and adds the
three losses (trainer/losses.py) with their weights. Then per-parameter gradient clipping, the
optimizer step and the hooks (logging, checkpoints). The schedule is a pure function of the step.

With `online_teacher` the RPN and the teacher run inside the step (as the reference does): boxes from
the RPN on the (flipped) batch images, `regions_per_image` of them sampled, teacher logits from the
frozen teacher region encoder against the concept embeddings.

Distributed: under torchrun (WORLD_SIZE > 1) the process group starts here (nccl on CUDA, gloo on
CPU), the encoder is wrapped in DDP, the image-caption loss gathers image and caption embeddings of
every rank (with gradient); the region-concept loss stays per local batch as in the reference.
"""
from __future__ import annotations

import logging
import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import PretrainConfig
from trainer.engine.device import init_distributed, resolve_device
from trainer.engine.checkpoint import load_state, rng_state, save_state, set_rng_state
from trainer.models.clip import CLIP_MEAN, CLIP_STD, check_embedding_dim, save_clip_checkpoint
from trainer.data.pretrain_stream import DataOptions, DataPosition, ShardSource, make_loader
from trainer.losses import (concept_logits, distillation_loss, gather_with_grad, image_caption_loss,
                            keep_mask, region_concept_loss)
from trainer.models.region_encoder import RegionEncoder

log = logging.getLogger(__name__)

WARMUP_FACTOR = 0.001  # detectron2's linear warmup starts at lr * 0.001
LOSS_NAMES = ("region_concept", "distill", "image_caption")


# -- small helpers -------------------------------------------------------------------------------------





def lr_at(cfg: PretrainConfig, step: int) -> float:
    """Linear warmup from lr * 0.001 over warmup_steps, then x0.1 at every step in lr_steps."""
    factor = 0.1 ** sum(1 for s in cfg.lr_steps if step >= s)
    if step < cfg.warmup_steps:
        alpha = step / cfg.warmup_steps
        factor *= WARMUP_FACTOR * (1 - alpha) + alpha
    return cfg.lr * factor


def clip_per_parameter(params: Iterable[torch.Tensor], max_norm: float) -> None:
    """detectron2's "value"-less per-parameter clipping: clip_grad_norm_ on each parameter alone."""
    for p in params:
        if p.grad is not None:
            torch.nn.utils.clip_grad_norm_([p], max_norm)


def _all_reduce_mean(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The mean over ranks (on `device`: nccl reduces CUDA tensors only); returned on the CPU."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.to(device)
        dist.all_reduce(values)
        values = values.cpu() / dist.get_world_size()
    return values


# -- hooks -------------------------------------------------------------------------------------------------

class HookBase:
    def before_train(self, trainer: "PretrainTrainer") -> None: ...
    def after_step(self, trainer: "PretrainTrainer") -> None: ...
    def after_train(self, trainer: "PretrainTrainer") -> None: ...


class LoggerHook(HookBase):
    """Scalars (losses, lr, images/s, data wait) to TensorBoard and the history; tqdm on rank 0."""

    def __init__(self, every: int, tensorboard: Optional[Path], progress: bool = True):
        self.every, self.tensorboard, self.progress = every, tensorboard, progress
        self.writer = self.bar = None
        self._window: list[tuple[float, float, int]] = []

    def before_train(self, t):
        if t.rank != 0:
            return
        if self.tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.tensorboard), purge_step=t.step or None)
        if self.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=t.cfg.steps, initial=t.step, desc="pretrain", dynamic_ncols=True,
                            mininterval=1.0, file=sys.stderr)

    def after_step(self, t):
        self._window.append((t.last_step_seconds, t.last_data_seconds, t.global_batch))
        # Loss values of every rank, averaged (every rank takes part: a collective).
        if t.step % self.every and t.step != t.cfg.steps and not t.stopping:
            if self.bar is not None:
                self.bar.update(1)
            return
        losses = _all_reduce_mean(torch.tensor([t.last_losses[k] for k in (*LOSS_NAMES, "total")],
                                               dtype=torch.float64), t.device)
        seconds = sum(w[0] for w in self._window)
        images = sum(w[2] for w in self._window)
        record = {"step": t.step, **{f"loss_{k}": float(v) for k, v in zip((*LOSS_NAMES, "total"), losses)},
                  "lr": t.last_lr, "images_per_s": images / max(seconds, 1e-9),
                  "data_wait_s": sum(w[1] for w in self._window) / len(self._window)}
        self._window = []
        t.history.append(record)
        if t.rank != 0:
            return
        if self.writer is not None:
            for k, v in record.items():
                if k != "step":
                    self.writer.add_scalar(f"pretrain/{k}", v, t.step)
            for reason, n in t.position.skipped_total().items():
                self.writer.add_scalar(f"pretrain/skipped_{reason}", n, t.step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss_total']:.3f}", lr=f"{record['lr']:.2e}",
                                 ips=f"{record['images_per_s']:.1f}", refresh=False)

    def after_train(self, t):
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


class CheckpointHook(HookBase):
    """The trainer state every `every` steps, when stopping (SIGTERM) and at the end; the curve PNG."""

    def __init__(self, every: int):
        self.every = every

    def after_step(self, t):
        if t.step % self.every == 0 or t.stopping or t.step >= t.cfg.steps:
            t.save_checkpoint()


# -- the trainer ---------------------------------------------------------------------------------------------

@dataclass
class PretrainPaths:
    state: Path                          # the trainer state (RunLayout.pretrain_state)
    student: Optional[Path] = None       # the exported open_clip checkpoint (RunLayout.student_checkpoint)
    tensorboard: Optional[Path] = None
    curve: Optional[Path] = None         # training-curve PNG


@dataclass
class OnlineTeacher:
    """The reference's in-step targets: an RPN (`.propose`) and the frozen teacher CLIP."""
    rpn: object
    teacher: nn.Module
    pre_nms_top_n: int = 1000
    post_nms_top_n: int = 300
    nms_thresh: float = 0.5


class PretrainTrainer:
    def __init__(self, cfg: PretrainConfig, clip_model: nn.Module, concept_embeddings,
                 paths: PretrainPaths, *, sources: Sequence[ShardSource] = (), codec=None,
                 online: Optional[OnlineTeacher] = None, arch: Optional[str] = None,
                 progress: bool = True, fingerprint: str = ""):
        self.cfg, self.paths, self.sources = cfg, paths, list(sources)
        self.device = resolve_device(cfg.device)
        self.rank, self.world = init_distributed(self.device)
        self.arch = arch or getattr(clip_model, "regionclip_arch", None)
        self.fingerprint = fingerprint
        if cfg.batch_size % (self.world * cfg.grad_accum):
            raise ValueError(f"pretrain.batch_size={cfg.batch_size} must be a multiple of ranks x grad_accum "
                             f"= {self.world} x {cfg.grad_accum}")
        self.local_batch = cfg.batch_size // (self.world * cfg.grad_accum)
        self.global_batch = cfg.batch_size
        if cfg.online_teacher and online is None:
            raise ValueError("pretrain.online_teacher needs the RPN and the teacher (OnlineTeacher)")
        if not cfg.online_teacher and codec is None:
            raise ValueError("precomputed targets need the label stage's codec (trainer.offline.codecs.load_codec)")
        self.codec, self.online = codec, online if cfg.online_teacher else None

        torch.manual_seed(cfg.seed + self.rank)
        np.random.seed((cfg.seed + self.rank) % 2 ** 32)
        import random

        random.seed(cfg.seed + self.rank)

        self.clip_model = clip_model
        self.encoder = RegionEncoder.from_clip(clip_model, freeze_stem_res2=True, freeze_bn=True).to(self.device)
        self.encoder.train()
        self.concepts = torch.as_tensor(np.asarray(concept_embeddings), dtype=torch.float32, device=self.device)
        check_embedding_dim(self.encoder.output_dim, self.concepts.shape[1], "concept embeddings", self.arch or "")
        if codec is not None and getattr(codec, "kind", "") != "topk" and getattr(codec, "dim", 0):
            check_embedding_dim(self.concepts.shape[1], codec.dim, "the label stage's teacher codes",
                                "that made the concept embeddings")
        if self.online is not None:
            self.teacher = RegionEncoder.from_clip(self.online.teacher, freeze_bn=True).to(self.device).eval()
            self.teacher.requires_grad_(False)
        self.params = [p for p in self.encoder.parameters() if p.requires_grad]
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.params, lr=cfg.lr, momentum=cfg.momentum,
                                             weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.amp = bool(cfg.amp and self.device.type == "cuda")
        # bf16 autocast needs no loss scaling; the scaler is kept (disabled) so the state format is fixed.
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)
        self.model: nn.Module = self.encoder
        if self.world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.encoder, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False)
        mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)
        self._norm = (mean * 255.0, std * 255.0)

        self.step = 0
        self.position = DataPosition()
        self.history: list[dict] = []
        self.stopping = False
        self._signalled = False
        self.last_losses: dict = {}
        self.last_lr = 0.0
        self.last_step_seconds = self.last_data_seconds = 0.0
        self.hooks: list[HookBase] = [LoggerHook(cfg.log_every, paths.tensorboard, progress),
                                      CheckpointHook(cfg.checkpoint_every)]

    # -- state ---------------------------------------------------------------------------------------------
    def state_dict_parts(self) -> dict:
        return {"step": self.step, "model": {k: v.detach().cpu() for k, v in self.encoder.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "history": list(self.history)}

    def save_checkpoint(self) -> None:
        mine = {"rng": rng_state(), "data": self.position.state_dict()}
        if self.world > 1:
            everyone: list = [None] * self.world
            dist.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        if self.rank == 0:
            state = {**self.state_dict_parts(), "rng": [e["rng"] for e in everyone],
                     "data": [e["data"] for e in everyone],
                     "meta": {"world_size": self.world, "num_workers": self.cfg.num_workers,
                              "local_batch": self.local_batch, "arch": self.arch or "",
                              "fingerprint": self.fingerprint, "online_teacher": self.cfg.online_teacher},
                     "config": self.cfg.model_dump(mode="json")}
            save_state(self.paths.state, state)
            if self.paths.curve is not None and self.history:
                plot_curve(self.history, self.paths.curve)
        if self.world > 1:
            dist.barrier()

    def resume(self, path: Optional[Path] = None) -> bool:
        """Load a saved trainer state. Without `path` (resume: auto) only this run's own state counts: one
        saved under another fingerprint (other settings or inputs) is left alone and training starts anew,
        so a changed manifest never continues a stale run. An explicit `path` is loaded whatever made it."""
        state = load_state(path or self.paths.state)
        if state is None:
            return False
        saved = state.get("meta", {}).get("fingerprint", "")
        if path is None and saved and self.fingerprint and saved != self.fingerprint:
            log.warning("not resuming %s: it was saved under fingerprint %s, this run is %s (settings or inputs "
                        "changed); starting from step 0. To continue it anyway, set pretrain.resume to its path",
                        self.paths.state, saved, self.fingerprint)
            return False
        self.encoder.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        meta = state.get("meta", {})
        same_layout = (meta.get("world_size") == self.world and meta.get("num_workers") == self.cfg.num_workers
                       and meta.get("local_batch") == self.local_batch)
        if same_layout:
            set_rng_state(state["rng"][self.rank])
            self.position = DataPosition.from_state(state["data"][self.rank])
        else:
            # Another rank/worker layout: the per-slot positions do not transfer; restart the data
            # at the epoch after the furthest one any slot reached (no sample seen twice in that epoch).
            epochs = [w[0] for d in state["data"] for w in d.get("workers", {}).values()]
            nxt = max(epochs, default=-1) + 1
            log.warning("resuming with %d rank(s) x %d worker(s) x batch %d (saved: %s x %s x %s): the "
                        "data restarts at epoch %d, not at the exact sample", self.world, self.cfg.num_workers,
                        self.local_batch, meta.get("world_size"), meta.get("num_workers"),
                        meta.get("local_batch"), nxt)
            self.position = DataPosition(0, {str(w): (nxt, 0, 0) for w in range(max(1, self.cfg.num_workers))})
        if self.rank == 0:
            log.info("resumed from %s at step %d", path or self.paths.state, self.step)
        return True

    # -- data ------------------------------------------------------------------------------------------------
    def data_options(self) -> DataOptions:
        c = self.cfg
        return DataOptions(batch_size=self.local_batch, seed=c.seed, min_size=c.min_size, max_size=c.max_size,
                           regions_per_image=c.regions_per_image, flip=c.flip, online=c.online_teacher,
                           resample_shards=c.resample_shards)

    def loader(self) -> Iterator[dict]:
        return make_loader(self.sources, self.data_options(), self.rank, self.world, self.cfg.num_workers,
                           self.position, pin_memory=self.device.type == "cuda")

    # -- the step --------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def prepare_images(self, batch: dict) -> torch.Tensor:
        """uint8 padded batch -> CLIP-normalised float, padding zero (detectron2 pads after normalising)."""
        images = batch["images"].to(self.device, non_blocking=True)
        x = (images.float() - self._norm[0]) / self._norm[1]
        sizes = batch["image_sizes"]
        if any(int(h) != x.shape[2] or int(w) != x.shape[3] for h, w in sizes.tolist()):
            h_idx = torch.arange(x.shape[2], device=self.device)
            w_idx = torch.arange(x.shape[3], device=self.device)
            sz = sizes.to(self.device)
            inside = (h_idx[None, :, None] < sz[:, 0, None, None]) & (w_idx[None, None, :] < sz[:, 1, None, None])
            x = x * inside[:, None].to(x.dtype)
        return x

    @torch.no_grad()
    def online_targets(self, x: torch.Tensor, batch: dict):
        """(boxes per image, teacher logits, pseudo labels, teacher max probs) from the RPN and the teacher."""
        o = self.online
        images01 = []
        for i, (h, w) in enumerate(batch["image_sizes"].tolist()):
            images01.append(batch["images"][i, :, :h, :w].to(self.device).float() / 255.0)
        with self._autocast():
            proposals = o.rpn.propose(images01, min_size=self.cfg.min_size, max_size=self.cfg.max_size,
                                      pre_nms_top_n=o.pre_nms_top_n, post_nms_top_n=o.post_nms_top_n,
                                      nms_thresh=o.nms_thresh)
        gen = torch.Generator().manual_seed(int(self.cfg.seed * 1_000_003 + self.step * 101 + self.rank))
        boxes = []
        for b, _ in proposals:
            b = torch.as_tensor(b, dtype=torch.float32)[:o.post_nms_top_n].reshape(-1, 4)
            pick = torch.randperm(len(b), generator=gen)[:self.cfg.regions_per_image]
            boxes.append(b[pick].to(self.device))
        with self._autocast():
            t_emb = self.teacher(x, boxes)
        t_logits = concept_logits(t_emb, self.concepts, self.cfg.temperature)
        prob, label = t_logits.softmax(-1).max(-1)
        return boxes, t_logits, label, prob

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        x = self.prepare_images(batch)
        b, _, hp, wp = x.shape
        if self.online is not None:
            boxes, t_logits, labels, probs = self.online_targets(x, batch)
        else:
            valid = batch["valid"]
            boxes = [batch["boxes"][i][valid[i]].to(self.device, non_blocking=True) for i in range(b)]
            codes = batch["codes"][valid].to(self.device, non_blocking=True)
            t_logits = self.codec.decode_logits(codes, self.concepts, cfg.temperature).float()
            labels = batch["pseudo_labels"][valid].to(self.device, non_blocking=True)
            probs = batch["pseudo_probs"][valid].to(self.device, non_blocking=True)
        counts = [len(bx) for bx in boxes]
        # One pass through res5 for the regions and the whole-image boxes (the padded image, §4).
        whole = torch.tensor([[0.0, 0.0, float(wp), float(hp)]], device=self.device)
        rois = torch.cat([torch.cat([torch.full((n, 1), float(i), device=self.device), bx.float()], 1)
                          for i, (n, bx) in enumerate(zip(counts, boxes))]
                         + [torch.cat([torch.arange(b, device=self.device, dtype=torch.float32)[:, None],
                                       whole.expand(b, 4)], 1)])
        with self._autocast():
            emb = self.model(x, rois)
        regions, images = emb[:-b], emb[-b:]
        s_logits = concept_logits(regions, self.concepts, cfg.temperature)
        keep = keep_mask(probs, cfg.keep_threshold)
        captions = batch["captions"].to(self.device, non_blocking=True).float()
        if captions.shape[1] != self.encoder.output_dim:
            check_embedding_dim(self.encoder.output_dim, captions.shape[1], "caption embeddings", self.arch or "")
        return {"region_concept": region_concept_loss(s_logits, labels, keep),
                "distill": distillation_loss(s_logits, t_logits),
                "image_caption": image_caption_loss(gather_with_grad(images), gather_with_grad(captions),
                                                    cfg.temperature)}

    def run_step(self, data: Iterator[dict]) -> None:
        cfg = self.cfg
        started = time.perf_counter()
        data_seconds = 0.0
        self.last_lr = lr_at(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.last_lr
        weights = {"region_concept": cfg.loss_region_concept, "distill": cfg.loss_distill,
                   "image_caption": cfg.loss_image_caption}
        sums = dict.fromkeys((*LOSS_NAMES, "total"), 0.0)
        for micro in range(cfg.grad_accum):
            t0 = time.perf_counter()
            batch = next(data)
            data_seconds += time.perf_counter() - t0
            if "_worker" in batch:
                self.position.update(batch)
            sync = micro == cfg.grad_accum - 1 or self.world == 1
            with (nullcontext() if sync else self.model.no_sync()):
                losses = self.compute_losses(batch)
                total = sum(weights[k] * v for k, v in losses.items())
                (total / cfg.grad_accum).backward()
            for k, v in losses.items():
                sums[k] += float(v.detach()) / cfg.grad_accum
            sums["total"] += float(total.detach()) / cfg.grad_accum
        if not all(math.isfinite(v) for v in sums.values()):
            raise FloatingPointError(f"step {self.step}: non-finite loss {sums}")
        if cfg.grad_clip:
            clip_per_parameter(self.params, cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.last_losses = sums
        self.last_data_seconds = data_seconds
        self.last_step_seconds = time.perf_counter() - started

    # -- the loop ----------------------------------------------------------------------------------------------
    def _on_sigterm(self, signum, frame):  # noqa: ARG002
        self._signalled = True

    def _agree_to_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._signalled else 0.0])
        if self.world > 1:
            flag = flag.to(self.device)
            dist.all_reduce(flag)
        return bool(flag.item() > 0)

    def train(self, batches: Optional[Iterable[dict]] = None, stop_after: Optional[int] = None) -> dict:
        """Run until cfg.steps (or `stop_after` more steps, then stop as on SIGTERM: state saved).

        `batches`: an iterable of collated batches to use instead of the streaming loader (benchmarks,
        tests). Returns a summary (steps, seconds, images/s, last losses, skipped samples).
        """
        cfg = self.cfg
        if cfg.resume == "auto":
            self.resume()
        elif cfg.resume != "never":
            if not self.resume(Path(cfg.resume)):
                raise FileNotFoundError(f"pretrain.resume: no trainer state at {cfg.resume}")
        previous = None
        if threading_main():
            previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        data = iter(batches) if batches is not None else self.loader()
        first_step, started = self.step, time.perf_counter()
        status = "done"
        for h in self.hooks:
            h.before_train(self)
        try:
            while self.step < cfg.steps:
                self.run_step(data)
                self.stopping = self._agree_to_stop() or (stop_after is not None
                                                          and self.step - first_step >= stop_after)
                for h in self.hooks:
                    h.after_step(self)
                if self.stopping:
                    status = "interrupted"
                    break
        finally:
            for h in self.hooks:
                h.after_train(self)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            del data
        if status == "done" and self.rank == 0 and self.paths.student is not None:
            self.export_student(self.paths.student)
        if self.world > 1:
            dist.barrier()
        seconds = time.perf_counter() - started
        steps = self.step - first_step
        return {"status": status, "step": self.step, "steps_run": steps, "seconds": seconds,
                "images_per_s": steps * self.global_batch / max(seconds, 1e-9),
                "losses": dict(self.last_losses), "skipped": self.position.skipped_total(),
                "history": self.history}

    def export_student(self, path: Path) -> Path:
        """The student as an open_clip checkpoint (load_clip(arch, path)); text tower unchanged."""
        return save_clip_checkpoint(self.clip_model, path, arch=self.arch, pretrain_step=self.step,
                                    pretrain_fingerprint=self.fingerprint)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def plot_curve(history: list[dict], path: Path) -> None:
    """Losses and lr against the step (matplotlib Agg), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.io import atomic_path

    steps = [h["step"] for h in history]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for k in (*LOSS_NAMES, "total"):
        ax.plot(steps, [h[f"loss_{k}"] for h in history], label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("pretrain losses")
    ax2.plot(steps, [h["lr"] for h in history], color="k")
    ax2.set_xlabel("step")
    ax2.set_ylabel("lr")
    ax2.set_title(f"lr; last images/s {history[-1]['images_per_s']:.1f}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
