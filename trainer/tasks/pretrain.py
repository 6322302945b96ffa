"""The lean streaming pretraining task (docs/method.md §4-5) on the training engine (trainer/engine/loop.py).

    trainer = PretrainTrainer(cfg, clip_model, concept_embeddings, sources=..., codec=..., paths=...)
    summary = trainer.train()            # resumes from paths.state when cfg.resume == "auto"

One step: `grad_accum` micro-batches; each one runs the student once over the whole batch (res4 of
every image, then RoIAlign -> res5 -> attention pool for the sampled regions *and* one whole-image
box per image), decodes the teacher's stored codes into concept logits on the device, and adds the
three losses (trainer/losses.py) with their weights. Then per-parameter gradient clipping and the
optimizer step. The engine's hooks do the rest: the lr schedule (WarmupMultiStep), logging and
TensorBoard, checkpoints (with every rank's exact data position, trainer/data/pretrain_stream.py's
DataPosition), SIGTERM, the NaN guard and the curve.

With `online_teacher` the RPN and the teacher run inside the step (as the reference does): boxes from
the RPN on the (flipped) batch images, `regions_per_image` of them sampled, teacher logits from the
frozen teacher region encoder against the concept embeddings.

Distributed: under torchrun (WORLD_SIZE > 1) the process group starts here (nccl on CUDA, gloo on
CPU), the encoder is wrapped in DDP, the image-caption loss gathers image and caption embeddings of
every rank (with gradient); the region-concept loss stays per local batch as in the reference.
"""
from __future__ import annotations

import logging
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
from trainer.data.pretrain_stream import DataOptions, DataPosition, ShardSource, make_loader
from trainer.engine.checkpoint import seed_all
from trainer.engine.device import end_distributed, init_distributed, resolve_device
from trainer.engine.hooks import standard_hooks
from trainer.engine.loop import HookBase, TrainLoop
from trainer.engine.schedules import WarmupMultiStep
from trainer.losses import (concept_logits, distillation_loss, gather_with_grad, image_caption_loss,
                            keep_mask, region_concept_loss)
from trainer.models.clip import check_embedding_dim, save_clip_checkpoint
from trainer.models.constants import CLIP_MEAN, CLIP_STD
from trainer.models.region_encoder import RegionEncoder
from trainer.offline.streaming import autocast, autocast_dtype

__all__ = ["HookBase", "OnlineTeacher", "PretrainPaths", "PretrainTrainer"]  # HookBase: bench/trainer.py's hooks

log = logging.getLogger(__name__)

LOSS_NAMES = ("region_concept", "distill", "image_caption")


def clip_per_parameter(params: Iterable[torch.Tensor], max_norm: float) -> None:
    """detectron2's "value"-less per-parameter clipping: clip_grad_norm_ on each parameter alone."""
    for p in params:
        if p.grad is not None:
            torch.nn.utils.clip_grad_norm_([p], max_norm)


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


