"""`make gpu-check`: the project's GPU paths on one machine with CUDA, in at most 8 minutes on one H100.

    python bench/gpu_check.py                   # everything below, into runs/gpu-check/<date-time>/
    python bench/gpu_check.py --plan            # print the steps and their commands, run nothing
    python bench/gpu_check.py --steps compare,nccl --run-dir runs/gpu-check/<an earlier check>

The steps, each in processes of its own (a log per step in the run folder):
  1. pipeline  manifests/demo-small.yaml through proposals, label, pretrain and transfer on the GPU with
               a local Ray: every training stage on `cuda`, proposals and label as GPU actors (precision
               auto: bf16), the teacher's concept search and a region index through FAISS (on the GPU where
               the installed FAISS build supports it), pretrain under a one-process torchrun;
  2. compare   CUDA against the CPU on the first images of shard 0: the RPN's boxes (mean best IoU) and
               the teacher's pseudo-labels (top-1 agreement), in fp32 on both, and the stage's own
               outputs (bf16) against the CPU's fp32;
  3. nccl      a one-process torchrun that forms an NCCL process group: all-reduce, a DDP step, teardown;
  4. pytest    the tests marked `gpu` (pytest -m gpu);
  5. bench     bench/gpu.py at the paper's settings: images/s per GPU and peak GPU memory of the
               proposals, label and pretrain models.
Without CUDA it says so and exits 0. Prints a readable summary, writes summary.json into the run folder
and, as its last line, one JSON object; exit status 1 when a step failed.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

# bench/report.py runs this only with --full or --only: it runs whole stages (make gpu-check runs it).
LONG = True

STEPS = ("pipeline", "compare", "nccl", "pytest", "bench")
MANIFEST = REPO / "manifests" / "demo-small.yaml"
RUNS = REPO / "runs"
LAST_STAGE = "transfer"
TRAINING_SECTIONS = ("embed", "train_teacher", "train_rpn", "pretrain", "transfer")   # each has `device`
BUDGET_S = 480                     # the whole check, on one H100
COMPARE_IMAGES = 32
# Agreement CUDA must reach with the CPU: fp32 on both differs by reduction order only; the stage's bf16
# moves near-tied scores (a pseudo-label whose top two concepts are within bf16's precision, a box
# near NMS's threshold).
FP32_AGREEMENT = 0.98
BF16_AGREEMENT = 0.90


# -- CUDA against the CPU (tested on CPU tensors: tests/test_gpu_check.py) ------------------------------------

def as_tensor(values) -> torch.Tensor:
    """A CPU tensor of `values` (a tensor on any device, an array, a list); arrays read from Parquet are
    read-only, so they are copied."""
    if torch.is_tensor(values):
        return values.detach().cpu()
    return torch.from_numpy(np.array(values))


def box_agreement(boxes_a, boxes_b) -> float:
    """How well two sets of boxes [N, 4] (x1, y1, x2, y2) cover each other: each box's best IoU with
    the other set, averaged over both sets (1.0 for the same boxes in any order; 1.0 when both are
    empty, 0.0 when only one is)."""
    from torchvision.ops import box_iou

    a, b = as_tensor(boxes_a).float().reshape(-1, 4), as_tensor(boxes_b).float().reshape(-1, 4)
    if len(a) == 0 or len(b) == 0:
        return float(len(a) == len(b))
    iou = box_iou(a, b)
    return float((iou.max(dim=1).values.mean() + iou.max(dim=0).values.mean()) / 2)


def mean_box_agreement(per_image_a, per_image_b) -> float:
    """box_agreement averaged over images (the two lists in the same image order)."""
    if len(per_image_a) != len(per_image_b):
        raise ValueError(f"{len(per_image_a)} images against {len(per_image_b)}")
    scores = [box_agreement(a, b) for a, b in zip(per_image_a, per_image_b)]
    return sum(scores) / len(scores) if scores else 1.0


def top1_agreement(labels_a, labels_b) -> float:
    """The fraction of regions whose pseudo-labels (argmax concepts) are equal; 1.0 for no region."""
    a, b = as_tensor(labels_a).reshape(-1), as_tensor(labels_b).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"{a.numel()} pseudo-labels against {b.numel()}: not the same regions")
    return float((a == b).double().mean()) if a.numel() else 1.0


def compare_cuda_with_cpu(manifest, images: int = COMPARE_IMAGES, cuda: str = "cuda") -> dict:
    """The first `images` images of shard 0 through the RPN and the teacher on CUDA and on the CPU (fp32
    on both), built as the stages build them; and the stage's own outputs against the CPU's. (`cuda`:
    the device in CUDA's place, for a dry run of this function on a CPU.)"""
    from pipeline.layout import RunLayout
    from pipeline.sidecars import iter_proposals, read_region_labels
    from stages.label import label_job
    from stages.proposals import proposal_job
    from stages.resolve import rpn_checkpoint_path
    from trainer.offline.codecs import load_codec
    from trainer.offline.labels import label_batch, load_teacher, teacher_batches
    from trainer.offline.proposals import Proposer
    from trainer.offline.streaming import shard_batches

    layout = RunLayout.of(manifest)
    stage_proposals = list(itertools.islice(iter_proposals(layout.proposals, 0), images))
    stage_labels = read_region_labels(layout.labels, 0)
    tar = layout.shard_tar(0)
    devices = {"cuda": torch.device(cuda), "cpu": torch.device("cpu")}

    boxes = {}
    checkpoint = rpn_checkpoint_path(manifest, "proposals")
    for name, device in devices.items():
        job = proposal_job(manifest, checkpoint, device=str(device))
        job.precision = "fp32"
        proposer = Proposer(job)
        boxes[name] = []
        for batch in shard_batches(tar, stage_proposals, batch_size=job.batch_size, key_of=lambda p: p.key,
                                   pin=device.type == "cuda", read_to_end=False):
            boxes[name] += [b for b, _ in proposer.propose(batch.pixels, batch.sizes)]

    labels = {}
    job = label_job(manifest)
    job.precision = "fp32"
    codec = load_codec(job.codec_json)
    for name, device in devices.items():
        teacher = load_teacher(job, device)
        labels[name] = []
        for batch in teacher_batches(job, teacher, tar, stage_proposals, read_to_end=False):
            cols = label_batch(teacher, codec, batch.pixels, batch.sizes, [p.boxes for p in batch.items])
            labels[name] += [np.asarray(y) for y in cols["pseudo_label"]]

    stage_boxes = [p.boxes for p in stage_proposals]
    stage_top1 = [stage_labels[p.key].pseudo_label for p in stage_proposals]
    regions = int(sum(len(y) for y in labels["cpu"]))
    return {"images": len(stage_proposals), "regions": regions,
            "proposal_iou_cuda_fp32_vs_cpu": mean_box_agreement(boxes["cuda"], boxes["cpu"]),
            "top1_agreement_cuda_fp32_vs_cpu": top1_agreement(np.concatenate(labels["cuda"] or [[]]),
                                                               np.concatenate(labels["cpu"] or [[]])),
            "proposal_iou_stage_vs_cpu": mean_box_agreement(stage_boxes, boxes["cpu"]),
            "top1_agreement_stage_vs_cpu": top1_agreement(np.concatenate(stage_top1 or [[]]),
                                                          np.concatenate(labels["cpu"] or [[]])),
            "stage_precision": manifest.label.precision}


def comparison_failures(figures: dict) -> list[str]:
    """The comparison figures below their thresholds, as readable lines."""
    failures = []
    for name, value in figures.items():
        if name.startswith(("proposal_iou_", "top1_agreement_")):
            threshold = FP32_AGREEMENT if "_fp32_" in name else BF16_AGREEMENT
            if value < threshold:
                failures.append(f"{name} {value:.4f} < {threshold}")
    return failures


# -- NCCL: one process of a torchrun ---------------------------------------------------------------------------

def nccl_probe() -> dict:
    """Under torchrun: an NCCL process group on this rank's GPU (the trainer's choice of it), even for one
    process (the trainer forms one only from two ranks on), an all-reduce, one DDP step, the trainer's
    teardown."""
    import torch.distributed as dist
    from torch import nn

    from trainer.engine.device import distributed_timeout, end_distributed, rank_gpu

    device = rank_gpu()
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device, timeout=distributed_timeout())
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        value = torch.full((4,), float(rank + 1), device=device)
        dist.all_reduce(value)
        all_reduce_ok = bool(torch.all(value == world * (world + 1) / 2))
        model = nn.parallel.DistributedDataParallel(nn.Linear(8, 2).to(device), device_ids=[device.index])
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.randn(4, 8, device=device)).square().mean().backward()
        optimizer.step()
        dist.barrier()
    finally:
        end_distributed()
    return {"nccl_version": ".".join(map(str, torch.cuda.nccl.version())), "world_size": world,
            "all_reduce_ok": all_reduce_ok}


