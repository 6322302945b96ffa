"""The demo's results table over several seeds: mean and spread of every headline figure.

Runs `regionclip run MANIFEST` once per seed (the world, the teacher, the RPN, pretraining and transfer
all re-seeded: `--set seed=S synth.seed=S pretrain.seed=S transfer.seed=S`), each in its own output
folder and its own process, then prints one row per seed, the mean and standard deviation of each
figure, and the two margins the demo claims (student - teacher on novel-region top-1, and on transfer
novel AP50). Finished seeds are not rerun (the stages resume).

    python bench/demo_seeds.py                       # manifests/demo.yaml, seeds 0 1 2 (~1 h on 2 cores)
    python bench/demo_seeds.py --quick               # manifests/demo-small.yaml (minutes)
    python bench/demo_seeds.py --seeds 3 4 --out /tmp/seeds --set pretrain.steps=600

The last line is one JSON object (the project's convention for bench figures).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

LONG = True     # an hour or more: bench/report.py runs it only with --full or --only

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from trainer.evaluation import headline_figures  # noqa: E402

# The headline figures shown per seed (short names for the table).
COLUMNS = {
    "region_top1_novel_teacher": "top1 nov T", "region_top1_novel_pretrain": "top1 nov S",
    "region_top1_base_teacher": "top1 base T", "region_top1_base_pretrain": "top1 base S",
    "gt_ap50_novel_teacher": "GT AP50 nov T", "gt_ap50_novel_pretrain": "GT AP50 nov S",
    "transfer_ap50_novel_teacher": "det nov T", "transfer_ap50_novel_pretrain": "det nov S",
    "transfer_ap50_base_teacher": "det base T", "transfer_ap50_base_pretrain": "det base S",
    "transfer_ap50_all_teacher": "det all T", "transfer_ap50_all_pretrain": "det all S",
    "margin_region_top1_novel": "margin top1 nov", "margin_transfer_ap50_novel": "margin det nov",
}
CLAIMS = {"margin_region_top1_novel": 10.0, "margin_transfer_ap50_novel": 3.0}


def run_seed(manifest: Path, seed: int, out: Path, extra: list[str]) -> dict:
    sets = [f"output_dir={out}", f"seed={seed}", f"synth.seed={seed}", f"pretrain.seed={seed}",
            f"transfer.seed={seed}", *extra]
    cmd = [sys.executable, "-m", "stages.cli", "run", str(manifest)]
    for s in sets:
        cmd += ["--set", s]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if code != 0:
        raise SystemExit(f"seed {seed}: `regionclip run` failed with exit code {code}; see {log}")
    summary = json.loads((out / "eval" / "summary.json").read_text())
    figures = headline_figures(summary["evaluate"])
    return {"seed": seed, **figures, "wall_s": round(time.time() - started, 1), "cpu_s": round(cpu, 1)}


def mean_spread(values: list) -> tuple:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return round(statistics.fmean(values), 2), round(statistics.stdev(values), 2) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default=None, help="default: manifests/demo.yaml "
                        "(manifests/demo-small.yaml with --quick)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="the small world of tests/test_demo_direction.py")
    parser.add_argument("--out", default=None, help="parent folder of the per-seed runs "
                        "(default: runs/bench-demo-seeds[-quick])")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="extra manifest overrides for every seed")
    args = parser.parse_args()
    manifest = Path(args.manifest or REPO / "manifests" / ("demo-small.yaml" if args.quick else "demo.yaml"))
    out = Path(args.out or REPO / "runs" / ("bench-demo-seeds-quick" if args.quick else "bench-demo-seeds"))

    rows = []
    width = max(len(c) for c in COLUMNS.values())
    for seed in args.seeds:
        row = run_seed(manifest.resolve(), seed, out.resolve() / f"seed{seed}", args.overrides)
        rows.append(row)
        print(f"seed {seed}: " + ", ".join(f"{COLUMNS[k]} {row[k]}" for k in COLUMNS)
              + f" ({row['wall_s']} s wall, {row['cpu_s']} s CPU)", flush=True)

    print(f"\n{manifest.name}, seeds {args.seeds}: mean +- standard deviation (T = teacher, S = student)")
    stats = {}
    for key, name in COLUMNS.items():
        mean, spread = mean_spread([r[key] for r in rows])
        stats[key] = {"mean": mean, "std": spread}
        print(f"  {name.ljust(width)}  {mean} +- {spread}")
    claims = {}
    for key, need in CLAIMS.items():
        mean = stats[key]["mean"]
        claims[key] = {"need": need, "mean": mean, "holds": mean is not None and mean >= need}
        print(f"claim {COLUMNS[key]} >= {need}: mean {mean} -> {'holds' if claims[key]['holds'] else 'FAILS'}")
    print(json.dumps({"manifest": manifest.name, "seeds": args.seeds,
                      **{f"{k}_mean": v["mean"] for k, v in stats.items()},
                      **{f"{k}_std": v["std"] for k, v in stats.items()},
                      "claims_hold": all(c["holds"] for c in claims.values()),
                      "wall_s_per_seed": [r["wall_s"] for r in rows], "cpu_s_per_seed": [r["cpu_s"] for r in rows],
                      "per_seed": rows}))


if __name__ == "__main__":
    main()
