"""`regionclip status MANIFEST`: one row per stage of the pipeline (stages/stage_list.py) from its stage
manifest, then what is out of date, who holds the run folder, and the results table.
"""
from __future__ import annotations

import json

from pipeline.layout import RunLayout
from pipeline.runner import run_in_progress, stage_status
from pipeline.stage import read_stage_manifest
from stages.stage_list import PIPELINE


def status(manifest) -> list[dict]:
    """One row per stage: its status (done, running, damaged, out of date, not run, disabled), done
    shards, rows in / out / rejected, from the stage manifests."""
    layout = RunLayout.of(manifest)
    rows = []
    for stage in PIPELINE:
        stage_dir = layout.stage(stage.name)
        m = read_stage_manifest(stage_dir) or {}
        word, _ = stage_status(layout, stage.name)
        if not stage.is_enabled(manifest) and not m:
            word = "disabled"
        counts = m.get("counts", {}) if m.get("status") != "running" else {}
        shards = m.get("shards", {}) if m.get("status") != "running" else {}
        if m.get("status") == "running":  # running or interrupted: count the markers so far
            done = len(list(stage_dir.root.rglob("*_stats.json")))
            shard_text = f"{done} done" if done else "-"
        else:
            shard_text = f"{len(shards)}/{len(shards)}" if shards else "-"
        rows.append({"stage": stage.name, "status": word, "shards": shard_text,
                     "in": counts.get("in", ""), "out": counts.get("written", counts.get("out", "")),
                     "rejected": counts.get("rejected", ""), "seconds": m.get("seconds", "")})
    return rows


def print_status(manifest) -> None:
    rows = status(manifest)
    cols = ["stage", "status", "shards", "in", "out", "rejected", "seconds"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    layout = RunLayout.of(manifest)
    for r in rows:
        if r["status"] == "out of date":
            print(f"\n{stage_status(layout, r['stage'])[1]}")
            break
    holder = run_in_progress(layout)
    if holder:
        print(f"\nin use by {holder}")
    summary = layout.summary_json
    if summary.exists():
        try:
            text = summary.read_text(encoding="utf-8")
            content = json.loads(text)
        except (OSError, ValueError) as err:     # damaged or crafted: the status above still stands
            print(f"\nresults: {summary} cannot be read ({type(err).__name__}: {err})")
            return
        table = content.get("results_table") if isinstance(content, dict) else None
        if isinstance(table, str):     # the headline figures (stages/evaluate.py), readable
            print(f"\n{table}")
        print(f"\nresults: {summary}")
        if not isinstance(table, str):
            print(text)
