"""The demo's claim over a grid of seeds x PyTorch thread counts, with intervals: writes docs/results.md.

Runs `regionclip run MANIFEST` once per (seed, threads) (the world, the teacher, the RPN, pretraining and
transfer all re-seeded: `--set seed=S synth.seed=S pretrain.seed=S transfer.seed=S`; OMP_NUM_THREADS=T,
which reorders float sums and so gives another run of the same seed), each in its own output folder and
process. Every run's evaluate stage gives each student - teacher margin with a 95% interval (a paired
bootstrap over its held-out images, trainer/evaluation.py). Then it prints one row per run, the mean of
each margin over the runs with an interval, and whether the demo's claim holds:

- every run's novel-region top-1 margin has its 95% lower bound above 0, and their mean is >= 10;
- the mean transfer novel AP50 margin is >= 3, with its 95% interval above 0.

The interval of a mean over runs combines the runs' bootstrap intervals (normal approximation: each
run's standard error is its interval's width / (2 x 1.96)); the spread between runs (standard
deviation, smallest margin) is printed beside it, since it is what a new seed or CPU would move.

Finished runs are not rerun (the stages skip what is complete), so an interrupted grid resumes. With
`--write-results` the table replaces the generated part of docs/results.md (between its markers; the
rest of the page is kept), with the machine (CPU model, cores), the commit of every run and the date.

    python bench/demo_seeds.py --write-results            # seeds 0 1 2 x threads 1 2 (6 demo runs, ~1.5 h quiet)
    python bench/demo_seeds.py --quick                    # manifests/demo-small.yaml, seeds 0 1 2, default threads
    python bench/demo_seeds.py --seeds 3 4 --threads 2 --out /tmp/seeds --set pretrain.steps=600
    python bench/demo_seeds.py --report-only --write-results --out /tmp/seeds   # the runs finished so far

The last line is one JSON object (the project's convention for bench figures).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

LONG = True     # an hour or more: bench/report.py runs it only with --full or --only

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from bench._machine import cpu_model  # noqa: E402

from trainer.evaluation import headline_figures  # noqa: E402

RESULTS_MD = REPO / "docs" / "results.md"
BEGIN, END = "<!-- bench/demo_seeds.py: begin -->", "<!-- bench/demo_seeds.py: end -->"
Z95 = 1.959964      # the normal 97.5% quantile: an interval's width is 2 x Z95 standard errors

# The headline figures shown per run (short names for the printed table).
COLUMNS = {
    "region_top1_novel_teacher": "top1 nov T", "region_top1_novel_pretrain": "top1 nov S",
    "region_top1_base_teacher": "top1 base T", "region_top1_base_pretrain": "top1 base S",
    "gt_ap50_novel_teacher": "GT AP50 nov T", "gt_ap50_novel_pretrain": "GT AP50 nov S",
    "transfer_ap50_novel_teacher": "det nov T", "transfer_ap50_novel_pretrain": "det nov S",
    "transfer_ap50_base_teacher": "det base T", "transfer_ap50_base_pretrain": "det base S",
    "transfer_ap50_all_teacher": "det all T", "transfer_ap50_all_pretrain": "det all S",
    "margin_region_top1_novel": "margin top1 nov", "margin_region_top1_base": "margin top1 base",
    "margin_gt_ap50_novel": "margin GT AP50 nov", "margin_gt_ap50_base": "margin GT AP50 base",
    "margin_transfer_ap50_novel": "margin det nov",
    "margin_transfer_ap50_base": "margin det base", "margin_transfer_ap50_all": "margin det all",
}
MARGINS = ("margin_region_top1_novel", "margin_region_top1_base", "margin_gt_ap50_novel",
           "margin_gt_ap50_base", "margin_transfer_ap50_novel", "margin_transfer_ap50_base",
           "margin_transfer_ap50_all")
CLAIMS = {"margin_region_top1_novel": 10.0, "margin_transfer_ap50_novel": 3.0}


def git_commit() -> str:
    """The commit of the code that made the figures, `+changes` when the pipeline's code or manifests
    differ from it (bench/ and docs/ do not change a figure)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "pipeline",
                                "stages", "trainer", "manifests", "pyproject.toml"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return out + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_one(manifest: Path, seed: int, threads: Optional[int], out: Path, extra: list[str]) -> dict:
    """One `regionclip run` (skipped stages cost nothing); its figures, commit and times. A run's record
    (`<out>.json`) keeps the commit and times of the run that did the work, so a resumed grid reports them."""
    sets = [f"output_dir={out}", f"seed={seed}", f"synth.seed={seed}", f"pretrain.seed={seed}",
            f"transfer.seed={seed}", *extra]
    cmd = [sys.executable, "-m", "stages.cli", "run", str(manifest)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(name, None)
        if threads is not None:
            env[name] = str(threads)
    # waiting OpenMP threads sleep instead of spinning: on a busy host spinning threads slow a run
    # several-fold; the results do not change
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    record_path = out.with_suffix(".json")
    summary_path = out / "eval" / "summary.json"
    previous = json.loads(record_path.read_text()) if record_path.is_file() and summary_path.is_file() else None
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        raise SystemExit(f"seed {seed}, threads {threads}: `regionclip run` failed with exit code {code}; see {log}")
    summary = json.loads(summary_path.read_text())
    figures = headline_figures(summary["evaluate"])
    wall = round(time.time() - started, 1)
    record = {"seed": seed, "threads": threads, **figures, "commit": git_commit(), "wall_s": wall,
              "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
              "finished": datetime.datetime.now().isoformat(timespec="seconds")}
    if previous is not None and wall < 0.5 * previous.get("wall_s", 0):
        # nothing was left to do: keep the record of the run that did the work
        record.update({k: previous[k] for k in ("commit", "wall_s", "cpu_s", "finished") if k in previous})
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def standard_error(interval: Optional[list]) -> Optional[float]:
    return None if not interval else (interval[1] - interval[0]) / (2 * Z95)


def mean_with_interval(rows: list[dict], key: str) -> dict:
    """Mean of a margin over the runs, its 95% interval from the runs' bootstrap intervals, and the
    spread between runs."""
    values = [r[key] for r in rows if r.get(key) is not None]
    if not values:
        return {"mean": None, "ci95": None, "std": None, "min": None}
    mean = statistics.fmean(values)
    errors = [standard_error(r.get(f"{key}_ci95")) for r in rows if r.get(key) is not None]
    ci = None
    if all(e is not None for e in errors):
        se = math.sqrt(sum(e * e for e in errors)) / len(errors)
        ci = [round(mean - Z95 * se, 2), round(mean + Z95 * se, 2)]
    return {"mean": round(mean, 2), "ci95": ci, "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
            "min": round(min(values), 2)}


def claims_of(rows: list[dict], stats: dict) -> dict:
    region, transfer = stats["margin_region_top1_novel"], stats["margin_transfer_ap50_novel"]
    lows = [(r.get("margin_region_top1_novel_ci95") or [None])[0] for r in rows]
    every_low_above_0 = all(low is not None and low > 0 for low in lows)
    return {
        "region_top1_novel": {"need": "every run's 95% lower bound > 0 and mean >= 10",
                              "lower_bounds": lows, "mean": region["mean"],
                              "holds": every_low_above_0 and region["mean"] is not None and region["mean"] >= 10},
        "transfer_ap50_novel": {"need": "mean >= 3 with its 95% interval above 0", "mean": transfer["mean"],
                                "ci95": transfer["ci95"],
                                "holds": transfer["mean"] is not None and transfer["mean"] >= 3
                                and transfer["ci95"] is not None and transfer["ci95"][0] > 0}}


def fmt(value, interval=None, signed=True) -> str:
    if value is None:
        return "-"
    text = f"{value:+.1f}" if signed else f"{value:.1f}"
    return text + ("" if not interval else f" [{interval[0]:+.1f}, {interval[1]:+.1f}]")


def results_markdown(manifest: Path, rows: list[dict], stats: dict, claims: dict, complete: bool,
                     planned: int) -> str:
    commits = sorted({r["commit"] for r in rows})
    dates = sorted(r["finished"][:10] for r in rows)
    lines = [BEGIN, "",
             f"`python bench/demo_seeds.py --write-results`: `{manifest.name}`, {len(rows)} of {planned} runs"
             + ("" if complete else " (the grid is not complete)") + f"; machine: {cpu_model()}, "
             f"{os.cpu_count()} cores; commit {', '.join(commits)}; {dates[0]}"
             + (f" to {dates[-1]}" if dates[-1] != dates[0] else "") + ".", "",
             "Margins are student (region-pretrained) - teacher (image-level CLIP); [low, high] is the 95% "
             "interval of a paired bootstrap over the held-out images (1000 draws). Region figures use the "
             "ground-truth boxes.", "",
             "| seed | threads | novel regions / images | top-1 novel T -> S | margin top-1 novel | margin top-1 base "
             "| margin GT AP50 novel | transfer AP50 novel T -> S | margin transfer novel | margin transfer all "
             "| wall / CPU |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['threads'] or 'default'} | {r['novel_regions']} / {r['images']} | "
            f"{fmt(r['region_top1_novel_teacher'], signed=False)} -> {fmt(r['region_top1_novel_pretrain'], signed=False)} | "
            f"{fmt(r['margin_region_top1_novel'], r['margin_region_top1_novel_ci95'])} | "
            f"{fmt(r['margin_region_top1_base'], r['margin_region_top1_base_ci95'])} | "
            f"{fmt(r['margin_gt_ap50_novel'], r['margin_gt_ap50_novel_ci95'])} | "
            f"{fmt(r['transfer_ap50_novel_teacher'], signed=False)} -> {fmt(r['transfer_ap50_novel_pretrain'], signed=False)} | "
            f"{fmt(r['margin_transfer_ap50_novel'], r['margin_transfer_ap50_novel_ci95'])} | "
            f"{fmt(r['margin_transfer_ap50_all'], r['margin_transfer_ap50_all_ci95'])} | "
            f"{r['wall_s'] / 60:.0f} / {r['cpu_s'] / 60:.0f} min |")
    lines += ["", "Over the runs: mean [95% interval of the mean], standard deviation between runs, smallest run:", "",
              "| margin | mean [95%] | sd between runs | smallest |", "|---|---:|---:|---:|"]
    for key in MARGINS:
        s = stats[key]
        spread = "-" if s["std"] is None or len(rows) < 2 else f"{s['std']:.1f}"
        lines.append(f"| {COLUMNS[key].replace('margin ', '')} | {fmt(s['mean'], s['ci95'])} | {spread} | "
                     f"{fmt(s['min'])} |")
    r, t = claims["region_top1_novel"], claims["transfer_ap50_novel"]
    lows = ", ".join("-" if v is None else f"{v:+.1f}" for v in r["lower_bounds"])
    so_far = "" if complete else f" so far ({len(rows)} of {planned} runs)"

    def verdict(holds: bool) -> str:
        return f"**{'holds' if holds else 'does not hold'}{so_far}**"

    lines += ["", f"- Novel-region top-1: mean {fmt(r['mean'])}, lower bounds per run {lows}: "
              f"{verdict(r['holds'])} (every lower bound > 0, mean >= 10).",
              f"- Transfer novel AP50: mean {fmt(t['mean'], t['ci95'])}: "
              f"{verdict(t['holds'])} (mean >= 3, interval above 0).", "",
              "Wall times are those of a host shared with other jobs; CPU is the run's processes' CPU time.",
              "", END]
    return "\n".join(lines)


def write_results(text: str, path: Path = RESULTS_MD) -> None:
    """Replace the generated part of docs/results.md (between the markers), keeping the rest."""
    if path.is_file():
        page = path.read_text(encoding="utf-8")
        if BEGIN in page and END in page:
            head, rest = page.split(BEGIN, 1)
            page = head + text + rest.split(END, 1)[1]
        else:
            page = page.rstrip() + "\n\n" + text + "\n"
    else:
        page = "# Results\n\n" + text + "\n"
    path.write_text(page, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default=None, help="default: manifests/demo.yaml "
                        "(manifests/demo-small.yaml with --quick)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="PyTorch thread counts (OMP_NUM_THREADS) per seed (default: 1 2; --quick: the default)")
    parser.add_argument("--quick", action="store_true", help="the small world of tests/test_demo_direction.py")
    parser.add_argument("--out", default=None, help="parent folder of the runs "
                        "(default: runs/bench-demo-seeds[-quick])")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="extra manifest overrides for every run")
    parser.add_argument("--write-results", action="store_true",
                        help="write the table into docs/results.md (after every run: a long grid shows progress)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: report the finished runs of the grid (their records in --out)")
    args = parser.parse_args()
    manifest = Path(args.manifest or REPO / "manifests" / ("demo-small.yaml" if args.quick else "demo.yaml"))
    out = Path(args.out or REPO / "runs" / ("bench-demo-seeds-quick" if args.quick else "bench-demo-seeds"))
    threads = args.threads or ([None] if args.quick else [1, 2])
    grid = [(seed, t) for seed in args.seeds for t in threads]

    rows: list[dict] = []
    stats: dict = {}
    claims: dict = {}
    for seed, t in grid:
        name = f"seed{seed}" + ("" if t is None else f"-threads{t}")
        if args.report_only:
            record = out.resolve() / f"{name}.json"
            if not record.is_file():
                continue
            row = json.loads(record.read_text())
        else:
            row = run_one(manifest.resolve(), seed, t, out.resolve() / name, args.overrides)
        rows.append(row)
        print(f"seed {seed}, threads {t or 'default'}: " + ", ".join(
            f"{COLUMNS[k]} {fmt(row[k], row.get(k + '_ci95'))}" for k in COLUMNS if k.startswith("margin"))
              + f"; novel regions {row['novel_regions']} ({row['wall_s']} s wall, commit {row['commit']})", flush=True)
        stats = {key: mean_with_interval(rows, key) for key in MARGINS}
        claims = claims_of(rows, stats)
        if args.write_results:
            write_results(results_markdown(manifest, rows, stats, claims, len(rows) == len(grid), len(grid)))

    if not rows:
        raise SystemExit(f"no finished runs in {out}")
    print(f"\n{manifest.name}, seeds {args.seeds} x threads {threads}: mean [95% interval] (sd between runs)")
    for key in MARGINS:
        s = stats[key]
        print(f"  {COLUMNS[key]:20s} {fmt(s['mean'], s['ci95'])} (sd {s['std']}, smallest {s['min']})")
    for key, claim in claims.items():
        print(f"claim {key} ({claim['need']}): {'holds' if claim['holds'] else 'FAILS'}")
    print(json.dumps({"manifest": manifest.name, "seeds": args.seeds, "threads": threads,
                      "cpu": cpu_model(), "margins": stats, "claims": claims,
                      "claims_hold": all(c["holds"] for c in claims.values()), "per_run": rows}))


if __name__ == "__main__":
    main()
