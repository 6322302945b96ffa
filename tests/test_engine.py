"""The training engine (trainer/engine/): the one schedules module, the loop and its hooks on a toy
task, and, for each of the four training loops (pretrain, train-teacher, train-rpn, transfer), a kill
at a seeded step followed by a rerun that does only the remaining steps and ends in the same state as
an uninterrupted run (model, optimizer, RNG, data position, history: every tensor torch.equal)."""
from __future__ import annotations

import io
import math
import os
import random
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from trainer.engine.hooks import standard_hooks
from trainer.engine.loop import HookBase, TrainFiles, TrainingInterrupted, TrainLoop
from trainer.engine.schedules import WarmupCosine, WarmupMultiStep, schedule_from_state

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    # Deterministic and quick on a shared 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- helpers: a kill at a step, and the comparison of two saved states ---------------------------------------

class Killed(BaseException):
    """Not an Exception: nothing in the loop may catch it, as nothing survives a SIGKILL."""


class KillAfter(HookBase):
    """Dies after step `at`, once every other hook has run (the state of that step, if due, is saved)."""

    def __init__(self, at: int):
        self.at = at

    def after_step(self, loop):
        if loop.step == self.at:
            raise Killed(f"killed after step {self.at}")


def kill_step(name: str, first: int, last: int, seed: int = 0) -> int:
    return random.Random(f"{name}-{seed}").randint(first, last)


def scramble_rng() -> None:
    """What a fresh process would have: nothing left over from the killed run."""
    random.seed(12345)
    np.random.seed(12345)
    torch.manual_seed(12345)


def _timing(key: str) -> bool:
    return key.endswith(("_s", "_per_s", "seconds"))