# -- the plan ---------------------------------------------------------------------------------------------------

@dataclass
class Step:
    name: str                       # e.g. "pipeline:label", "compare"
    group: str                      # one of STEPS
    command: list[str]
    timeout_s: float
    figures: bool = False           # its last JSON line holds figures for the summary
    needs: tuple[str, ...] = ()     # groups that must not have failed before it runs
    result: dict = field(default_factory=dict)


def run_folder(value: Optional[str]) -> Path:
    """The check's run folder: inside the repository's runs/ (never elsewhere)."""
    if value is None:
        return RUNS / "gpu-check" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = Path(value)
    path = (path if path.is_absolute() else Path.cwd() / path).resolve()
    if not path.is_relative_to(RUNS.resolve()):
        raise SystemExit(f"--run-dir {value}: the check writes inside {RUNS} only; name a folder there")
    return path


def demo_overrides(run_dir: Path, cpus: int) -> list[str]:
    """demo-small on the GPU: the run inside the check's folder, every training stage on CUDA, a local Ray
    with this machine's CPUs, and FAISS on both of the label stage's paths (concept search and the
    region index)."""
    return [f"output_dir={run_dir / 'demo-small'}", f"ray.num_cpus={cpus}",
            *(f"{section}.device=cuda" for section in TRAINING_SECTIONS),
            "label.faiss_threshold=1", "label.region_index=true"]


