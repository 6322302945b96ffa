"""Peak memory against shard (or dataset) size: the same number of images, shards 10x larger.

    .venv/bin/python bench/memory.py                      # every stage, 200 images
    .venv/bin/python bench/memory.py --quick              # every stage, 100 images (shards of 5 and 50)
    .venv/bin/python bench/memory.py --images 2000 --size 1333x1000 --stages label

Each stage runs twice in a child process, once on small shards (`--small-shard` images each; for
transfer: a detection set of that many images) and once on shards `--factor` times larger with the
same total of images (transfer: a set `--factor` times larger, the same steps). While a child runs,
its process tree (the stage, its loader workers) is read from /proc every 20 ms:
  - largest process: the highest peak resident set (the kernel's VmHWM) of any one process of the
    tree (the trainer, one loader worker), so a worker that grows is not hidden by the others;
  - tree: the highest sum of the stage process's resident set and every other process's private
    memory (pages a forked worker still shares with its parent are counted once; the proportional set
    size would also split library pages with unrelated processes on the machine and move with them);
  - largest worker, private: the highest private memory (Private_Clean + Private_Dirty) of any process
    but the stage's own, i.e. what one loader worker holds by itself (a forked worker's resident set
    counts the pages it shares with its parent, which would hide its growth).
A ratio large/small near 1.0 means memory does not depend on shard size (goal <= 1.15).

A stage is one entry of STAGES: (prepare the input for one shard size, run the stage on it). proposals
and label run as stages with a local Ray; their tree includes Ray's daemons, and the largest process is
the actor. Figures, never pass/fail. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# -- the stages: prepare(root, images, per_shard, size) writes the input; run(root, args) is measured ----

def prepare_pretrain(root: Path, images: int, per_shard: int, size: tuple[int, int]) -> None:
    """tests/pretrain_world.py's world, its JPEGs replaced by noise of the same size: noise compresses
    like nothing, so the bytes per image are a photo's (about 250 kB at 640x480) and a reader that held
    a whole shard would show."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from pipeline.layout import RunLayout
    from pipeline.sidecars import shard_samples
    from tests.pretrain_world import make_world

    make_world(root, num_shards=images // per_shard, per_shard=per_shard, size=size, boxes=100, dim=64,
               portrait=False)
    rng = np.random.default_rng(0)
    layout = RunLayout(root)
    for tar_path in sorted(layout.shards.root.glob("*.tar")):
        samples = list(shard_samples(tar_path))
        with tarfile.open(tar_path, "w") as tar:
            for key, members in samples:
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
                    buf, format="JPEG", quality=85)
                for ext, payload in {**members, "jpg": buf.getvalue()}.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def run_pretrain(root: Path, args) -> dict:
    """The streaming loader with its worker processes through one epoch (what depends on the shards;
    the model's memory does not)."""
    from pipeline.layout import RunLayout
    from trainer.data.pretrain_stream import DataOptions, make_loader, shard_sources

    layout = RunLayout(root)
    shards = sorted(int(p.stem) for p in layout.shards.root.glob("*.tar"))
    opts = DataOptions(batch_size=4, seed=0, min_size=args.min_size, max_size=args.max_size, regions_per_image=64)
    loader = make_loader(shard_sources(layout, shards), opts, num_workers=args.workers)
    batches = args.images // opts.batch_size
    for _ in range(batches):
        next(loader)
    return {"batches": batches}


def prepare_transfer(root: Path, images: int, per_shard: int, size: tuple[int, int]) -> None:
    """A detection set of `per_shard` images (the dataset is what grows for transfer)."""
    from pipeline.config import SynthConfig
    from pipeline.synth import generate_world

    generate_world(SynthConfig(seed=2, num_images=per_shard, num_val_images=2, min_side=min(size),
                               max_side=max(size), max_objects=3), root, progress=False)


