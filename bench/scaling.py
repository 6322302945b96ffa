"""Scale: shard, label and one pretrain epoch on a corpus and on one 4x larger.

Each measured stage runs as its own process (with its own local Ray, so its Ray workers are its
descendants); wall time and the peak resident memory of the whole process tree (driver + Ray daemons
+ workers, summed from /proc every 0.1 s) are recorded. Linear time gives a time ratio of 4; streaming
(memory independent of the corpus size) gives a peak-memory ratio of about 1. The stage's own
`seconds` (from its manifest; excludes the interpreter start) are reported too: a fixed start-up cost
(Python imports, Ray start, model loading) pulls the wall-time ratio below 4 on small corpora, so
the two points are also split into `fixed_s` + `per_image_ms` x images.

World: the synthetic world with tiny models (RN50-tiny teacher, clip_res4 RPN, random weights),
4 images per shard, so the larger corpus has 4x the shards. Upstream stages (concepts, embed,
proposals) run unmeasured.

    python bench/scaling.py [--quick] [--images 24] [--factor 4]

Last line: one JSON object with per-stage seconds, peak MiB and the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

MEASURED = ["shard", "label", "pretrain"]
UNMEASURED_BEFORE = {"label": ["concepts", "embed", "proposals"]}


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and all its descendants (VmRSS summed; shared pages count per process)."""
    kids, total, stack, seen = _children(), 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        stack += kids.get(p, [])
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def measure(cmd: list[str], env: dict, log: Path) -> dict:
    started = time.time()
    peak = 0
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            peak = max(peak, tree_rss_bytes(proc.pid))
            time.sleep(0.1)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}; see {log}")
    return {"wall_s": round(time.time() - started, 2), "peak_rss_mib": round(peak / 2 ** 20, 1)}


def manifest_text(images: int, per_shard: int) -> str:
    from tests.faultkit import world_manifest

    with tempfile.TemporaryDirectory() as d:
        return world_manifest(Path(d), images=images, per_shard=per_shard, val_images=0).read_text()


def run_size(folder: Path, images: int, per_shard: int, batch: int, log: Path) -> dict:
    from pipeline.config import load_manifest
    from pipeline.io import read_json
    from pipeline.layout import RunLayout
    from tests.labelkit import make_rpn, make_teacher

    folder.mkdir(parents=True, exist_ok=True)
    steps = max(1, images // batch)  # one epoch
    text = manifest_text(images, per_shard).replace(
        "pretrain: {steps: 6, batch_size: 4,", f"pretrain: {{steps: {steps}, batch_size: {batch},").replace(
        "checkpoint_every: 2", f"checkpoint_every: {steps}")
    text = text.replace("train_teacher: {enabled: true", "train_teacher: {enabled: false").replace(
        "train_rpn: {enabled: true", "train_rpn: {enabled: false")
    path = folder / "world.yaml"
    path.write_text(text)
    layout = RunLayout.of(load_manifest(path))
    make_teacher(layout)
    make_rpn(layout)
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "local"}
    py = [sys.executable, "-m"]
    subprocess.run(py + ["stages.cli", "synth", str(path)], cwd=REPO, env=env, check=True,
                   stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    out = {"images": images, "shards": -(-images // per_shard), "pretrain_steps": steps}
    for stage in MEASURED:
        for before in UNMEASURED_BEFORE.get(stage, []):
            subprocess.run(py + ["stages.cli", before, str(path)], cwd=REPO, env=env, check=True,
                           stdout=open(log, "ab"), stderr=subprocess.STDOUT)
        r = measure(py + [f"stages.{stage}", str(path)], env, log)
        manifest = read_json(layout.stage(stage).manifest)
        r["stage_s"] = manifest.get("seconds")
        out[stage] = r
        print(f"  {images:5d} images  {stage:9s} wall {r['wall_s']:7.1f}s  stage {r['stage_s']}s  "
              f"peak {r['peak_rss_mib']:7.1f} MiB", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 and 32 images")
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--per-shard", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4, help="pretrain batch size (one epoch = images / batch steps)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    small = 8 if args.quick else args.images
    large = small * args.factor
    work = Path(args.workdir or tempfile.mkdtemp(prefix="scaling-"))
    log = work / "stages.log"
    work.mkdir(parents=True, exist_ok=True)
    print(f"scaling: {small} vs {large} images ({args.per_shard} per shard) on {os.cpu_count()} CPUs, "
          f"{platform.machine()}; log {log}", flush=True)
    a = run_size(work / f"n{small}", small, args.per_shard, args.batch, log)
    b = run_size(work / f"n{large}", large, args.per_shard, args.batch, log)
    result = {"images_small": small, "images_large": large, "factor": args.factor}
    for stage in MEASURED:
        ra, rb = a[stage], b[stage]
        result[f"{stage}_seconds_small"] = ra["wall_s"]
        result[f"{stage}_seconds_large"] = rb["wall_s"]
        result[f"{stage}_time_ratio"] = round(rb["wall_s"] / ra["wall_s"], 2)
        if ra.get("stage_s") and rb.get("stage_s"):
            result[f"{stage}_stage_time_ratio"] = round(rb["stage_s"] / ra["stage_s"], 2)
        # t = fixed + per_image * n through the two points: the start-up cost and the marginal cost
        per_image = (rb["wall_s"] - ra["wall_s"]) / (large - small)
        result[f"{stage}_per_image_ms"] = round(1000 * per_image, 1)
        result[f"{stage}_fixed_s"] = round(ra["wall_s"] - per_image * small, 1)
        result[f"{stage}_peak_rss_mib_small"] = ra["peak_rss_mib"]
        result[f"{stage}_peak_rss_mib_large"] = rb["peak_rss_mib"]
        result[f"{stage}_peak_memory_ratio"] = round(rb["peak_rss_mib"] / ra["peak_rss_mib"], 2)
        print(f"{stage:9s} time ratio {result[f'{stage}_time_ratio']:5.2f} (stage's own "
              f"{result.get(f'{stage}_stage_time_ratio')}; linear = {args.factor})   peak-memory ratio "
              f"{result[f'{stage}_peak_memory_ratio']:5.2f} (streaming ~ 1)", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