def pipeline_stages(overrides: list[str]) -> list[str]:
    """The enabled stages of demo-small up to and including transfer, in order."""
    from pipeline.config import load_manifest
    from stages.registry import PIPELINE

    manifest = load_manifest(MANIFEST, overrides)
    names = [stage.name for stage in PIPELINE]
    return [stage.name for stage in PIPELINE[:names.index(LAST_STAGE) + 1] if stage.is_enabled(manifest)]


def plan(steps: list[str], run_dir: Path, cpus: int) -> list[Step]:
    python, me = sys.executable, str(Path(__file__).resolve())
    overrides = demo_overrides(run_dir, cpus)
    sets = [a for o in overrides for a in ("--set", o)]
    torchrun = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    planned: list[Step] = []
    if "pipeline" in steps:
        for stage in pipeline_stages(overrides):
            if stage == "pretrain":
                command = [*torchrun, "-m", "stages.cli", "pretrain", str(MANIFEST), *sets]
            else:
                command = [python, "-m", "stages.cli", stage, str(MANIFEST), *sets]
            planned.append(Step(f"pipeline:{stage}", "pipeline", command, 240, needs=("pipeline",)))
    if "compare" in steps:
        planned.append(Step("compare", "compare", [python, me, "--child", "compare", "--run-dir", str(run_dir),
                                                   "--cpus", str(cpus)], 180, figures=True, needs=("pipeline",)))
    if "nccl" in steps:
        planned.append(Step("nccl", "nccl", [*torchrun, me, "--child", "nccl"], 120, figures=True))
    if "pytest" in steps:
        planned.append(Step("pytest", "pytest", [python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                                 str(REPO / "tests")], 300))
    if "bench" in steps:
        planned.append(Step("bench", "bench", [python, str(REPO / "bench" / "gpu.py"), "--work-dir",
                                               str(run_dir / "bench-gpu")], 300, figures=True))
    return planned


# -- running it ---------------------------------------------------------------------------------------------------

