"""The shared hooks of the training loop (detectron2's hooks.py), in the order `standard_hooks` gives:

    LRSchedule    sets every parameter group's lr = its base lr x schedule(step) before the step
    (task hooks)  e.g. an epoch's end: evaluation, records (before the state is saved)
    Metrics       a record every `every` steps (losses and `mean` scalars averaged over the window, lr,
                  images/s) into `loop.history` and TensorBoard (`<loop.name>/<key>`)
    Progress      a tqdm bar with rate and ETA (rank 0)
    Checkpointer  the full state every `every` steps, at the last step and when stopping
    Curve         the training-curve PNG at the end (losses, lr, per-epoch metrics)
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from trainer.engine.loop import HookBase, TrainLoop

log = logging.getLogger(__name__)


class LRSchedule(HookBase):
    """lr = base lr x loop.schedule(step); the base lr is each group's `initial_lr` (torch's own key,
    set from the group's lr before the first step and saved with the optimizer)."""

    def before_train(self, loop: TrainLoop) -> None:
        for group in loop.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

    def before_step(self, loop: TrainLoop) -> None:
        factor = loop.schedule(loop.step)
        for group in loop.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor


class Callback(HookBase):
    """A task's own work after every step (e.g. an epoch's end), as a hook (detectron2's CallbackHook)."""

    def __init__(self, after_step):
        self._after_step = after_step

    def after_step(self, loop: TrainLoop) -> None:
        self._after_step()


class Metrics(HookBase):
    """Every `every` steps (and at the last step, and when stopping) one record into `loop.history`:
    {step, loss_<name> (mean over the window and, under DDP, over the ranks), lr, other scalars, images/s}.
    Rank 0 writes the record to TensorBoard under `<loop.name>/`. The open window is part of the state,
    so a resumed run logs the same records as an uninterrupted one."""

    def __init__(self, every: int = 1, tensorboard: Optional[Path] = None):
        self.every, self.tensorboard = max(1, int(every)), tensorboard
        self.window: list[dict] = []
        self.latest_only: set[str] = set()
        self.writer = None

    def before_train(self, loop: TrainLoop) -> None:
        if loop.rank == 0 and self.tensorboard is not None:
            # a resumed run drops what the killed one logged after its state was saved
            self.writer = _summary_writer(self.tensorboard, purge_step=loop.step + 1 if loop.step else None)

    def after_step(self, loop: TrainLoop) -> None:
        self.window.append({**{f"loss_{k}": v for k, v in loop.last_losses.items()},
                            "lr": loop.optimizer.param_groups[0]["lr"], **loop.scalars,
                            "step_s": loop.last_step_seconds})
        self.latest_only |= loop.latest_only
        if loop.step % self.every and loop.step < loop.max_steps and not loop.stopping:
            return
        record = self.summarise(loop)
        self.window = []
        loop.history.append(record)
        if self.writer is not None:
            for k, v in record.items():
                if k != "step":
                    self.writer.add_scalar(f"{loop.name}/{k}", v, loop.step)

    def summarise(self, loop: TrainLoop) -> dict:
        keys = list(dict.fromkeys(k for entry in self.window for k in entry if k != "step_s"))
        record: dict = {"step": loop.step}
        for k in keys:
            values = [entry[k] for entry in self.window if k in entry]
            mean = k.startswith("loss_") or (k != "lr" and k not in self.latest_only)
            record[k] = sum(values) / len(values) if mean else values[-1]
        losses = [k for k in keys if k.startswith("loss_")]
        if losses and loop.world > 1 and dist.is_initialized():  # the mean over ranks (a collective)
            values = torch.tensor([record[k] for k in losses], dtype=torch.float64).to(loop.device)
            dist.all_reduce(values)
            record.update(zip(losses, (values.cpu() / loop.world).tolist()))
        seconds = sum(entry["step_s"] for entry in self.window)
        if loop.images_per_step:
            record["images_per_s"] = loop.images_per_step * len(self.window) / max(seconds, 1e-9)
        return record

    def after_train(self, loop: TrainLoop) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None

    def state_dict(self) -> dict:
        return {"window": list(self.window), "latest_only": sorted(self.latest_only)} if self.window else {}

    def load_state_dict(self, state: dict) -> None:
        self.window = [dict(entry) for entry in state.get("window", [])]
        self.latest_only = set(state.get("latest_only", []))


