"""The one training loop (detectron2's train_loop.py): a task overrides `run_step`, hooks do the rest.

    class MyTask(TrainLoop):
        def run_step(self) -> dict[str, float]:      # one optimizer step; returns its losses
            ...
    task = MyTask("my-task", model=model, optimizer=optimizer, max_steps=1000, schedule=WarmupMultiStep(100),
                  state_path=Path("last.pt"))
    task.register_hooks(standard_hooks(...))       # lr schedule, metrics + TensorBoard, progress, checkpoints, curve
    summary = task.train()                          # resumes from state_path first (resume="auto")

The loop owns the step count (`step` = steps finished; during `run_step` the index of the step
running), `max_steps`, the NaN/inf guard (a non-finite loss stops the run with an error naming the
step and the loss; the last saved state stays as it was), and SIGTERM: the signal only sets a flag,
the ranks agree on it after the step, the state is saved and `train` returns status "interrupted".
Under DDP an error on one rank (the NaN guard, a data error) ends that rank's process at once, after
printing the error, without running the hooks' after_train: the other ranks' collectives then fail
instead of waiting (trainer/engine/device.py, end_rank_after_error).

The state (`save_checkpoint`) restores the whole run, torchvision-references style: step, model,
optimizer, scaler, schedule, history, settings, and for every rank its RNG states (python, numpy, torch,
CUDA), data position (`data_state`) and hook states. A task whose data order is a pure function of
(seed, step) stores little more than the step in `data_state` and rebuilds the rest in
`load_data_state`.
"""
from __future__ import annotations

import logging
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from trainer.engine.checkpoint import load_state, rng_state, save_state, set_rng_state
from trainer.engine.device import end_rank_after_error
from trainer.engine.schedules import Schedule, schedule_from_state

log = logging.getLogger(__name__)


class HookBase:
    """Called by TrainLoop around the steps; `loop.step` is the number of finished steps. A hook with
    state to keep across a resume returns it from `state_dict` (saved per rank, by class name)."""

    def before_train(self, loop: "TrainLoop") -> None: ...
    def before_step(self, loop: "TrainLoop") -> None: ...
    def after_step(self, loop: "TrainLoop") -> None: ...
    def after_train(self, loop: "TrainLoop") -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainFiles:
    """Where a training run keeps its state and shows its progress (paths from pipeline/layout.py)."""
    state: Path                          # the full state: saved every `checkpoint_every` steps, resumed from
    tensorboard: Optional[Path] = None   # scalars, under <tensorboard>/
    curve: Optional[Path] = None         # the training-curve PNG, drawn when training ends


class DataExhausted(Exception):
    """Raised by `run_step` when the task's data ends before `max_steps`: training is done."""


