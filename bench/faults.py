"""Fault injection for every stage: SIGKILL at seeded moments, then a rerun; does it match?

For each stage of the pipeline in order (shard, concepts, train-teacher, embed, train-rpn, proposals,
label, pretrain, transfer, evaluate) on a tiny synthetic world (tiny models, CPU): the stage runs
uninterrupted (the reference), its outputs are removed, it is killed with SIGKILL `--kills` times at
seeded moments (tests/faultkit.py), then rerun to the end; the outputs must equal the reference (same
files, Parquet rows, bytes), and after every kill each shard marker must vouch only for complete files.

    python bench/faults.py [--quick] [--kills 5] [--images 16] [--stages shard,concepts]

Prints one line per stage and, last, one JSON object: per stage kills, interrupted (the kill landed
while the stage was still running), matched, differences and seconds.
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
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from tests.faultkit import all_stages, kill_and_resume, world_manifest  # noqa: E402

LONG = True     # an hour or more: bench/report.py runs it only with --full or --only

ALL_STAGES = all_stages()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 kills per stage, the cheap stages only")
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--per-shard", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", default=",".join(ALL_STAGES))
    ap.add_argument("--own-ray", action="store_true",
                    help="every stage process starts its own local Ray (default: all join one Ray started here)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    stages = args.stages.split(",")
    kills = args.kills
    if args.quick:
        kills = min(kills, 2)
        stages = [s for s in stages if s in ("shard", "concepts", "proposals")]

    work = Path(args.workdir or tempfile.mkdtemp(prefix="faults-"))
    path = world_manifest(work, images=args.images, per_shard=args.per_shard)
    log = work / "stages.log"
    address = None
    if not args.own_ray:
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        address = ray.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if address:
        env["RAY_ADDRESS"] = address
    # The synth stage first (its kills are not part of this bench).
    subprocess.run([sys.executable, "-m", "stages.cli", "synth", str(path)], cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"faults: world of {args.images} images in {work}; {kills} kills per stage; log {log}", flush=True)
    results = {}
    started = time.time()
    for i, stage in enumerate(ALL_STAGES):
        if stage not in stages:
            if i < max(ALL_STAGES.index(s) for s in stages):  # still needed upstream
                subprocess.run([sys.executable, "-m", "stages.cli", stage, str(path)], cwd=REPO, env=env,
                               check=True, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
            continue
        try:
            r = kill_and_resume(stage, path, kills=kills, seed=args.seed + i, log=log, ray_address=address)
        except Exception as err:  # noqa: BLE001 - a stage that cannot run is reported, the rest go on
            results[stage] = {"error": f"{type(err).__name__}: {str(err)[-800:]}"}
            print(f"{stage:14s} ERROR {results[stage]['error'][:300]}", flush=True)
            break
        results[stage] = {k: r[k] for k in ("kills", "interrupted", "outputs", "compared", "matched",
                                            "differences", "untruthful_markers", "reference_s", "kills_s",
                                            "resume_s")}
        results[stage]["kill_moments_s"] = [m["after_s"] for m in r["moments"]]
        print(f"{stage:14s} kills {r['kills']} (interrupted {r['interrupted']})  outputs {r['outputs']:3d}  "
              f"matched {r['matched']}  ref {r['reference_s']}s  resume {r['resume_s']}s"
              + (f"  differences {r['differences'][:5]}" if r["differences"] else ""), flush=True)
    summary = {"stages_tested": len([s for s in results if "error" not in results[s]]),
               "stages_matched": sum(1 for v in results.values() if v.get("matched")),
               "kills_total": sum(v.get("kills", 0) for v in results.values()),
               "kills_interrupting": sum(v.get("interrupted", 0) for v in results.values()),
               "images": args.images, "kills_per_stage": kills, "seconds": round(time.time() - started, 1),
               "per_stage": results}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