def last_json(text: str) -> Optional[dict]:
    """The last line of `text` that is a JSON object (a script's figures; launchers may print after it)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def run_step(step: Step, log: Path, timeout_s: float) -> dict:
    """Run one step's command (its own process group: a timeout ends Ray's and torchrun's children too),
    its output into `log`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    started = time.time()
    with open(log, "wb") as out:
        child = subprocess.Popen(step.command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            code = child.wait(timeout=timeout_s)
            status = "ok" if code == 0 else f"failed (exit status {code})"
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            status = f"timed out after {timeout_s:.0f} s"
    result = {"status": status, "seconds": round(time.time() - started, 1), "log": str(log.relative_to(REPO))}
    if step.figures:
        result["figures"] = last_json(log.read_text(errors="replace")) or {}
    return result


def machine_facts() -> dict:
    facts = {"cuda": True, "device": torch.cuda.get_device_name(0),
             "compute_capability": "{}.{}".format(*torch.cuda.get_device_capability(0)),
             "gpus": torch.cuda.device_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        facts["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        facts["driver"] = None
    try:
        from trainer.offline.faiss_gpu import faiss_gpus, installed_faiss_build

        facts["faiss_build"], facts["faiss_gpus"] = installed_faiss_build(), faiss_gpus()
    except Exception as err:  # noqa: BLE001 - a fact to report, not a reason to stop the check
        facts["faiss_build"], facts["faiss_gpus"] = f"unusable ({type(err).__name__}: {err})", 0
    return facts


def run_check(args, run_dir: Path, cpus: int) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    summary = {**machine_facts(), "run_dir": str(run_dir.relative_to(REPO)), "steps": {}, "figures": {}}
    print(f"gpu-check on {summary['device']} (compute capability {summary['compute_capability']}, driver "
          f"{summary['driver']}), torch {summary['torch']} (CUDA {summary['torch_cuda']}), FAISS "
          f"{summary['faiss_build']} on {summary['faiss_gpus']} GPU(s); run folder {summary['run_dir']}",
          flush=True)
    deadline = time.time() + args.budget_s
    failed_groups: set[str] = set()
    for step in plan(args.steps, run_dir, cpus):
        blocked = sorted(set(step.needs) & failed_groups)
        left = deadline - time.time()
        if blocked or left < 5:
            result = {"status": f"skipped ({'after a failed ' + ', '.join(blocked) if blocked else 'no time left'})"}
        else:
            result = run_step(step, run_dir / "logs" / f"{step.name.replace(':', '-')}.log", min(step.timeout_s, left))
        figures = result.pop("figures", {})
        if step.group == "compare" and result["status"] == "ok":
            failures = comparison_failures(figures)
            if failures:
                result["status"] = "failed (" + "; ".join(failures) + ")"
        if step.group == "nccl" and result["status"] == "ok" and not figures.get("all_reduce_ok"):
            result["status"] = "failed (the all-reduce gave a wrong sum)"
        if result["status"] != "ok":
            failed_groups.add(step.group)
        summary["steps"][step.name] = result
        summary["figures"].update({k: v for k, v in figures.items() if k not in ("device", "cuda")})
        print(f"  {step.name:<24} {result['status']}" + (f"  ({result['seconds']} s, {result['log']})"
                                                         if "seconds" in result else ""), flush=True)
    summary["ok"] = not failed_groups
    summary["seconds"] = round(args.budget_s - (deadline - time.time()), 1)
    for name, value in summary["figures"].items():
        print(f"  {name:<40} {value:.4f}" if isinstance(value, float) else f"  {name:<40} {value}")
    print(f"gpu-check: {'every step passed' if summary['ok'] else 'FAILED: ' + ', '.join(sorted(failed_groups))} "
          f"in {summary['seconds']} s; {summary['run_dir']}/summary.json", flush=True)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated, in this order: " + ", ".join(STEPS))
    parser.add_argument("--run-dir", default=None, help="the check's folder, inside runs/ (default: "
                        "runs/gpu-check/<UTC date-time>); compare reads the pipeline's run there")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="seconds for the whole check (steps "
                        "left when it is spent are skipped)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the local Ray")
    parser.add_argument("--plan", action="store_true", help="print the steps and their commands, run nothing")
    parser.add_argument("--child", choices=("compare", "nccl"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(args.steps) - set(STEPS))
    if unknown:
        parser.error(f"--steps {','.join(unknown)}: expected some of {', '.join(STEPS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    run_dir = run_folder(args.run_dir)
    if args.plan:
        for step in plan(args.steps, run_dir, args.cpus):
            print(f"{step.name}: {' '.join(step.command)}  (timeout {step.timeout_s:.0f} s)")
        return 0
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}, built for CUDA {torch.version.cuda}): nothing to check. Run it on a "
              "machine with an NVIDIA GPU and a driver for that CUDA version (docs/cluster.md, GPU notes).")
        print(json.dumps({"cuda": False, "ok": True, "torch": torch.__version__, "torch_cuda": torch.version.cuda}))
        return 0
    if args.child == "compare":
        from pipeline.config import load_manifest

        print(json.dumps(compare_cuda_with_cpu(load_manifest(MANIFEST, demo_overrides(run_dir, args.cpus)))))
        return 0
    if args.child == "nccl":
        print(json.dumps(nccl_probe()))
        return 0
    return run_check(args, run_dir, args.cpus)


if __name__ == "__main__":
    raise SystemExit(main())
