"""GPU throughput of the three heavy models per GPU, each built as its stage builds it from a run manifest:
the RPN of `proposals`, the CLIP teacher and codec of `label`, and the student's pretraining step.

    python bench/gpu.py                                   # CUDA: manifests/cc3m-rn50.yaml (RN50, 800 px)
    python bench/gpu.py --only label --set label.precision=fp32
    python bench/gpu.py --device cpu --tiny               # demo-small's settings on tiny models (checks it runs)

Each bench runs in a process of its own (`--bench NAME`, started by this script): the settings one stage
makes for its process (cuDNN, TF32, autocast) and the memory it leaves cannot reach the next, so the
figures do not depend on `--only`'s order. Random weights (throughput does not depend on them), one
world made once beforehand in a work folder: a teacher checkpoint, the concept embeddings (CC3M's 6790
concepts) and the label codec, saved where the manifest's run layout puts them, and an RPN checkpoint.
What each figure is, per step on a batch already decoded (data loading is not included: these are the
rates the data path must keep up with; bench/label.py and bench/shard.py measure decoding):
  - proposals: `Proposer.propose` (trainer/offline/proposals.py) as a proposals actor builds it from
    `stages.proposals.proposal_job`: the stage's precision settings, uint8 images of the original size
    in pinned memory copied to the device, the RPN's resize, top `post_nms_top_n` boxes, cleaned on the CPU;
  - label: `label_batch` (trainer/offline/labels.py) with the teacher and codec a label actor loads
    (`LabelShardWorker` from `stages.label.label_job`): region and whole-image embeddings of
    `post_nms_top_n` boxes per image, concept scores, pseudo-labels and the codec's encoding (and the
    flipped image with label.store_flipped);
  - pretrain: `PretrainTrainer`'s step (trainer/tasks/pretrain.py) from the manifest's `pretrain`
    section: stem, res2 and BatchNorm frozen, the codec's targets decoded on the device, the three
    losses, per-parameter clipping and the optimizer step, on `--pretrain-batch` images per GPU.
Without CUDA (and without --device cpu) it says so and exits 0 without a figure.
Prints readable lines, then (last line) one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

BENCHES = ("proposals", "label", "pretrain")
NUM_CONCEPTS = 6790        # the paper's CC3M concept pool
PAPER_MANIFEST = REPO / "manifests" / "cc3m-rn50.yaml"
TINY_MANIFEST = REPO / "manifests" / "demo-small.yaml"


def settings(args) -> dict:
    """The sizes of the bench's world: the paper's or tiny ones."""
    if args.tiny:
        return {"manifest": str(args.manifest or TINY_MANIFEST), "rpn_backbone": "resnet18_fpn",
                "image_size": (160, 120), "concepts": 64, "warmup": 1, "iters": 2,
                "pretrain_batch": args.pretrain_batch or 2}
    return {"manifest": str(args.manifest or PAPER_MANIFEST), "rpn_backbone": "resnet50_fpn",
            "image_size": (1333, 1000), "concepts": NUM_CONCEPTS, "warmup": 3, "iters": 10,
            "pretrain_batch": args.pretrain_batch or 8}


def load_bench_manifest(args, work: Path):
    """The run manifest with the bench world's files in place of the run's (and the user's --set)."""
    from pipeline.config import load_manifest

    overrides = [f"output_dir={work / 'run'}", f"teacher.checkpoint={work / 'teacher.pt'}",
                 f"proposals.checkpoint={work / 'rpn.pt'}", *args.overrides]
    return load_manifest(settings(args)["manifest"], overrides)


# -- the world, made once in the parent process (CPU only) --------------------------------------------------

def make_world(args, work: Path) -> None:
    """A random teacher checkpoint, concept embeddings and the label codec where the run layout puts them,
    and a random RPN checkpoint: what the stages' builders load."""
    from pipeline.layout import RunLayout
    from trainer.models.clip import create_clip, embedding_dim, save_clip_checkpoint
    from trainer.models.rpn import RpnConfig, build_rpn, save_rpn_checkpoint
    from trainer.offline.codecs import codec_from_settings

    s = settings(args)
    manifest = load_bench_manifest(args, work)
    layout = RunLayout.of(manifest)
    torch.manual_seed(0)
    model, _ = create_clip(manifest.teacher.arch)
    save_clip_checkpoint(model, work / "teacher.pt", arch=manifest.teacher.arch)
    dim = embedding_dim(model)
    del model
    rng = np.random.default_rng(0)
    concepts = unit_rows(rng, s["concepts"], dim)
    layout.concept_embeddings.parent.mkdir(parents=True, exist_ok=True)
    np.save(layout.concept_embeddings, concepts)
    cfg = manifest.label
    sample = unit_rows(rng, cfg.pq_train_regions, dim) if cfg.codec == "pq" else None
    codec_from_settings(cfg, dim, concept_embeddings=concepts, sample=sample, seed=manifest.seed) \
        .save(layout.labels_codec)
    p = manifest.proposals
    save_rpn_checkpoint(build_rpn(RpnConfig(s["rpn_backbone"], min_size=p.min_size, max_size=p.max_size)),
                        work / "rpn.pt")


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def random_boxes(n: int, width: int, height: int, gen: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([width * 0.8, height * 0.8])
    wh = torch.rand(n, 2, generator=gen) * torch.tensor([width * 0.5, height * 0.5]) + 8
    return torch.cat([xy, (xy + wh).minimum(torch.tensor([float(width), float(height)]))], 1)


def uint8_images(n: int, width: int, height: int, gen: torch.Generator, pin: bool) -> list[torch.Tensor]:
    """Decoded images as the streaming path hands them over: uint8 [3, H, W], pinned for a GPU."""
    images = [torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=gen) for _ in range(n)]
    return [im.pin_memory() for im in images] if pin else images


# -- one bench, in its own process --------------------------------------------------------------------------

def timed(step, warmup: int, iters: int, device: torch.device) -> float:
    """Seconds per call of `step`, after `warmup` calls, with the device synchronised."""
    for _ in range(warmup):
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(iters):
        step()
    synchronize(device)
    return (time.perf_counter() - started) / iters


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_proposals(args, manifest, device: torch.device) -> dict:
    from stages.proposals import proposal_job
    from trainer.offline.proposals import Proposer

    s = settings(args)
    proposer = Proposer(proposal_job(manifest, manifest.proposals.checkpoint, device=str(device)))
    batch = manifest.proposals.batch_size
    width, height = s["image_size"]
    pixels = uint8_images(batch, width, height, torch.Generator().manual_seed(0), pin=device.type == "cuda")
    sizes = [(width, height)] * batch
    seconds = timed(lambda: proposer.propose(pixels, sizes), s["warmup"], s["iters"], device)
    return {"images_per_s": batch / seconds, "batch": batch, "precision": precision_name(proposer.autocast_dtype)}


def bench_label(args, manifest, device: torch.device) -> dict:
    from stages.label import label_job
    from trainer.models.geometry import resized_size
    from trainer.offline.codecs import load_codec
    from trainer.offline.labels import label_batch, load_teacher

    s = settings(args)
    job = label_job(manifest)
    teacher, codec = load_teacher(job, device), load_codec(job.codec_json)   # as LabelShardWorker loads them
    batch = job.batch_size
    width, height = s["image_size"]
    gen = torch.Generator().manual_seed(0)
    w, h = resized_size(width, height, job.min_size, job.max_size)   # what teacher.resize makes of them
    pixels = uint8_images(batch, w, h, gen, pin=device.type == "cuda")
    sizes = [(width, height)] * batch
    boxes = [random_boxes(manifest.proposals.post_nms_top_n, width, height, gen).numpy() for _ in range(batch)]
    seconds = timed(lambda: label_batch(teacher, codec, pixels, sizes, boxes, job.store_flipped),
                    s["warmup"], s["iters"], device)
    return {"images_per_s": batch / seconds, "batch": batch, "codec": manifest.label.codec,
            "precision": precision_name(teacher.autocast_dtype)}


def bench_pretrain(args, manifest, device: torch.device, work: Path) -> dict:
    from pipeline.layout import RunLayout
    from trainer.data.pretrain_stream import collate
    from trainer.engine.loop import HookBase
    from stages.resolve import load_model_ref
    from trainer.models.geometry import resized_size
    from trainer.offline.codecs import load_codec
    from trainer.tasks.pretrain import PretrainPaths, PretrainTrainer

    s = settings(args)
    layout = RunLayout.of(manifest)
    per_gpu = s["pretrain_batch"]
    steps = s["warmup"] + s["iters"]
    cfg = manifest.pretrain.model_copy(update={
        "batch_size": per_gpu * manifest.pretrain.grad_accum, "steps": steps, "device": str(device),
        "resume": "never", "checkpoint_every": 10 ** 9, "log_every": 10 ** 9, "num_workers": 0})
    student, _ = load_model_ref(manifest.teacher, manifest, fallback=layout.teacher_checkpoint)  # as the stage
    concepts = np.load(layout.concept_embeddings)
    codec = load_codec(layout.labels.root)
    trainer = PretrainTrainer(cfg, student, concepts, PretrainPaths(state=work / "pretrain" / "last.pt"),
                              codec=codec, arch=manifest.teacher.arch, progress=False)

    width, height = s["image_size"]
    w, h = resized_size(width, height, cfg.min_size, cfg.max_size)
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    dim = concepts.shape[1]
    regions = cfg.regions_per_image
    samples = []
    for i, image in enumerate(uint8_images(cfg.batch_size // cfg.grad_accum, w, h, gen, pin=False)):
        samples.append({"key": f"{i:09d}", "image": image, "size": (h, w), "flip": False,
                        "caption": unit_rows(rng, 1, dim)[0], "boxes": random_boxes(regions, w, h, gen).numpy(),
                        "labels": rng.integers(0, len(concepts), regions), "probs": rng.random(regions, np.float32),
                        "codes": codec.encode(unit_rows(rng, regions, dim))})
    batch = collate(samples, regions, online=False)
    if device.type == "cuda":  # as the loader hands it over (pin_memory=True on CUDA)
        batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}

    class StepClock(HookBase):
        """The time after each step, with the device synchronised."""

        def __init__(self):
            self.times: list[float] = []

        def after_step(self, loop):
            synchronize(loop.device)
            self.times.append(time.perf_counter())

    clock = StepClock()
    trainer.hooks.insert(0, clock)
    trainer.train(batches=iter([batch] * steps))
    timed_steps = clock.times[s["warmup"] - 1:]
    seconds = (timed_steps[-1] - timed_steps[0]) / (len(timed_steps) - 1)
    return {"images_per_s": per_gpu / seconds, "batch": per_gpu,
            "precision": precision_name(trainer.autocast_dtype), "grad_clip": cfg.grad_clip}


def precision_name(dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def run_one(args) -> dict:
    """One bench in this process: its figures, with the peak GPU memory where it ran on CUDA."""
    work = Path(args.work_dir)
    device = torch.device(args.device)
    manifest = load_bench_manifest(args, work)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if args.bench == "proposals":
        figures = bench_proposals(args, manifest, device)
    elif args.bench == "label":
        figures = bench_label(args, manifest, device)
    else:
        figures = bench_pretrain(args, manifest, device, work)
    if device.type == "cuda":
        figures["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return figures


# -- the parent: the world, then each bench in a child process ------------------------------------------------

def child_command(args, name: str, work: Path) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--bench", name, "--work-dir", str(work),
               "--device", args.device]
    if args.tiny:
        command.append("--tiny")
    if args.manifest:
        command += ["--manifest", str(args.manifest)]
    if args.pretrain_batch:
        command += ["--pretrain-batch", str(args.pretrain_batch)]
    for override in args.overrides:
        command += ["--set", override]
    return command


def run_children(args, work: Path) -> dict:
    figures = {}
    for name in args.only:
        done = subprocess.run(child_command(args, name, work), cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            print(f"{name}: failed (exit status {done.returncode}; its error is above)", flush=True)
            figures[f"{name}_error"] = f"exit status {done.returncode}"
            continue
        result = json.loads(lines[-1])
        line = f"{name}: {result['images_per_s']:.1f} images/s per GPU (batch {result['batch']}, {result['precision']}"
        line += f", codec {result['codec']})" if "codec" in result else ")"
        figures[f"{name}_images_per_s"] = round(result["images_per_s"], 2)
        figures[f"{name}_precision"] = result["precision"]
        if "peak_gpu_memory_gib" in result:
            figures[f"{name}_peak_gpu_memory_gib"] = round(result["peak_gpu_memory_gib"], 2)
            line += f", peak GPU memory {result['peak_gpu_memory_gib']:.1f} GiB"
        print(line, flush=True)
    return figures


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="demo-small's settings and small images (checks "
                        "the script runs)")
    parser.add_argument("--manifest", default=None, help="the run manifest whose settings the stages use "
                        "(default: manifests/cc3m-rn50.yaml, with --tiny manifests/demo-small.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a manifest setting, as for regionclip")
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated: " + ", ".join(BENCHES))
    parser.add_argument("--pretrain-batch", type=int, default=None,
                        help="pretraining images per GPU per step (default 8; --tiny 2)")
    parser.add_argument("--work-dir", default=None, help="where the world is written (default: a temporary "
                        "folder, removed afterwards)")
    parser.add_argument("--bench", choices=BENCHES, default=None, help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(args.only) - set(BENCHES))
    if unknown:
        parser.error(f"--only {','.join(unknown)}: expected some of {', '.join(BENCHES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; it measures GPUs only (use --device cpu --tiny to check "
              "that the script runs). Nothing measured.")
        print(json.dumps({"cuda": False}))
        return 0
    if args.bench:
        print(json.dumps(run_one(args)), flush=True)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        s = settings(args)
        manifest = load_bench_manifest(args, work)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        width, height = s["image_size"]
        print(f"bench/gpu.py on {name}: {Path(s['manifest']).name} (teacher {manifest.teacher.arch}, RPN "
              f"{s['rpn_backbone']}), {width}x{height} images, {manifest.proposals.post_nms_top_n} boxes per "
              f"image, {s['concepts']} concepts; one process per bench", flush=True)
        make_world(args, work)
        figures = {"device": name, "manifest": Path(s["manifest"]).name, "arch": manifest.teacher.arch,
                   "rpn_backbone": s["rpn_backbone"], "boxes_per_image": manifest.proposals.post_nms_top_n,
                   "tiny": args.tiny, **run_children(args, work)}
    print(json.dumps(figures))
    return 1 if any(key.endswith("_error") for key in figures) else 0


if __name__ == "__main__":
    raise SystemExit(main())