class TrainingInterrupted(SystemExit):
    """SIGTERM stopped a training run at a step boundary after saving its state; exits like the signal
    (143) unless caught. Raised by the task functions (train_clip, train_rpn, train_detector)."""

    def __init__(self, loop: "TrainLoop"):
        super().__init__(143)
        self.step, self.state_path = loop.step, loop.state_path

    @classmethod
    def raise_if(cls, loop: "TrainLoop", summary: dict) -> None:
        if summary["status"] == "interrupted":
            log.warning("%s: stopped at step %d of %d; state saved in %s: run again to resume", loop.name,
                        loop.step, loop.max_steps, loop.state_path)
            raise cls(loop)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (its state_dict has no `module.` prefix)."""
    return getattr(model, "module", model)


class TrainLoop:
    """Owns step counting, the hooks, the NaN guard, SIGTERM, and the full training state."""

    def __init__(self, name: str, *, model: nn.Module, optimizer: torch.optim.Optimizer, max_steps: int,
                 schedule: Schedule, device: Optional[torch.device] = None, scaler=None,
                 state_path: Optional[Path] = None, fingerprint: str = "", settings: Optional[dict] = None,
                 resume: str = "auto", images_per_step: int = 0, rank: int = 0, world: int = 1):
        self.name, self.model, self.optimizer, self.scaler = name, model, optimizer, scaler
        self.max_steps, self.schedule = int(max_steps), schedule
        self.device = device or torch.device("cpu")
        self.state_path = Path(state_path) if state_path else None
        self.fingerprint, self.settings, self.resume_from = fingerprint, dict(settings or {}), resume
        self.images_per_step, self.rank, self.world = images_per_step, rank, world
        self.hooks: list[HookBase] = []
        self.step = 0
        self.history: list[dict] = []         # logged records (the Metrics hook), for the curve
        self.epoch_records: list[dict] = []   # per-epoch evaluations of tasks that have epochs
        self.seconds = 0.0                    # training time over every run of this training
        self.saved_step: Optional[int] = None
        self.last_losses: dict[str, float] = {}
        self.last_step_seconds = 0.0
        self.scalars: dict[str, float] = {}   # this step's other scalars (put_scalar)
        self.latest_only: set[str] = set()    # scalars logged as their latest value, not a window mean
        self.stopping = False
        self.status = "new"
        self._signalled = False

    # -- what a task provides ------------------------------------------------------------------------
    def run_step(self) -> dict[str, float]:
        """One optimizer step; returns its losses as floats (the NaN guard checks them)."""
        raise NotImplementedError

    def data_state(self) -> dict:
        """This rank's data position (plain data and tensors)."""
        return {}

    def load_data_state(self, state: dict) -> None:
        """Continue the data where `data_state` was taken."""

    def checkpoint_meta(self) -> dict:
        """Task facts saved beside the state (architecture, data layout, ...)."""
        return {}

    # -- for run_step and hooks ----------------------------------------------------------------------
    def register_hooks(self, hooks) -> None:
        self.hooks.extend(h for h in hooks if h is not None)

    def put_scalar(self, name: str, value: float, mean: bool = True) -> None:
        """A scalar of this step for the history and TensorBoard: averaged over the logging window
        (`mean`) or logged as its latest value."""
        self.scalars[name] = float(value)
        if not mean:
            self.latest_only.add(name)

    # -- the loop ------------------------------------------------------------------------------------
    def train(self, stop_after: Optional[int] = None) -> dict:
        """Resume (per `resume`: auto, never or a path), then run until `max_steps`, the data's end, or
        SIGTERM (or `stop_after` more steps, handled like SIGTERM). Returns a summary."""
        self.resume_or_start()
        first_step, started = self.step, time.perf_counter()
        seconds_before = self.seconds
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        self.status, self.stopping = "running", False
        try:
            for h in self.hooks:
                h.before_train(self)
            while self.step < self.max_steps:
                for h in self.hooks:
                    h.before_step(self)
                self.scalars = {}
                t0 = time.perf_counter()
                try:
                    losses = self.run_step()
                except DataExhausted:  # the end of the data is the end of training: keep what led to it
                    if self.state_path is not None:
                        self.save_checkpoint()
                    break
                self.check_finite(losses)
                self.last_step_seconds = time.perf_counter() - t0
                self.last_losses = losses
                self.step += 1
                self.seconds = seconds_before + time.perf_counter() - started
                self.stopping = self._agree_to_stop() or (stop_after is not None
                                                          and self.step - first_step >= stop_after)
                for h in self.hooks:
                    h.after_step(self)
                if self.stopping:
                    break
            self.status = "interrupted" if self.stopping else "done"
        except Exception:
            if self.world > 1:  # the other ranks must not wait for this one: see end_rank_after_error
                end_rank_after_error(f"{self.name} at step {self.step + 1} of {self.max_steps}")
            raise
        finally:
            for h in self.hooks:
                h.after_train(self)
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return {"status": self.status, "step": self.step, "steps_run": self.step - first_step,
                "seconds": time.perf_counter() - started, "losses": dict(self.last_losses),
                "history": self.history}

    def check_finite(self, losses: dict[str, float]) -> None:
        bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
        if bad:
            kept = (f"the state saved at step {self.saved_step} ({self.state_path}) is unchanged"
                    if self.saved_step is not None else "no state was saved")
            raise FloatingPointError(
                f"{self.name}: non-finite loss at step {self.step + 1} of {self.max_steps}: "
                + ", ".join(f"{k} = {v}" for k, v in bad.items())
                + f" (all losses: {losses}); {kept}. Lower the lr or check the data.")

    def _on_sigterm(self, signum, frame) -> None:  # noqa: ARG002
        self._signalled = True

    def _agree_to_stop(self) -> bool:
        """Every rank stops at the same step when any rank was signalled (a collective under DDP)."""
        flag = torch.tensor([1.0 if self._signalled else 0.0])
        if self.world > 1 and dist.is_initialized():
            flag = flag.to(self.device)
            dist.all_reduce(flag)
        return bool(flag.item() > 0)

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The run's shared state; `save_checkpoint` adds every rank's `rank_state`."""
        state = {"step": self.step,
                 "model": {k: v.detach().cpu() for k, v in unwrap(self.model).state_dict().items()},
                 "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                 "history": list(self.history), "epochs": list(self.epoch_records), "seconds": self.seconds,
                 "settings": self.settings,
                 "meta": {"name": self.name, "fingerprint": self.fingerprint, "world_size": self.world,
                          **self.checkpoint_meta()}}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def rank_state(self) -> dict:
        return {"rng": rng_state(), "data": self.data_state(),
                "hooks": {type(h).__name__: h.state_dict() for h in self.hooks if h.state_dict()}}

    def save_checkpoint(self) -> None:
        """Rank 0 writes the state atomically (every rank takes part: the rank states are gathered)."""
        mine = self.rank_state()
        if self.world > 1:
            everyone: list = [None] * self.world
            dist.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        if self.rank == 0:
            save_state(self.state_path, {**self.state_dict(), **{k: [e[k] for e in everyone] for k in mine}})
        self.saved_step = self.step
        if self.world > 1:
            dist.barrier()

    def resume_or_start(self) -> None:
        if self.state_path is None or self.resume_from == "never":
            return
        if self.resume_from == "auto":
            self.resume()
        elif not self.resume(Path(self.resume_from)):
            raise FileNotFoundError(f"{self.name}: resume: no trainer state at {self.resume_from}")

    def resume(self, path: Optional[Path] = None) -> bool:
        """Load a saved state. Without `path` (resume: auto) only this run's own state counts: one saved
        under another fingerprint (other settings or inputs) is left alone and training starts anew, so a
        changed manifest never continues a stale run. An explicit `path` is loaded whatever made it."""
        source = Path(path) if path is not None else self.state_path
        state = load_state(source)
        if state is None:
            return False
        saved = state.get("meta", {}).get("fingerprint", "")
        if path is None and saved and self.fingerprint and saved != self.fingerprint:
            log.warning("%s: not resuming %s: it was saved under fingerprint %s, this run is %s (settings or "
                        "inputs changed); starting from step 0", self.name, source, saved, self.fingerprint)
            return False
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.schedule = schedule_from_state(state["schedule"])
        self.step = self.saved_step = int(state["step"])
        self.history = list(state.get("history", []))
        self.epoch_records = list(state.get("epochs", []))
        self.seconds = float(state.get("seconds", 0.0))
        self.load_rank_states(state)
        if self.rank == 0:
            log.info("%s: resumed from %s at step %d of %d", self.name, source, self.step, self.max_steps)
        return True

    def load_rank_states(self, state: dict) -> None:
        """Restore this rank's RNG, data position and hook states (saved by as many ranks as now)."""
        if len(state["rng"]) != self.world:
            raise RuntimeError(f"{self.name}: the state was saved by {len(state['rng'])} process(es), this "
                               f"run has {self.world}; rerun with as many, or start over (delete "
                               f"{self.state_path})")
        self.restore_rank(state["rng"][self.rank], state["data"][self.rank], state["hooks"][self.rank])

    def restore_rank(self, rng: dict, data: dict, hooks: dict) -> None:
        set_rng_state(rng)
        self.load_data_state(data)
        for h in self.hooks:
            if type(h).__name__ in hooks:
                h.load_state_dict(hooks[type(h).__name__])


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