def run_transfer(root: Path, args) -> dict:
    """Proposals for every training image (into the proposal store), then `--steps` detector steps
    reading images through `--workers` loader processes."""
    import torch

    from tests.detection_helpers import StandInRPN, text_embeddings, tiny_clip
    from trainer.data.detection import DetectionSet
    from trainer.models.detector import DetectorSettings, OpenVocabDetector
    from trainer.tasks.transfer import DetectorTrainer, TrainSettings, compute_proposals, rpn_proposal_fn

    torch.set_num_threads(1)
    data = DetectionSet(root / "instances_train.json")
    vocab = data.vocabulary("base")
    propose = rpn_proposal_fn(StandInRPN(max_boxes=300), min_size=args.min_size, max_size=args.max_size,
                              pre_nms_top_n=1000, post_nms_top_n=300, nms_thresh=0.7)
    proposals = compute_proposals(propose, data, data.image_ids_with_boxes(vocab), progress=False, folder=root)
    model, tokenizer = tiny_clip(0)
    detector = OpenVocabDetector(model.visual, text_embeddings(model, tokenizer, vocab.names),
                                 DetectorSettings(min_sizes=(args.min_size,), max_size=args.max_size,
                                                  rois_per_image=64))
    settings = TrainSettings(steps=args.steps, batch_size=2, warmup_steps=1, log_every=10 ** 6,
                             num_workers=args.workers)
    DetectorTrainer(detector, data, vocab, proposals, settings, progress=False).train()
    return {"train_images": len(proposals), "steps": args.steps}


def _photo_manifest(root: Path, images: int, per_shard: int, size: tuple[int, int]):
    """bench/_photo_run.py's run: camera-like photos (shared by both shard sizes), tiny models at a
    small scale (what a shard's size could make grow is the images held, decoded at full size, not the
    model)."""
    from bench._photo_run import TINY, prepare

    photos = root.parent / f"photos-{images}-{size[0]}x{size[1]}"
    if not photos.exists():
        from bench._photo_run import write_photos
        write_photos(photos, images, size)
    models = dataclasses.replace(TINY, min_size=256, max_size=384, boxes=100, batch_size=4)
    return prepare(root, images=images, per_shard=per_shard, size=size, models=models, photos=photos)


def prepare_proposals(root: Path, images: int, per_shard: int, size: tuple[int, int]) -> None:
    _photo_manifest(root, images, per_shard, size)


def run_proposals(root: Path, args) -> dict:
    """The proposals stage (a local Ray, one actor streaming every shard)."""
    from pipeline.config import load_manifest
    from stages import proposals

    return {"summary": str(proposals.run(load_manifest(root / "manifest.yaml")))[:200]}


def prepare_label(root: Path, images: int, per_shard: int, size: tuple[int, int]) -> None:
    from stages import proposals

    proposals.run(_photo_manifest(root, images, per_shard, size))


def run_label(root: Path, args) -> dict:
    """The label stage (a local Ray, one actor streaming every shard; fp16 codec)."""
    from pipeline.config import load_manifest
    from stages import label

    return {"summary": str(label.run(load_manifest(root / "manifest.yaml")))[:200]}


STAGES = {"pretrain": (prepare_pretrain, run_pretrain), "transfer": (prepare_transfer, run_transfer),
          "proposals": (prepare_proposals, run_proposals), "label": (prepare_label, run_label)}


# -- measuring a process tree --------------------------------------------------------------------------------

