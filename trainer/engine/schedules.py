"""Learning-rate schedules, defined once: a multiplier of each parameter group's base lr, as a pure
function of the step (the index of the step about to run, 0 for the first).

    WarmupMultiStep(warmup_steps=1000, milestones=(60000, 80000))  # detectron2's WarmupMultiStepLR
    WarmupCosine(warmup_steps=50, total_steps=1000)                  # open_clip's cosine_lr

A schedule's state is its settings (`state_dict`, `schedule_from_state`); with the step, that is all a
resumed run needs to continue with the same lr.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar, Union


@dataclass(frozen=True)
class WarmupMultiStep:
    """Linear warmup from `warmup_factor` over `warmup_steps`, then x`gamma` at every milestone reached
    (detectron2's WarmupMultiStepLR with its linear warmup; the milestones count during warmup too)."""
    warmup_steps: int = 0
    milestones: tuple[int, ...] = ()
    warmup_factor: float = 0.001
    gamma: float = 0.1
    kind: ClassVar[str] = "warmup_multistep"

    def __call__(self, step: int) -> float:
        factor = self.gamma ** sum(1 for m in self.milestones if step >= m)
        if step < self.warmup_steps:
            alpha = step / self.warmup_steps
            factor *= self.warmup_factor * (1 - alpha) + alpha
        return factor

    def state_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self), "milestones": list(self.milestones)}


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warmup to 1 over `warmup_steps` (step + 1 of them), then cosine down to 0 at `total_steps`
    (open_clip's cosine_lr)."""
    warmup_steps: int
    total_steps: int
    kind: ClassVar[str] = "warmup_cosine"

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def state_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


Schedule = Union[WarmupMultiStep, WarmupCosine]


def schedule_from_state(state: dict) -> Schedule:
    """The schedule a `state_dict()` describes."""
    fields = {k: v for k, v in state.items() if k != "kind"}
    if state.get("kind") == WarmupMultiStep.kind:
        return WarmupMultiStep(**{**fields, "milestones": tuple(fields.get("milestones", ()))})
    if state.get("kind") == WarmupCosine.kind:
        return WarmupCosine(**fields)
    raise ValueError(f"unknown lr schedule {state.get('kind')!r}")
