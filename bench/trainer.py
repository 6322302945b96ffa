"""Pretraining throughput, side by side on one machine and one model (never pass/fail on time).

    .venv/bin/python bench/trainer.py                 # full: RSS at step 100 and 1000
    .venv/bin/python bench/trainer.py --quick         # shorter (RSS at 20 and 200)

Three figures (the quick form finishes within 15 minutes on a 2-core CPU):
  1. images/s with precomputed targets (codes decoded on the device) vs the online-teacher switch
     (RPN + teacher inside the step, as the reference does), both on the same in-memory batches;
     goal: precomputed >= 2.0x online.
  2. images/s with the real streaming loader (tars + Parquet sidecars, `--workers` processes) vs the
     same batches held in memory; goal: loader >= 0.95 of in-memory.
  3. resident memory (this process + loader workers) at two steps of one long streaming run: flat.
The world is a synthetic one written in the documented formats (tests/pretrain_world.py): images at
the demo world's scale, 300 stored boxes per image, fp16 teacher codes. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.config import PretrainConfig  # noqa: E402
from tests.pretrain_world import make_world  # noqa: E402
from trainer.engine.device import resolve_device  # noqa: E402
from trainer.models.clip import create_clip  # noqa: E402
from trainer.data.pretrain_stream import shard_sources  # noqa: E402
from trainer.tasks.pretrain import HookBase, OnlineTeacher, PretrainPaths, PretrainTrainer  # noqa: E402


def rss_mb() -> float:
    """Memory of this process and its children (loader workers), MiB: the sum of their proportional
    set sizes (PSS), so pages the forked workers share with the trainer are not counted twice."""
    me = os.getpid()
    pids = [me]
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == me:
                    pids.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


class Clock(HookBase):
    """Wall time after every step, and RSS at chosen steps."""

    def __init__(self, rss_at=()):
        self.times: list[float] = []
        self.rss_at, self.rss = set(rss_at), {}

    def before_train(self, t):
        self.times.append(time.perf_counter())

    def after_step(self, t):
        if t.device.type == "cuda":
            torch.cuda.synchronize(t.device)
        self.times.append(time.perf_counter())
        if t.step in self.rss_at:
            self.rss[t.step] = rss_mb()

    def images_per_s(self, batch: int, skip: int) -> float:
        t = self.times[skip:]
        return (len(t) - 1) * batch / (t[-1] - t[0])


def make_trainer(args, world, out: Path, steps: int, online: bool = False, rpn=None, workers: int = 0):
    torch.manual_seed(0)
    model, _ = create_clip(args.arch)
    cfg = PretrainConfig(steps=steps, batch_size=args.batch, regions_per_image=args.regions, min_size=args.min_size,
                         max_size=args.max_size, warmup_steps=10, lr=0.002, checkpoint_every=10 ** 9,
                         log_every=10 ** 9, device=args.device, resume="never", num_workers=workers,
                         online_teacher=online, precision="auto")
    teacher = None
    if online:
        torch.manual_seed(1)
        teacher = OnlineTeacher(rpn, create_clip(args.arch)[0], pre_nms_top_n=1000, post_nms_top_n=300,
                                nms_thresh=0.5)
    t = PretrainTrainer(cfg, model, world["concepts"], PretrainPaths(out / "last.pt"), progress=False,
                        sources=shard_sources(world["layout"], world["shard_ids"]), codec=world["codec"],
                        online=teacher, arch=args.arch)
    return t


def run(trainer, batches=None, rss_at=()) -> Clock:
    clock = Clock(rss_at)
    trainer.hooks.insert(0, clock)
    trainer.train(batches=batches)
    return clock


def build_rpn(kind: str, arch: str, min_size: int, max_size: int, device):
    if kind == "standin":
        from tests.rpn_standin import StandInRPN

        return StandInRPN().to(device).eval()
    from trainer.models.rpn import RpnConfig, build_rpn as build

    rpn = build(RpnConfig(kind, clip_arch=arch if kind == "clip_res4" else None, min_size=min_size,
                          max_size=max_size))
    return rpn.to(device).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="RN50-tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--min-size", type=int, default=224)
    p.add_argument("--max-size", type=int, default=384)
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode (after --warmup; 12, "
                   "quick 8)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="loader worker processes")
    p.add_argument("--rpn", default="resnet50_fpn",
                   help="online RPN: resnet50_fpn (the reference's), resnet18_fpn, clip_res4 or standin")
    p.add_argument("--rss-steps", default=None, help="two steps of the long run to read RSS at "
                   "(100,1000; quick 20,200)")
    p.add_argument("--quick", action="store_true", help="RSS at steps 20 and 200, 8 timed steps")
    p.add_argument("--block", type=int, default=2, help="steps per block when interleaving loader/memory")
    p.add_argument("--loader-steps", type=int, default=None, help="timed steps per source when comparing "
                   "the loader with in-memory batches (48, quick 24: a ratio near 0.95 needs more steps "
                   "than the online teacher's comparison)")
    p.add_argument("--rss-min-size", type=int, default=None, help="short side of the long memory run")
    p.add_argument("--regions", type=int, default=100, help="regions per image (of 300 stored)")
    p.add_argument("--rss-only", action="store_true", help="only the memory run (speed figures null)")
    p.add_argument("--rss-batch", type=int, default=None, help="batch of the memory run (default --batch)")
    p.add_argument("--rss-regions", type=int, default=None, help="regions per image of the memory run")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    args.rss_steps = args.rss_steps or ("20,200" if args.quick else "100,1000")
    args.steps = args.steps or (8 if args.quick else 12)
    args.loader_steps = args.loader_steps or (24 if args.quick else 48)
    if args.threads:
        torch.set_num_threads(args.threads)
    early, late = (int(v) for v in args.rss_steps.split(","))
    total = args.warmup + args.steps

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = max(4, 2 * max(1, args.workers))
        world = make_world(tmp / "run", num_shards=shards, per_shard=48, dim=create_clip(args.arch)[0].visual.output_dim,
                           num_concepts=512, boxes=300, size=(320, 240), seed=0)
        device = resolve_device(args.device)
        print(f"device {device}; {args.arch}; batch {args.batch}; short side {args.min_size} (max {args.max_size}); "
              f"{args.regions} of 300 boxes per image; {shards} shards x 48 images; torch threads {torch.get_num_threads()}")

        ips_pre = ips_on = ips_stream = ips_mem = float("nan")
        if not args.rss_only:
            # The batches, once, from the real loader (the in-memory runs reuse them).
            loader = make_trainer(args, world, tmp / "collect", total).loader()
            batches = [next(loader) for _ in range(total)]
            del loader

            pre = run(make_trainer(args, world, tmp / "pre", total), batches=iter(batches))
            ips_pre = pre.images_per_s(args.batch, args.warmup)
            print(f"precomputed targets, in memory : {ips_pre:8.2f} images/s")
            rpn = build_rpn(args.rpn, args.arch, args.min_size, args.max_size, device)
            on = run(make_trainer(args, world, tmp / "online", total, online=True, rpn=rpn), batches=iter(batches))
            ips_on = on.images_per_s(args.batch, args.warmup)
            print(f"online teacher ({args.rpn} RPN + teacher in the step): {ips_on:8.2f} images/s")
            print(f"  ratio precomputed / online   : {ips_pre / ips_on:8.2f}x (goal >= 2.0)")

            # Streaming loader vs the same batches in memory, interleaved in one run (blocks of --block
            # steps alternate between the two sources) so that load on a shared machine hits both alike.
            mem = [{k: v for k, v in b.items() if not k.startswith("_")} for b in batches]
            trainer = make_trainer(args, world, tmp / "mixed", args.warmup + 2 * args.loader_steps,
                                   workers=args.workers)
            loader = trainer.loader()
            sources = []

            def mixed():
                for i in itertools.count():
                    from_loader = i < args.warmup or ((i - args.warmup) // args.block) % 2 == 0
                    sources.append(from_loader)
                    yield next(loader) if from_loader else mem[i % len(mem)]

            clock = run(trainer, batches=mixed())
            del loader
            step_s = np.diff(clock.times)
            lo = [d for d, f in zip(step_s[args.warmup:], sources[args.warmup:]) if f]
            me = [d for d, f in zip(step_s[args.warmup:], sources[args.warmup:]) if not f]
            ips_stream, ips_mem = args.batch / float(np.median(lo)), args.batch / float(np.median(me))
            print(f"streaming loader ({args.workers} workers): {ips_stream:8.2f} images/s (median of {len(lo)} steps)")
            print(f"same batches in memory       : {ips_mem:8.2f} images/s (median of {len(me)} steps, interleaved)")
            print(f"  ratio loader / in memory     : {ips_stream / ips_mem:8.2f} (goal >= 0.95)")

        # Memory over a long streaming run (lighter images so that it fits on a CPU; --rss-min-size).
        light = argparse.Namespace(**{**vars(args), "min_size": args.rss_min_size or args.min_size,
                                      "max_size": max(args.rss_min_size or args.min_size, args.max_size),
                                      "batch": args.rss_batch or args.batch,
                                      "regions": args.rss_regions or args.regions})
        stream = run(make_trainer(light, world, tmp / "stream", late, workers=args.workers), rss_at=(early, late))
        print(f"memory (PSS, trainer + {args.workers} workers) at step {early}: {stream.rss.get(early, float('nan')):.0f} MiB; "
              f"at step {late}: {stream.rss.get(late, float('nan')):.0f} MiB (short side {light.min_size}, "
              f"batch {light.batch}, {light.regions} regions per image)")

    figures = {"device": str(device), "arch": args.arch, "batch_size": args.batch, "min_size_px": args.min_size,
               "online_rpn": args.rpn, "regions_per_image": args.regions,
               "rss_run_min_size_px": args.rss_min_size or args.min_size,
               "rss_run_batch_size": args.rss_batch or args.batch, "loader_workers": args.workers,
               "images_per_s_precomputed": round(ips_pre, 3), "images_per_s_online": round(ips_on, 3),
               "ratio_precomputed_vs_online": round(ips_pre / ips_on, 3),
               "images_per_s_streaming_loader": round(ips_stream, 3), "images_per_s_in_memory": round(ips_mem, 3),
               "ratio_loader_vs_in_memory": round(ips_stream / ips_mem, 3),
               f"pss_mb_step_{early}": round(stream.rss.get(early, float("nan")), 1),
               f"pss_mb_step_{late}": round(stream.rss.get(late, float("nan")), 1),
               "pss_growth_mb": round(stream.rss.get(late, float("nan")) - stream.rss.get(early, float("nan")), 1)}
    figures = {k: (None if isinstance(v, float) and v != v else v) for k, v in figures.items()}  # NaN -> null
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
