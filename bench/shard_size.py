"""Shard size against speed and memory: `proposals` and `label` on the same photos, once in small shards and
once in shards `--factor` times larger, with the same pool of actors.

    python bench/shard_size.py --quick       # tiny models at 512/853, 80 photos in shards of 4 and 40 (~5 min)
    python bench/shard_size.py               # tiny models at 800/1333, 400 photos in shards of 20 and 200
    python bench/shard_size.py --shards-in-flight 2     # the pool as it was: two shards queued per actor

Setting (bench/_photo_run.py): 1333x1000 camera-like JPEG photos, random-weight tiny models (RN50-tiny
teacher, its res4 RPN), `--actors` actors (default 2) sharing the machine's CPUs, fp32, label codec fp16.
Each stage runs in a child process of its own (a local Ray started before the clock), alternately on
the small and the large shards (small, large, then large, small, ...), so that a host whose speed drifts
weighs on both sides alike; the ratios are of the summed times of the two sides.
  - speed ratio: small-shard seconds / large-shard seconds of `stages.X.run` (actor start-up included);
    goal >= 0.9;
  - busy: the actors' seconds inside their shards (`NNNNN_stats.json`) over actors x the stage's seconds;
    where shards are large, one actor working while another idles shows here first;
  - actor seconds per image: those seconds over the images; a per-shard cost that grows with the shard's
    size (reading the tar, writing sidecars and markers) would raise the large side's;
  - timeline: when each shard ran, from its marker (written as the shard ends) and its seconds; the work
    span (first shard's start to last shard's end) leaves the actors' start-up out, which a busy host
    stretches a lot; its ratio is reported too;
  - memory (bench/memory.py's reading of the child's process tree, Ray's daemons and actors included):
    largest process (an actor) and tree, large / small; goal <= 1.15.
Prints readable lines, then (last line) one JSON object. Figures, never pass/fail.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

STAGES = ("proposals", "label")


def shard_timeline(folder, started: float) -> list[dict]:
    """Each shard's (start, end) in seconds since `started`: its marker is written as it ends."""
    from pipeline.sidecars import sidecar_shards

    out = []
    for s in sidecar_shards(folder):
        path = folder.stats(s)
        end = path.stat().st_mtime - started
        out.append({"shard": s, "start": round(end - json.loads(path.read_text())["seconds"], 2),
                    "end": round(end, 2)})
    return sorted(out, key=lambda r: r["start"])


def run_child(stage: str, root: Path, shards_in_flight: int | None) -> dict:
    """One measured run of `stage` on the prepared run at `root` (its earlier output removed first)."""
    import pipeline.ray_runtime as ray_runtime
    from pipeline.config import load_manifest
    from pipeline.layout import RunLayout
    from stages import label, proposals

    if shards_in_flight is not None:
        ray_runtime.SHARDS_IN_FLIGHT_PER_ACTOR = shards_in_flight
    manifest = load_manifest(root / "manifest.yaml")
    layout = RunLayout.of(manifest)
    folder = layout.proposals if stage == "proposals" else layout.labels
    shutil.rmtree(folder.root, ignore_errors=True)
    ray_runtime.init_ray(manifest.ray)
    started = time.time()
    (proposals if stage == "proposals" else label).run(manifest)
    seconds = time.time() - started
    timeline = shard_timeline(folder, started)
    actors = getattr(manifest, stage).num_actors
    inside = sum(r["end"] - r["start"] for r in timeline)
    return {"seconds": round(seconds, 2), "inside_shards_seconds": round(inside, 2),
            "busy": round(inside / (actors * seconds), 3), "timeline": timeline}