class PretrainTrainer(TrainLoop):
    def __init__(self, cfg: PretrainConfig, clip_model: nn.Module, concept_embeddings,
                 paths: PretrainPaths, *, sources: Sequence[ShardSource] = (), codec=None,
                 online: Optional[OnlineTeacher] = None, arch: Optional[str] = None,
                 progress: bool = True, fingerprint: str = ""):
        self.cfg, self.paths, self.sources = cfg, paths, list(sources)
        self.device = resolve_device(cfg.device)
        self.rank, self.world = init_distributed(self.device)
        self.arch = arch or getattr(clip_model, "regionclip_arch", None)
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

        seed_all(cfg.seed + self.rank)

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
            optimizer = torch.optim.SGD(self.params, lr=cfg.lr, momentum=cfg.momentum,
                                        weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.autocast_dtype = autocast_dtype(cfg.precision, self.device)   # None: fp32
        # bf16 autocast needs no loss scaling; the scaler is kept (disabled) so the state format is fixed.
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        model: nn.Module = self.encoder
        if self.world > 1:
            model = nn.parallel.DistributedDataParallel(
                self.encoder, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False)
        mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)
        self._norm = (mean * 255.0, std * 255.0)

        super().__init__("pretrain", model=model, optimizer=optimizer, max_steps=cfg.steps,
                         schedule=WarmupMultiStep(cfg.warmup_steps, tuple(cfg.lr_steps)), device=self.device,
                         scaler=scaler, state_path=paths.state, fingerprint=fingerprint,
                         settings=cfg.model_dump(mode="json"), resume=cfg.resume,
                         images_per_step=cfg.batch_size, rank=self.rank, world=self.world)
        self.position = DataPosition()
        self._batches: Optional[Iterator[dict]] = None   # given to train(), else the streaming loader
        self._data: Optional[Iterator[dict]] = None
        self.register_hooks(standard_hooks(log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                                           tensorboard=paths.tensorboard, curve=paths.curve, progress=progress))

    # -- state: the engine's, plus the data layout (an exact data position needs the same one) ----------
    def checkpoint_meta(self) -> dict:
        return {"num_workers": self.cfg.num_workers, "local_batch": self.local_batch, "arch": self.arch or "",
                "online_teacher": self.cfg.online_teacher}

    def data_state(self) -> dict:
        return self.position.state_dict()

    def load_data_state(self, state: dict) -> None:
        self.position = DataPosition.from_state(state)

    def load_rank_states(self, state: dict) -> None:
        meta = state.get("meta", {})
        if (meta.get("world_size") == self.world and meta.get("num_workers") == self.cfg.num_workers
                and meta.get("local_batch") == self.local_batch):
            return super().load_rank_states(state)
        # Another rank/worker layout: the per-slot positions do not transfer; restart the data at the
        # epoch after the furthest one any slot reached (no sample seen twice in that epoch).
        epochs = [w[0] for d in state["data"] for w in d.get("workers", {}).values()]
        nxt = max(epochs, default=-1) + 1
        log.warning("resuming with %d rank(s) x %d worker(s) x batch %d (saved: %s x %s x %s): the data "
                    "restarts at epoch %d, not at the exact sample", self.world, self.cfg.num_workers,
                    self.local_batch, meta.get("world_size"), meta.get("num_workers"), meta.get("local_batch"), nxt)
        self.position = DataPosition(0, {str(w): (nxt, 0, 0) for w in range(max(1, self.cfg.num_workers))})

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
        return autocast(self.device, self.autocast_dtype)

    def prepare_images(self, pixels: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """uint8 padded batch on the device -> CLIP-normalised float, padding zero (detectron2 pads after
        normalising); `sizes`: each image's (height, width), on the host."""
        x = (pixels.float() - self._norm[0]) / self._norm[1]
        if any(int(h) != x.shape[2] or int(w) != x.shape[3] for h, w in sizes.tolist()):
            h_idx = torch.arange(x.shape[2], device=self.device)
            w_idx = torch.arange(x.shape[3], device=self.device)
            sz = sizes.to(self.device, non_blocking=True)
            inside = (h_idx[None, :, None] < sz[:, 0, None, None]) & (w_idx[None, None, :] < sz[:, 1, None, None])
            x = x * inside[:, None].to(x.dtype)
        return x

    @torch.no_grad()
    def online_targets(self, x: torch.Tensor, pixels: torch.Tensor, sizes: torch.Tensor):
        """(boxes per image, teacher logits, pseudo labels, teacher max probs) from the RPN and the teacher;
        `pixels`: the uint8 padded batch on the device, `sizes` each image's (height, width)."""
        o = self.online
        images01 = []
        for i, (h, w) in enumerate(sizes.tolist()):
            images01.append(pixels[i, :, :h, :w].float() / 255.0)
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
        # Every host tensor goes to the device whole, as the loader pinned it (an asynchronous copy), and is
        # sliced there: a slice or mask taken on the host would be a pageable copy, copied synchronously.
        pixels = batch["images"].to(self.device, non_blocking=True)
        x = self.prepare_images(pixels, batch["image_sizes"])
        b, _, hp, wp = x.shape
        if self.online is not None:
            boxes, t_logits, labels, probs = self.online_targets(x, pixels, batch["image_sizes"])
        else:
            # An image's regions are the first `count` of its row (the rest is padding; see collate).
            counts = batch["valid"].sum(1).tolist()

            def regions(name: str) -> torch.Tensor:
                padded = batch[name].to(self.device, non_blocking=True)
                return torch.cat([padded[i, :n] for i, n in enumerate(counts)])

            all_boxes = batch["boxes"].to(self.device, non_blocking=True)
            boxes = [all_boxes[i, :n] for i, n in enumerate(counts)]
            t_logits = self.codec.decode_logits(regions("codes"), self.concepts, cfg.temperature).float()
            labels, probs = regions("pseudo_labels"), regions("pseudo_probs")
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
                "distill": distillation_loss(s_logits, t_logits, keep),
                "image_caption": image_caption_loss(gather_with_grad(images), gather_with_grad(captions),
                                                    cfg.temperature)}

    def run_step(self) -> dict[str, float]:
        cfg = self.cfg
        data_seconds = 0.0
        weights = {"region_concept": cfg.loss_region_concept, "distill": cfg.loss_distill,
                   "image_caption": cfg.loss_image_caption}
        sums = dict.fromkeys((*LOSS_NAMES, "total"), 0.0)
        for micro in range(cfg.grad_accum):
            t0 = time.perf_counter()
            batch = self.next_batch()
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
        if cfg.grad_clip:
            clip_per_parameter(self.params, cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.put_scalar("data_wait_s", data_seconds)
        for reason, n in self.position.skipped_total().items():
            self.put_scalar(f"skipped_{reason}", n, mean=False)
        return sums

    def next_batch(self) -> dict:
        if self._data is None:  # after the resume: the loader starts at the restored position
            self._data = self._batches if self._batches is not None else self.loader()
        return next(self._data)

    # -- the loop ----------------------------------------------------------------------------------------------
    def train(self, batches: Optional[Iterable[dict]] = None, stop_after: Optional[int] = None) -> dict:
        """Run until cfg.steps (or `stop_after` more steps, then stop as on SIGTERM: state saved).

        `batches`: an iterable of collated batches to use instead of the streaming loader (benchmarks,
        tests). Returns a summary (status, steps, seconds, images/s, last losses, skipped samples, history).
        """
        self._batches = iter(batches) if batches is not None else None
        try:
            summary = super().train(stop_after=stop_after)
        finally:
            self._data = self._batches = None  # the loader's workers end with it
        if summary["status"] == "done" and self.rank == 0 and self.paths.student is not None:
            self.export_student(self.paths.student)
        if self.world > 1:
            dist.barrier()
            end_distributed()   # the group was this trainer's (init_distributed): it trains once per process
        images_per_s = summary["steps_run"] * self.global_batch / max(summary["seconds"], 1e-9)
        return {**summary, "images_per_s": images_per_s, "skipped": self.position.skipped_total()}

    def export_student(self, path: Path) -> Path:
        """The student as an open_clip checkpoint (load_clip(arch, path)); text tower unchanged."""
        return save_clip_checkpoint(self.clip_model, path, arch=self.arch, pretrain_step=self.step,
                                    pretrain_fingerprint=self.fingerprint)