def differences(a, b, where: str = "state"):
    """Paths where two saved states differ (timings aside); tensors must be torch.equal."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        keys_a = {k for k in a if not _timing(str(k))}
        keys_b = {k for k in b if not _timing(str(k))}
        if keys_a != keys_b:
            return [f"{where}: keys {sorted(map(str, keys_a ^ keys_b))}"]
        return [d for k in keys_a for d in differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def assert_same_state(a: Path, b: Path) -> dict:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    diff = differences(sa, sb)
    assert not diff, diff[:10]
    assert sa["model"] and all(torch.equal(v, sb["model"][k]) for k, v in sa["model"].items())
    return sa


# -- the one schedules module --------------------------------------------------------------------------------

def test_warmup_multistep_is_detectron2_s():
    s = WarmupMultiStep(warmup_steps=10, milestones=(20, 30))
    assert s(0) == pytest.approx(0.001)
    assert s(5) == pytest.approx(0.001 * 0.5 + 0.5)
    assert s(10) == 1.0 and s(19) == 1.0
    assert s(20) == pytest.approx(0.1) and s(29) == pytest.approx(0.1)
    assert s(30) == pytest.approx(0.01)
    assert WarmupMultiStep(4, (2,), warmup_factor=0.5)(2) == pytest.approx(0.1 * (0.5 * 0.5 + 0.5))
    assert WarmupMultiStep()(0) == 1.0                   # no warmup, no milestones: constant


def test_warmup_cosine_is_open_clip_s():
    f = WarmupCosine(4, 12)
    assert [round(f(s), 3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(8) == pytest.approx(0.5) and f(12) == pytest.approx(0.0)
    assert f(20) == pytest.approx(0.0)


def test_schedule_state_round_trip():
    for s in (WarmupMultiStep(3, (5, 8), 0.01, 0.5), WarmupCosine(2, 9)):
        assert schedule_from_state(s.state_dict()) == s
    with pytest.raises(ValueError, match="unknown lr schedule"):
        schedule_from_state({"kind": "poly"})


def test_each_loop_keeps_its_former_lr_per_step():
    """The lr formulas the four loops had before the engine, against the one module."""
    def pretrain_and_transfer(step, lr, warmup, steps):
        factor = 0.1 ** sum(step >= s for s in steps)
        if step < warmup:
            alpha = step / max(1, warmup)
            factor *= 0.001 * (1 - alpha) + alpha
        return lr * factor

    def rpn(step, lr, total, warmup):
        if step < warmup:
            return lr * (0.001 + (1 - 0.001) * step / warmup)
        return lr * 0.1 ** sum(step >= m for m in (int(total * 2 / 3), int(total * 8 / 9)))

    def teacher(step, lr, warmup, total):
        if step < warmup:
            return lr * ((step + 1) / warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return lr * (0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    from pipeline.config import TrainRpnConfig
    from trainer.tasks.rpn import rpn_schedule

    for lr, warmup, steps in ((1e-4, 30, ()), (5e-4, 30, (100,)), (0.002, 100, (300, 525))):   # bitwise
        s = WarmupMultiStep(warmup, steps)
        assert all(lr * s(k) == pretrain_and_transfer(k, lr, warmup, steps) for k in range(600))
    for lr, warmup, total in ((0.001, 20, 472), (0.002, 2, 8)):
        s = WarmupCosine(warmup, total)
        assert all(lr * s(k) == teacher(k, lr, warmup, total) for k in range(total))
    # train-rpn's warmup was written `0.001 + 0.999 * step / warmup`: the same number up to the last bit
    # of a float64, and the same float32 (the precision SGD applies it in) at every step of the demo's run
    for lr, warmup, total in ((0.02, 20, 219), (0.02, 10, 38), (0.01, 100, 300)):
        s = rpn_schedule(TrainRpnConfig(lr=lr, warmup_steps=warmup), total)
        assert all(np.float32(lr * s(k)) == np.float32(rpn(k, lr, total, s.warmup_steps)) for k in range(total))


# -- the loop and its hooks on a toy task --------------------------------------------------------------------

class Toy(TrainLoop):
    """A small regression whose every step draws on the torch, numpy and python RNGs (data, dropout)."""

    def __init__(self, out: Path, steps: int = 7, checkpoint_every: int = 2, log_every: int = 3,
                 fingerprint: str = "toy", nan_at=None):
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        super().__init__("toy", model=model, optimizer=optimizer, max_steps=steps,
                         schedule=WarmupMultiStep(2, (5,)), state_path=out / "last.pt", fingerprint=fingerprint,
                         settings={"steps": steps}, images_per_step=8)
        self.drawn, self.nan_at, self.lrs = 0, nan_at, []
        self.register_hooks(standard_hooks(log_every=log_every, checkpoint_every=checkpoint_every,
                                           tensorboard=out / "tb", curve=out / "curve.png", progress=False))

    def run_step(self):
        x = torch.randn(8, 4)
        y = x.sum(1, keepdim=True) + float(np.random.rand()) + random.random()
        self.drawn += 8
        loss = nn.functional.mse_loss(self.model(x), y)
        if self.nan_at == self.step + 1:
            loss = loss * float("nan")
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.lrs.append(self.optimizer.param_groups[0]["lr"])
        self.put_scalar("drawn", self.drawn, mean=False)
        return {"mse": loss.item()}

    def data_state(self):
        return {"drawn": self.drawn}

    def load_data_state(self, state):
        self.drawn = state["drawn"]


def test_a_killed_run_resumes_from_its_last_state_and_ends_identical(tmp_path):
    full = Toy(tmp_path / "full")
    assert full.train()["steps_run"] == 7
    after_full = torch.rand(3)                  # the RNG goes on from where the run left it
    killed = Toy(tmp_path / "killed")
    killed.register_hooks([KillAfter(5)])
    with pytest.raises(Killed):
        killed.train()
    assert torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["step"] == 4
    scramble_rng()
    resumed = Toy(tmp_path / "killed")
    summary = resumed.train()
    assert summary["status"] == "done" and summary["steps_run"] == 3 and resumed.step == 7
    assert torch.equal(torch.rand(3), after_full)
    state = assert_same_state(tmp_path / "full" / "last.pt", tmp_path / "killed" / "last.pt")
    # logged every 3 steps: the window open at the kill (step 4 of 6) was saved and finished after it
    assert [h["step"] for h in state["history"]] == [3, 6, 7]
    assert [h["drawn"] for h in state["history"]] == [24, 48, 56]
    assert differences(resumed.history, full.history) == []
    assert resumed.lrs == [0.05 * WarmupMultiStep(2, (5,))(k) for k in range(4, 7)]
    assert state["schedule"] == WarmupMultiStep(2, (5,)).state_dict() and state["settings"] == {"steps": 7}
    assert (tmp_path / "killed" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert list((tmp_path / "killed" / "tb").glob("events.*"))
    # a finished run, asked again, does nothing
    assert Toy(tmp_path / "killed").train()["steps_run"] == 0


def test_nan_guard_stops_with_the_step_and_the_loss(tmp_path):
    toy = Toy(tmp_path, nan_at=5)
    with pytest.raises(FloatingPointError, match=r"toy: non-finite loss at step 5 of 7: mse = nan.*step 4"):
        toy.train()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 4   # the last good state stays


def test_sigterm_saves_the_state_and_stops_at_the_step(tmp_path):
    class Terminate(HookBase):
        def after_step(self, loop):
            if loop.step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    toy = Toy(tmp_path, checkpoint_every=100)
    toy.hooks.insert(0, Terminate())   # the flag is read after the next step
    summary = toy.train()
    assert summary["status"] == "interrupted" and summary["step"] == 4
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 4
    with pytest.raises(TrainingInterrupted) as stop:
        TrainingInterrupted.raise_if(toy, summary)
    assert stop.value.code == 143
    assert Toy(tmp_path, checkpoint_every=100).train()["steps_run"] == 3


def test_a_state_of_other_settings_is_not_resumed(tmp_path):
    Toy(tmp_path, steps=4, fingerprint="a").train()
    again = Toy(tmp_path, steps=4, fingerprint="b")
    assert again.train()["steps_run"] == 4


# -- DDP: an error on one rank stops every rank ------------------------------------------------------------

DDP_FAILURE_CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {repo!r})
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch import nn
    from trainer.engine.device import init_distributed
    from trainer.engine.loop import HookBase, TrainLoop
    from trainer.engine.schedules import WarmupMultiStep

    rank, world = init_distributed(torch.device("cpu"))   # gloo, from the torchrun-style variables
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    class FinalMean(HookBase):   # a collective when training ends, as a final evaluation over ranks does
        def after_train(self, loop):
            value = torch.tensor([float(loop.step)])
            dist.all_reduce(value)
            print(f"rank {{loop.rank}}: the after_train all-reduce ran", flush=True)

    class Step(TrainLoop):
        def run_step(self):
            if self.rank == 1 and self.step == 2:
                raise ValueError(f"corrupt batch on rank {{self.rank}} at step {{self.step + 1}}")
            loss = model(torch.randn(8, 4)).pow(2).mean()   # DDP all-reduces the gradient in backward
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return {{"loss_mse": loss.item()}}

    loop = Step("toy-ddp", model=model, optimizer=optimizer, max_steps=1000, schedule=WarmupMultiStep(0, ()),
                rank=rank, world=world)
    loop.register_hooks([FinalMean()])
    loop.train()
    print(f"rank {{rank}}: finished", flush=True)
""")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks_env(world: int, timeout_s: int) -> dict:
    return {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world),
            "OMP_NUM_THREADS": "1", "REGIONCLIP_DIST_TIMEOUT_S": str(timeout_s)}