def prepare_runs(tmp: Path, args, models) -> dict[str, Path]:
    """The two run folders (shards, weights, concepts) over one photo folder; label's input (proposals)
    comes from the measured proposals runs, or is made here when proposals is not measured."""
    from bench._photo_run import prepare, write_photos
    from stages import proposals

    photos = tmp / "photos"
    write_photos(photos, args.images, (1333, 1000))
    cpus = max(1, (os.cpu_count() or 1) // args.actors)
    roots = {}
    for name, per_shard in (("small", args.small_shard), ("large", args.small_shard * args.factor)):
        roots[name] = tmp / name
        manifest = prepare(roots[name], images=args.images, per_shard=per_shard, size=(1333, 1000), models=models,
                           num_actors=args.actors, cpus_per_actor=cpus, photos=photos)
        if "proposals" not in args.stages.split(","):
            proposals.run(manifest)
    return roots


def describe(timeline: list[dict]) -> str:
    return " ".join(f"{r['shard']}:{r['start']:.0f}-{r['end']:.0f}" for r in timeline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="80 photos, shards of 4 and 40, models at 512/853")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--small-shard", type=int, default=20, help="photos per small shard")
    parser.add_argument("--factor", type=int, default=10, help="how much larger the large shards are")
    parser.add_argument("--actors", type=int, default=2, help="actors per stage (they share the CPUs)")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each side (default 2; quick 1)")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--shards-in-flight", type=int, default=None,
                        help="override pipeline.ray_runtime.SHARDS_IN_FLIGHT_PER_ACTOR (e.g. 2: the old pool)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, Path(args.root), args.shards_in_flight)))
        return

    from bench._photo_run import TINY, with_the_actors_allocator
    from bench.memory import measure

    with_the_actors_allocator()
    if args.quick:
        args.images, args.small_shard = 80, 4
    repeats = args.repeats or (1 if args.quick else 2)
    models = dataclasses.replace(TINY, min_size=512, max_size=853) if args.quick else TINY
    load_start = open("/proc/loadavg").read().strip()
    print(f"load average at start: {load_start} ({os.cpu_count()} CPUs); {args.images} photos 1333x1000, shards "
          f"of {args.small_shard} and {args.small_shard * args.factor}, {args.actors} actors, tiny models at "
          f"{models.min_size}/{models.max_size}", flush=True)
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-shard-size-") as tmp:
        roots = prepare_runs(Path(tmp), args, models)
        for stage in sorted(args.stages.split(","), key=STAGES.index):     # proposals first: label's input
            runs: dict[str, list[dict]] = {"small": [], "large": []}
            for r in range(2 * repeats):
                name = ("small", "large")[(r + r // 2) % 2]      # small, large, large, small, small, ...
                command = [sys.executable, __file__, f"--child={stage}", f"--root={roots[name]}"]
                if args.shards_in_flight is not None:
                    command.append(f"--shards-in-flight={args.shards_in_flight}")
                run = measure(command)
                runs[name].append(run)
                rep = run["report"]
                print(f"{stage:9s} {name:5s}: {args.images / rep['seconds']:6.2f} images/s ({rep['seconds']:6.1f} s), "
                      f"actors busy {rep['busy']:.2f} ({rep['inside_shards_seconds'] / args.images:.2f} actor s "
                      f"per image), largest process {run['largest_process_mib']:7.1f} MiB, tree "
                      f"{run['tree_mib']:7.1f} MiB; shards start-end s: {describe(rep['timeline'])}", flush=True)
            seconds = {n: sum(r["report"]["seconds"] for r in v) for n, v in runs.items()}
            peak = {n: {w: max(r[f"{w}_mib"] for r in v) for w in ("largest_process", "tree")} for n, v in runs.items()}
            speed = seconds["small"] / seconds["large"]
            span = {n: sum(max(t["end"] for t in r["report"]["timeline"]) - r["report"]["timeline"][0]["start"]
                           for r in v) for n, v in runs.items()}
            memory = {w: peak["large"][w] / peak["small"][w] for w in ("largest_process", "tree")}
            figures[stage] = {
                "small_images_per_s": round(args.images * repeats / seconds["small"], 3),
                "large_images_per_s": round(args.images * repeats / seconds["large"], 3),
                "ratio_speed_large_vs_small": round(speed, 3),
                "ratio_work_span_large_vs_small": round(span["small"] / span["large"], 3),
                **{f"actor_seconds_per_image_{n}": round(sum(r["report"]["inside_shards_seconds"] for r in v)
                                                         / (args.images * repeats), 3) for n, v in runs.items()},
                "busy_small": [r["report"]["busy"] for r in runs["small"]],
                "busy_large": [r["report"]["busy"] for r in runs["large"]],
                "ratio_largest_process_memory_large_vs_small": round(memory["largest_process"], 3),
                "ratio_tree_memory_large_vs_small": round(memory["tree"], 3),
                "largest_process_mib_small": peak["small"]["largest_process"],
                "largest_process_mib_large": peak["large"]["largest_process"]}
            print(f"{stage:9s} large/small: speed {speed:.3f} (goal >= 0.9; work span only "
                  f"{span['small'] / span['large']:.3f}), memory: largest process "
                  f"{memory['largest_process']:.3f}, tree {memory['tree']:.3f} (goal <= 1.15)", flush=True)
    load_end = open("/proc/loadavg").read().strip()
    print(f"load average at end: {load_end}")
    figures.update(images=args.images, small_shard=args.small_shard, factor=args.factor, actors=args.actors,
                   repeats=repeats, scale=f"{models.min_size}/{models.max_size}", cpus=os.cpu_count(),
                   shards_in_flight_per_actor=args.shards_in_flight or _project_setting(),
                   load_average_start=load_start, load_average_end=load_end)
    print(json.dumps(figures))


def _project_setting() -> int:
    from pipeline.ray_runtime import SHARDS_IN_FLIGHT_PER_ACTOR

    return SHARDS_IN_FLIGHT_PER_ACTOR


if __name__ == "__main__":
    main()
