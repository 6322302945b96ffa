"""The model actors' pool (pipeline.ray_runtime.map_with_actor_pool) hands an item to an actor only when it
is free: an actor that is ready first never holds a second shard while another actor idles."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

WAIT_S = 30.0


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class SecondActorAfterFirstCall:
    """The first actor constructed is ready at once; every other one only once a call has started (so the
    first holds the pool alone for a while, as when one actor loads its model sooner). Each call waits until
    two calls have started (on any actors) or WAIT_S passes, and says which process ran it."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        try:
            os.close(os.open(self.folder / "first-actor", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            _wait_for(lambda: any(self.folder.glob("started-*")), WAIT_S)

    def __call__(self, batch: dict) -> dict:
        item = int(batch["item"][0])
        (self.folder / f"started-{item}").touch()
        paired = _wait_for(lambda: len(list(self.folder.glob("started-*"))) >= 2, WAIT_S)
        return {"item": np.array([item]), "pid": np.array([os.getpid()]), "paired": np.array([paired])}


def test_two_items_on_two_actors_run_side_by_side_though_one_actor_is_ready_first(ray_local, tmp_path):
    from pipeline.ray_runtime import ActorPlan, map_with_actor_pool

    plan = ActorPlan(num_actors=2, num_cpus=1, num_gpus=0, decode_threads=1)
    rows = list(map_with_actor_pool(SecondActorAfterFirstCall, [{"item": 0}, {"item": 1}], plan,
                                    constructor_args=(str(tmp_path),), desc="pool"))
    assert sorted(int(r["item"]) for r in rows) == [0, 1]
    # queued behind the first call on the first actor, the second would start only after it ends (unpaired)
    assert all(bool(r["paired"]) for r in rows)
    assert len({int(r["pid"]) for r in rows}) == 2
