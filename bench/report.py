"""Run every bench script and write one table of all their figures, with the machine it ran on.

Discovers bench/*.py (except this file and _helpers), runs each with `--quick` when its argparse has
that flag (`--full` here passes nothing), with a timeout each, and parses its LAST output line as JSON
(the project's convention for bench figures). Scripts that take an hour or more (a `LONG = True` line:
demo_seeds, faults) run only with `--full` or `--only`. Writes bench/results/latest.md and
bench/results/latest.json (and a dated copy of the JSON), with the machine's load average at the start
and end of the report and of each script, the commit and whether the checkout had local changes.
Every figure is measured in this run: a script that fails or times out gets a row saying so.
`make bench` runs the demo first (the scripts that read a finished run use it), then this.

    python bench/report.py [--full] [--timeout 2400] [--only precompute,memory] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def machine() -> dict:
    info = {"hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["ram_gib"] = round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    try:
        load = os.getloadavg()
        info["load_average_1m"] = round(load[0], 2)
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = (", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
                       if torch.cuda.is_available() else None)
    except ImportError:
        info["torch"] = None
    try:
        from pipeline import __version__

        info["code_version"] = __version__
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                            text=True).stdout.strip() or None
        changes = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                 capture_output=True, text=True).stdout.strip()
        info["local_changes"] = bool(changes)
    except Exception:  # noqa: BLE001 - the report is still useful without it
        pass
    return info


def is_long(script: Path) -> bool:
    return re.search(r"^LONG = True", script.read_text(), re.M) is not None


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def supports_quick(script: Path) -> bool:
    return re.search(r"""add_argument\(\s*["']--quick["']""", script.read_text()) is not None


def run_script(script: Path, quick: bool, timeout: float, logs: Path | None = None) -> dict:
    cmd = [sys.executable, str(script)] + (["--quick"] if quick and supports_quick(script) else [])
    started = time.time()
    row = {"script": f"bench/{script.name}", "args": " ".join(cmd[2:]), "status": "ok",
           "load_average_start": load_average()}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        row.update(status=f"timeout after {timeout:.0f}s", seconds=round(time.time() - started, 1), figures={},
                   load_average_end=load_average())
        return row
    row["seconds"] = round(time.time() - started, 1)
    row["load_average_end"] = load_average()
    if logs is not None:  # the whole output, reusable later with --reuse NAME=FILE
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"{script.stem}.out").write_text(proc.stdout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    try:
        figures = json.loads(lines[-1]) if lines else None
        if not isinstance(figures, dict):
            raise ValueError("last line is not a JSON object")
    except (ValueError, IndexError) as err:
        figures = {}
        row["status"] = f"exit {proc.returncode}; no JSON last line ({err})"
        row["stderr_tail"] = proc.stderr[-1500:]
    if proc.returncode != 0 and row["status"] == "ok":
        row["status"] = f"exit {proc.returncode}"
    row["figures"] = figures
    return row


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        text = json.dumps(v)
        return text if len(text) <= 80 else text[:77] + "..."
    return str(v)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# Benchmark report", "",
             f"Generated {m.get('date')} by `python bench/report.py{' --full' if not report['quick'] else ''}` "
             f"at commit `{m.get('git_commit')}`.", "",
             "| machine | |", "|---|---|"]
    for key in ("cpu", "cpus", "ram_gib", "gpu", "torch", "python", "platform", "local_changes"):
        lines.append(f"| {key} | {m.get(key)} |")
    lines.append(f"| load average (1 min) at start / end | {m.get('load_average_1m')} / "
                 f"{report.get('load_average_end')} |")
    lines += ["", "| script | status | seconds | load at start / end |", "|---|---|---|---|"]
    for row in report["scripts"]:
        lines.append(f"| `{(row['script'] + ' ' + row['args']).strip()}` | {row['status']} | {row.get('seconds')} "
                     f"| {row.get('load_average_start')} / {row.get('load_average_end')} |")
    lines += ["", "| script | figure | value |", "|---|---|---|"]
    for row in report["scripts"]:
        for name, value in flatten(row["figures"]).items():
            lines.append(f"| {row['script']} | {name} | {fmt(value)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="run each script with its defaults (no --quick)")
    ap.add_argument("--timeout", type=float, default=2400, help="seconds per script (a guard against a hung script)")
    ap.add_argument("--only", default=None, help="comma list of script names (without .py)")
    ap.add_argument("--out", default=str(BENCH / "results"))
    args = ap.parse_args()
    scripts = sorted(p for p in BENCH.glob("*.py") if p.name != Path(__file__).name and not p.name.startswith("_"))
    if args.only:
        wanted = set(args.only.split(","))
        scripts = [p for p in scripts if p.stem in wanted]
    elif not args.full:
        scripts = [p for p in scripts if not is_long(p)]
    report = {"machine": machine(), "quick": not args.full, "scripts": []}
    for script in scripts:
        print(f"report: running bench/{script.name}{' --quick' if not args.full and supports_quick(script) else ''}",
              flush=True)
        row = run_script(script, quick=not args.full, timeout=args.timeout, logs=Path(args.out) / "logs")
        print(f"report:   {row['status']} in {row.get('seconds')}s, {len(flatten(row['figures']))} figures", flush=True)
        report["scripts"].append(row)
    report["load_average_end"] = load_average()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "latest.md").write_text(markdown(report))
    stamp = report["machine"]["date"].replace(":", "").replace("-", "")
    (out / f"report-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: wrote {out / 'latest.md'} and {out / 'latest.json'}")
    print(json.dumps({"scripts": len(report["scripts"]),
                      "ok": sum(r["status"].startswith("ok") for r in report["scripts"]),
                      "figures": sum(len(flatten(r["figures"])) for r in report["scripts"])}))


if __name__ == "__main__":
    main()
