"""A training run's state file: written atomically, read with `torch.load(weights_only=True)`.

The state (trainer/engine/loop.py's TrainLoop.save_checkpoint) holds only tensors and plain data:
    step, model (every tensor of the trained module, frozen ones too), optimizer, scaler, schedule
    (its settings: the lr is a pure function of the step), history (logged records, for the curve),
    epochs (per-epoch evaluations), seconds, settings, meta (task name, fingerprint, world size, ...),
    and per rank: rng (python, numpy, torch, cuda), data (the task's data position), hooks.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipeline.io import atomic_path

STATE_VERSION = 2


def seed_all(seed: int) -> None:
    """Seed every generator a state captures (python, numpy, torch and CUDA): a run's saved RNG state
    then depends on its seed only, not on the process it ran in."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This process's random generators as tensors and plain data."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
             "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda"):
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def save_state(path: str | os.PathLike, state: dict) -> Path:
    """torch.save to a temporary file beside `path`, fsync, then os.replace (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # a temporary file, fsync, then rename
        torch.save({"version": STATE_VERSION, **state}, tmp)
    return path


def load_state(path: str | os.PathLike, map_location="cpu") -> Optional[dict]:
    """The trainer state at `path`, or None when there is none. Never unpickles Python objects."""
    path = Path(path)
    if not path.is_file():
        return None
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise RuntimeError(f"{path}: not a trainer state of version {STATE_VERSION} (an older release wrote "
                           "it?); delete it to start that training over")
    return state