def _tree(root_pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(d.name))
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _kib(path: str, field: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(command: list[str]) -> dict:
    """Run `command`; its peak figures (MiB, see the module doc) and seconds."""
    started = time.time()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    hwm: dict[int, int] = {}
    tree_peak = worker_peak = 0
    while child.poll() is None:
        pids = _tree(child.pid)
        tree = _kib(f"/proc/{child.pid}/status", "VmRSS:")
        for p in pids:
            hwm[p] = max(hwm.get(p, 0), _kib(f"/proc/{p}/status", "VmHWM:"))
            if p != child.pid:
                rollup = f"/proc/{p}/smaps_rollup"
                private = _kib(rollup, "Private_Clean:") + _kib(rollup, "Private_Dirty:")
                worker_peak, tree = max(worker_peak, private), tree + private
        tree_peak = max(tree_peak, tree)
        time.sleep(0.02)
    out = child.stdout.read()
    if child.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({child.returncode}):\n{out}")
    return {"largest_process_mib": round(max(hwm.values(), default=0) / 1024, 1),
            "tree_mib": round(tree_peak / 1024, 1), "largest_worker_private_mib": round(worker_peak / 1024, 1),
            "seconds": round(time.time() - started, 1),
            "report": json.loads(out.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    ap.add_argument("--images", type=int, default=200, help="images in all (pretrain)")
    ap.add_argument("--small-shard", type=int, default=10, help="images per small shard / small dataset")
    ap.add_argument("--factor", type=int, default=10, help="how much larger the large shards are")
    ap.add_argument("--size", default="640x480", help="image size WxH (pretrain, transfer)")
    ap.add_argument("--photo-size", default="1333x1000", help="photo size WxH (proposals, label)")
    ap.add_argument("--workers", type=int, default=2, help="loader processes")
    ap.add_argument("--steps", type=int, default=20, help="transfer steps")
    ap.add_argument("--min-size", type=int, default=128)
    ap.add_argument("--max-size", type=int, default=224)
    ap.add_argument("--quick", action="store_true", help="100 images, shards of 5 against 50 (two large "
                    "shards: one per pretrain loader worker)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.images, args.small_shard = 100, 5
    if args.child:  # one measured run
        print(json.dumps(STAGES[args.child][1](Path(args.root), args)))
        return
    load_start = os.getloadavg()
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in load_start)} ({os.cpu_count()} CPUs)")
    figures: dict = {}
    passthrough = [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in
                   ("images", "workers", "steps", "min-size", "max-size")]
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for stage in args.stages.split(","):
            prepare, _ = STAGES[stage]
            size = tuple(int(v) for v in (args.photo_size if stage in ("proposals", "label") else args.size)
                         .lower().split("x"))
            rows = {}
            for name, per_shard in (("small", args.small_shard), ("large", args.small_shard * args.factor)):
                root = Path(tmp) / f"{stage}-{name}"
                prepare(root, args.images, per_shard, size)
                rows[name] = measure([sys.executable, __file__, f"--child={stage}", f"--root={root}", *passthrough])
                print(f"{stage:9s} {name:5s} ({per_shard:5d} per shard): largest process "
                      f"{rows[name]['largest_process_mib']:8.1f} MiB, tree {rows[name]['tree_mib']:8.1f} MiB, "
                      f"largest worker (private) {rows[name]['largest_worker_private_mib']:7.1f} MiB, "
                      f"{rows[name]['seconds']:6.1f} s  {rows[name]['report']}")
            for what in ("largest_process", "tree", "largest_worker_private"):
                ratio = rows["large"][f"{what}_mib"] / max(rows["small"][f"{what}_mib"], 1e-9)
                figures[f"{stage}_{what}_ratio_{args.factor}x_shards"] = round(ratio, 3)
                figures[f"{stage}_{what}_mib_small"] = rows["small"][f"{what}_mib"]
                figures[f"{stage}_{what}_mib_large"] = rows["large"][f"{what}_mib"]
            print(f"{stage:9s} ratio large/small: largest process "
                  f"{figures[f'{stage}_largest_process_ratio_{args.factor}x_shards']:.3f}, tree "
                  f"{figures[f'{stage}_tree_ratio_{args.factor}x_shards']:.3f}, largest worker (private) "
                  f"{figures[f'{stage}_largest_worker_private_ratio_{args.factor}x_shards']:.3f}  (goal <= 1.15)")
    load_end = os.getloadavg()
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in load_end)}")
    figures.update(images=args.images, small_shard=args.small_shard, factor=args.factor, image_size=args.size,
                   photo_size=args.photo_size,
                   workers=args.workers, load_average_start=round(load_start[0], 2),
                   load_average_end=round(load_end[0], 2))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