class Progress(HookBase):
    """A tqdm bar on rank 0 (rate and ETA), with the latest record's total loss and lr."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.bar = enabled, None

    def before_train(self, loop: TrainLoop) -> None:
        if self.enabled and loop.rank == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=loop.max_steps, initial=loop.step, desc=loop.name, unit="step",
                            dynamic_ncols=True, mininterval=1.0, file=sys.stderr)

    def after_step(self, loop: TrainLoop) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        if loop.history and loop.history[-1]["step"] == loop.step:
            record = loop.history[-1]
            losses = [v for k, v in record.items() if k.startswith("loss_")]
            total = record.get("loss_total", sum(losses))
            self.bar.set_postfix(loss=f"{total:.4f}", lr=f"{record['lr']:.2e}", refresh=False)

    def after_train(self, loop: TrainLoop) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Checkpointer(HookBase):
    """The full state every `every` steps, at the last step and when stopping (SIGTERM)."""

    def __init__(self, every: int):
        self.every = max(1, int(every))

    def after_step(self, loop: TrainLoop) -> None:
        if loop.state_path is None:
            return
        if loop.step % self.every == 0 or loop.step >= loop.max_steps or loop.stopping:
            loop.save_checkpoint()


class Curve(HookBase):
    """The training-curve PNG when training ends (rank 0): losses and lr per logged step, and the
    `epoch_keys` of `loop.epoch_records` per epoch."""

    def __init__(self, path: Path, epoch_keys: Sequence[str] = ()):
        self.path, self.epoch_keys = Path(path), tuple(epoch_keys)

    def after_train(self, loop: TrainLoop) -> None:
        if loop.rank == 0 and loop.history:
            plot_training_curve(loop.history, self.path, loop.name, loop.epoch_records, self.epoch_keys)


def log_every_for(max_steps: int, records: int = 1000) -> int:
    """Log every step of a short run, and about `records` times in a long one (the history is saved in
    every state and drawn in the curve, so it stays small)."""
    return max(1, max_steps // records)


def standard_hooks(*, log_every: int = 1, checkpoint_every: int = 500, tensorboard: Optional[Path] = None,
                   curve: Optional[Path] = None, progress: bool = True, epoch_keys: Sequence[str] = (),
                   task_hooks: Sequence[HookBase] = ()) -> list[HookBase]:
    """The hooks every task registers, in their order (task hooks run before the metrics and the state)."""
    return [LRSchedule(), *task_hooks, Metrics(log_every, tensorboard), Progress(progress),
            Checkpointer(checkpoint_every), Curve(curve, epoch_keys) if curve is not None else None]


def _summary_writer(folder: Path, purge_step: Optional[int] = None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: the history (and the curve) still hold the scalars
        log.warning("tensorboard is not installed; no TensorBoard scalars written")
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return SummaryWriter(str(folder), purge_step=purge_step)


def plot_training_curve(history: list[dict], path: Path, title: str, epochs: Sequence[dict] = (),
                        epoch_keys: Sequence[str] = ()) -> Path:
    """Losses (log scale) and lr against the step and, when `epoch_keys` are given, those metrics of
    `epochs` per epoch (with `<key>_chance` as a dashed line where recorded); matplotlib Agg, atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.io import atomic_path

    keys = [k for k in epoch_keys if any(k in e for e in epochs)]
    fig, axes = plt.subplots(1, 3 if keys else 2, figsize=(15 if keys else 10, 3.8))
    steps = [h["step"] for h in history]
    losses = list(dict.fromkeys(k for h in history for k in h if k.startswith("loss_")))
    for k in losses:
        axes[0].plot(steps, [h.get(k, float("nan")) for h in history], lw=1, label=k[len("loss_"):])
    if all(h.get(k, 1.0) > 0 for h in history for k in losses):
        axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].set_title(f"{title}: losses")
    axes[0].legend()
    axes[1].plot(steps, [h["lr"] for h in history], color="k")
    axes[1].set_xlabel("step")
    axes[1].set_title("lr" + (f"; last {history[-1]['images_per_s']:.1f} images/s"
                              if "images_per_s" in history[-1] else ""))
    for k in keys:
        shown = [e for e in epochs if k in e]
        (line,) = axes[2].plot([e["epoch"] for e in shown], [e[k] for e in shown], marker="o", label=k)
        if f"{k}_chance" in shown[-1]:
            axes[2].axhline(shown[-1][f"{k}_chance"], ls="--", c=line.get_color(), lw=0.8)
    if keys:
        axes[2].set_xlabel("epoch")
        axes[2].set_title("per epoch (dashed: chance)")
        axes[2].legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return Path(path)