def test_an_error_on_one_rank_stops_every_rank_with_the_error_printed_once(tmp_path):
    # Two gloo ranks as torchrun would start them, but without torchrun (which would stop rank 0
    # itself): rank 1 raises in its third step while rank 0 waits in that step's gradient all-reduce.
    # The timeout is 120 s, so an exit within 60 s is the loop's doing, not the timeout's.
    script = tmp_path / "ddp_failure.py"
    script.write_text(DDP_FAILURE_CHILD.format(repo=str(REPO)))
    env = _ranks_env(2, timeout_s=120)
    started = time.monotonic()
    ranks = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        outputs = [p.communicate(timeout=60)[0] for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    seconds = time.monotonic() - started
    print(f"\nboth ranks ended {seconds:.1f} s after starting (imports included)")
    assert seconds < 60 and [p.returncode for p in ranks] == [1, 1], outputs
    both = "".join(outputs)
    assert both.count("corrupt batch on rank 1 at step 3") == 1, both            # the first error, once
    assert "rank 1: toy-ddp at step 3 of 1000 failed" in outputs[1]
    assert "rank 0: toy-ddp at step 3 of 1000 failed" in outputs[0]              # its all-reduce lost its peer
    # The failed rank ran no more collectives: its hook's all-reduce would have been paired with rank 0's
    # gradient all-reduce (different tensors), silently mixing the two.
    assert "after_train all-reduce ran" not in both and "finished" not in both


def test_a_rank_whose_peers_never_start_stops_at_the_timeout():
    env = {**_ranks_env(2, timeout_s=3), "RANK": "0", "LOCAL_RANK": "0"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", "import torch; from trainer.engine.device import init_distributed; "
                           "init_distributed(torch.device('cpu'))"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and time.monotonic() - started < 40
    assert "the 2 ranks did not form a process group within 3 s (REGIONCLIP_DIST_TIMEOUT_S)" in done.stderr


@pytest.mark.parametrize("local_rank, gpus_seen, expected", [
    (None, 2, "cuda:0"),
    (1, 2, "cuda:1"),     # torchrun: one process per GPU of the node, each sees them all
    (3, 1, "cuda:0"),     # a launcher that shows each rank only its own GPU
])
def test_the_gpu_of_a_rank(monkeypatch, local_rank, gpus_seen, expected):
    from trainer.engine.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus_seen)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    assert str(resolve_device("auto")) == str(resolve_device("cuda")) == expected


def test_a_rank_beyond_the_gpus_it_sees_is_a_clear_error(monkeypatch):
    from trainer.engine.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(RuntimeError, match=r"LOCAL_RANK=2, but this process sees 2 GPUs \(CUDA_VISIBLE_DEVICES=4,5\)"):
        resolve_device("auto")


def test_the_timeout_setting_is_checked(monkeypatch):
    from trainer.engine.device import distributed_timeout

    monkeypatch.delenv("REGIONCLIP_DIST_TIMEOUT_S", raising=False)
    assert distributed_timeout().total_seconds() == 600
    monkeypatch.setenv("REGIONCLIP_DIST_TIMEOUT_S", "45")
    assert distributed_timeout().total_seconds() == 45
    for bad in ("ten", "0", "-5"):
        monkeypatch.setenv("REGIONCLIP_DIST_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match=f"REGIONCLIP_DIST_TIMEOUT_S='{bad}'"):
            distributed_timeout()


# -- the four loops: killed at a seeded step, rerun ----------------------------------------------------------

# pretrain: a real SIGKILL of a child process.
PRETRAIN_CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {repo!r})
    torch.set_num_threads(1)
    from pathlib import Path
    import numpy as np
    from pipeline.layout import RunLayout
    from trainer.engine.loop import HookBase
    from trainer.offline.codecs import load_codec
    from tests.test_engine import pretrain_trainer
    root = Path({root!r})
    world = dict(layout=RunLayout(root), shard_ids=[0, 1], codec=load_codec(RunLayout(root).labels.root),
                 concepts=np.load(RunLayout(root).concept_embeddings))
    class Tell(HookBase):
        def after_step(self, t):
            if t.step == {at}:   # the parent kills this process now
                print("step", t.step, flush=True)
                import time; time.sleep(60)
    t = pretrain_trainer(world, Path({out!r}))
    t.hooks.append(Tell())   # after the state of the step is saved
    t.train()
""")


def pretrain_trainer(world, out: Path):
    from pipeline.config import PretrainConfig
    from trainer.data.pretrain_stream import shard_sources
    from trainer.models.clip import create_clip
    from trainer.tasks.pretrain import PretrainPaths, PretrainTrainer

    torch.manual_seed(0)
    model, _ = create_clip("RN50-tiny")
    cfg = PretrainConfig(steps=6, batch_size=4, regions_per_image=8, min_size=64, max_size=96, warmup_steps=2,
                         lr=0.01, lr_steps=[4], log_every=1, checkpoint_every=2, device="cpu", seed=3)
    paths = PretrainPaths(out / "last.pt", out / "student.pt", out / "tb", out / "last.png")
    return PretrainTrainer(cfg, model, world["concepts"], paths, progress=False, fingerprint="run",
                           sources=shard_sources(world["layout"], world["shard_ids"]), codec=world["codec"])


@pytest.mark.slow
def test_pretrain_sigkilled_resumes_exactly(tmp_path):
    from tests.pretrain_world import make_world

    world = make_world(tmp_path / "world")
    full = pretrain_trainer(world, tmp_path / "full")
    assert full.train()["steps_run"] == 6
    at = kill_step("pretrain", 3, 5)   # after the first state (step 2) was saved
    out = tmp_path / "killed"
    script = PRETRAIN_CHILD.format(repo=str(REPO), root=str(world["layout"].root), out=str(out), at=at)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        for line in proc.stdout:
            if line.strip() == f"step {at}":
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
    saved = torch.load(out / "last.pt", weights_only=True)["step"] if (out / "last.pt").exists() else 0
    assert saved == at - at % 2
    scramble_rng()
    resumed = pretrain_trainer(world, out)
    summary = resumed.train()
    print(f"\npretrain: SIGKILL after step {at} of 6, resumed at {saved}: {summary['steps_run']} steps run")
    assert summary["status"] == "done" and summary["steps_run"] == 6 - saved
    assert_same_state(tmp_path / "full" / "last.pt", out / "last.pt")
    a = torch.load(tmp_path / "full" / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(out / "student.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())


# train-teacher: tars of coloured images whose captions name the colour.
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def write_caption_tars(folder: Path, shards: int = 2, per_shard: int = 7) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    tars = []
    for s in range(shards):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                name = list(COLOURS)[(s * per_shard + i) % len(COLOURS)]
                pixels = np.full((48, 56, 3), COLOURS[name], np.uint8)
                pixels[rng.integers(0, 30):, rng.integers(0, 30):] //= 2
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG")
                for ext, payload in (("jpg", buf.getvalue()), ("txt", f"a {name} thing".encode())):
                    info = tarfile.TarInfo(f"{s:05d}{i:04d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        tars.append(path)
    return tars


def teacher_trainer(tars, heldout, out: Path, num_workers: int):
    from pipeline.config import TrainTeacherConfig
    from trainer.models.clip import create_clip
    from trainer.tasks.teacher import ClipTrainer

    torch.manual_seed(0)
    model, tokenizer = create_clip("RN50-tiny")
    cfg = TrainTeacherConfig(enabled=True, epochs=3, batch_size=4, lr=0.002, warmup_steps=2, device="cpu",
                             num_workers=num_workers)
    files = TrainFiles(out / "last.pt", out / "tb", out / "curve.png")
    # 14 images in batches of 4: 3 steps an epoch, 2 images left over (read and dropped) each epoch
    return ClipTrainer(model, tokenizer, tars, heldout, cfg, steps_per_epoch=3, seed=1, files=files,
                       checkpoint_every=2, fingerprint="run", progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("num_workers, seed", [(0, 0), (0, 1), (1, 3)])  # killed mid-epoch, at an epoch's end
def test_train_teacher_killed_resumes_exactly(tmp_path, num_workers, seed):
    from trainer.data.image_text import read_image_text

    tars = write_caption_tars(tmp_path / "shards")
    heldout = list(read_image_text(tars[:1]))[:4]
    full = teacher_trainer(tars, heldout, tmp_path / "full", num_workers)
    assert full.train()["steps_run"] == 9
    assert [e["epoch"] for e in full.epoch_records] == [1, 2, 3] and "r1" in full.epoch_records[0]
    at = kill_step("train-teacher", 3, 8, seed=seed)
    killed = teacher_trainer(tars, heldout, tmp_path / "killed", num_workers)
    killed.register_hooks([KillAfter(at)])
    with pytest.raises(Killed):
        killed.train()
    saved = at - at % 2
    scramble_rng()
    resumed = teacher_trainer(tars, heldout, tmp_path / "killed", num_workers)
    summary = resumed.train()
    print(f"\ntrain-teacher ({num_workers} workers): killed after step {at} of 9, resumed at {saved} "
          f"(epoch {saved // 3}, batch {saved % 3}): {summary['steps_run']} steps run")
    assert summary["status"] == "done" and summary["steps_run"] == 9 - saved
    state = assert_same_state(tmp_path / "full" / "last.pt", tmp_path / "killed" / "last.pt")
    assert [e["epoch"] for e in state["epochs"]] == [1, 2, 3]
    assert (tmp_path / "killed" / "curve.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def detection_world(tmp_path_factory):
    from pipeline.config import SynthConfig
    from pipeline.synth import generate_world

    root = tmp_path_factory.mktemp("detection")
    generate_world(SynthConfig(seed=2, num_images=8, num_val_images=3, min_side=64, max_side=96, max_objects=3),
                   root, progress=False)
    return root


def rpn_run(world: Path, out: Path, kill_at=None) -> dict:
    from pipeline.config import TrainRpnConfig
    from trainer.models.rpn import RpnConfig, build_rpn
    from trainer.tasks.rpn import RpnTrainer, read_coco_boxes

    torch.manual_seed(0)
    model = build_rpn(RpnConfig("clip_res4", clip_arch="RN50-tiny", anchor_sizes=(16, 32, 64), min_size=64,
                                max_size=96))
    cfg = TrainRpnConfig(enabled=True, epochs=2, batch_size=3, lr=0.01, warmup_steps=2, min_size=64, max_size=96,
                         device="cpu")
    trainer = RpnTrainer(model, read_coco_boxes(world / "instances_train.json"), cfg, seed=0,
                         val=read_coco_boxes(world / "instances_val.json"), checkpoint_every=2,
                         files=TrainFiles(out / "last.pt", out / "tb", out / "curve.png"), fingerprint="run",
                         progress=False)
    if kill_at is not None:
        trainer.register_hooks([KillAfter(kill_at)])
    return {"trainer": trainer, "summary": trainer.train()}


def test_train_rpn_killed_resumes_exactly(detection_world, tmp_path):
    full = rpn_run(detection_world, tmp_path / "full")
    total = full["summary"]["steps_run"]
    assert total == full["trainer"].max_steps >= 4
    assert [set(e) >= {"loss", "recall_all"} for e in full["trainer"].epoch_records] == [True, True]
    at = kill_step("train-rpn", 3, total - 1)
    with pytest.raises(Killed):
        rpn_run(detection_world, tmp_path / "killed", kill_at=at)
    saved = at - at % 2
    scramble_rng()
    summary = rpn_run(detection_world, tmp_path / "killed")["summary"]
    print(f"\ntrain-rpn: killed after step {at} of {total}, resumed at {saved}: {summary['steps_run']} steps run")
    assert summary["status"] == "done" and summary["steps_run"] == total - saved
    assert_same_state(tmp_path / "full" / "last.pt", tmp_path / "killed" / "last.pt")


def transfer_run(world: Path, out: Path, kill_at=None, workers: int = 0) -> dict:
    from tests.detection_helpers import StandInRPN, text_embeddings, tiny_clip
    from trainer.data.detection import DetectionSet
    from trainer.models.detector import DetectorSettings, OpenVocabDetector
    from trainer.tasks.transfer import DetectorTrainer, TrainSettings, compute_proposals, rpn_proposal_fn

    data = DetectionSet(world / "instances_train.json")
    vocab = data.vocabulary("base")
    propose = rpn_proposal_fn(StandInRPN(), min_size=64, max_size=128, pre_nms_top_n=200, post_nms_top_n=48,
                              nms_thresh=0.7)
    proposals = compute_proposals(propose, data, data.image_ids_with_boxes(vocab), progress=False, folder=world)
    model, tokenizer = tiny_clip(0)
    detector = OpenVocabDetector(model.visual, text_embeddings(model, tokenizer, vocab.names),
                                 DetectorSettings(min_sizes=(64, 96), max_size=128, rois_per_image=32))
    settings = TrainSettings(steps=7, batch_size=2, lr=0.002, warmup_steps=2, lr_steps=[5], log_every=3,
                             repeat_factor_threshold=0.5, seed=0, num_workers=workers)
    trainer = DetectorTrainer(detector, data, vocab, proposals, settings, checkpoint_every=2, fingerprint="run",
                              files=TrainFiles(out / "last.pt", out / "tb", out / "curve.png"), progress=False)
    if kill_at is not None:
        trainer.register_hooks([KillAfter(kill_at)])
    return {"trainer": trainer, "summary": trainer.train()}


def test_transfer_killed_resumes_exactly(detection_world, tmp_path):
    full = transfer_run(detection_world, tmp_path / "full")
    assert full["summary"]["steps_run"] == 7
    at = kill_step("transfer", 3, 6)
    with pytest.raises(Killed):
        transfer_run(detection_world, tmp_path / "killed", kill_at=at)
    saved = at - at % 2
    scramble_rng()
    summary = transfer_run(detection_world, tmp_path / "killed")["summary"]
    print(f"\ntransfer: killed after step {at} of 7, resumed at {saved}: {summary['steps_run']} steps run")
    assert summary["status"] == "done" and summary["steps_run"] == 7 - saved
    state = assert_same_state(tmp_path / "full" / "last.pt", tmp_path / "killed" / "last.pt")
    assert [h["step"] for h in state["history"]] == [3, 6, 7]
    assert {"loss_cls", "loss_box", "lr"} <= set(state["history"][-1])
    # transfer now has TensorBoard scalars and a curve
    assert list((tmp_path / "killed" / "tb").glob("events.*"))
    assert (tmp_path / "killed" / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_transfer_trains_the_same_detector_with_image_reading_workers(detection_world, tmp_path):
    """Images are read per step by a DataLoader over the seeded order; its workers change nothing."""
    in_process = transfer_run(detection_world, tmp_path / "w0")
    with_workers = transfer_run(detection_world, tmp_path / "w2", workers=2)
    assert with_workers["summary"]["steps_run"] == in_process["summary"]["steps_run"] == 7
    a = torch.load(tmp_path / "w0" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "w2" / "last.pt", weights_only=True)
    assert a["model"] and all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    losses = [[{k: v for k, v in h.items() if k.startswith("loss_")} for h in s["history"]] for s in (a, b)]
    assert losses[0] == losses[1] and len(losses[0]) == 3


def test_the_proposal_store_gives_back_what_it_was_given(tmp_path):
    from trainer.tasks.transfer import ProposalStore

    store = ProposalStore(tmp_path)
    rng = torch.Generator().manual_seed(0)
    given = {i: (torch.rand(n, 4, generator=rng) * 500, torch.randn(n, generator=rng)) for i, n in
             ((7, 5), (3, 0), (11, 1000))}
    for image_id, (boxes, objectness) in given.items():
        store.add(image_id, boxes, objectness)
    assert len(store) == 3 and 3 in store and 4 not in store
    for image_id in (11, 3, 7):
        boxes, objectness = store[image_id]
        assert torch.equal(boxes, given[image_id][0]) and torch.equal(objectness, given[image_id][1])
        assert boxes.shape == (len(objectness), 4) and boxes.dtype == torch.float32
    assert not list(tmp_path.iterdir())  # an unnamed file: nothing is left behind
