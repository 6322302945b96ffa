"""The `regionclip` command line.

    regionclip <stage> MANIFEST [--set section.key=value ...]   run one stage
    regionclip run MANIFEST                                     run every stage in order, resuming
    regionclip status MANIFEST                                  what is done

Each stage is a module `stages.<name>` with `run(manifest)`; it also runs as
`python -m stages.<name> MANIFEST`.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import signal
import subprocess
import sys
import threading
import time

from pipeline.config import ManifestError, load_manifest
from pipeline.layout import RunLayout
from pipeline.stage import StageInputError, read_stage_manifest

# The pipeline in order: `regionclip run` runs these. Module name = stage name with '-' -> '_'.
PIPELINE = ["shard", "concepts", "train-teacher", "embed", "train-rpn", "proposals", "label", "pretrain", "transfer", "evaluate"]

# Commands that are not pipeline stages but follow the same `regionclip <cmd> MANIFEST` form.
EXTRA_COMMANDS = ["verify", "synth", "vocab", "show", "detect", "coco-ovd-split"]

# Commands with arguments of their own: their module has `add_arguments(parser)` and
# `run(manifest, args)` (listed here so that building the parser imports only these modules).
COMMANDS_WITH_ARGUMENTS = ["verify", "vocab", "show", "detect", "coco-ovd-split"]

# One line per command for `regionclip --help` (kept here so that help does not import torch).
HELP = {
    "run": "run every stage in order, resuming where outputs are complete",
    "status": "show which stages and shards are done",
    "verify": "check every output against its recorded checksums; --repair makes the next run redo damaged shards",
    "synth": "generate the synthetic world and a contact sheet of it",
    "shard": "corpus -> img2dataset-style WebDataset tars + a Parquet per shard",
    "concepts": "concept pool (object nouns of the captions) + each caption's concept ids",
    "train-teacher": "optional: image-level CLIP (open_clip, ClipLoss) on the shards -> checkpoints/teacher",
    "embed": "teacher text embeddings of the concepts (81 templates, FAISS index) and captions",
    "train-rpn": "optional: class-agnostic RPN on base-category boxes, recall report -> checkpoints/rpn",
    "proposals": "class-agnostic RPN boxes (top 300 after NMS) per shard image -> proposals/ (Ray actors)",
    "label": "teacher region embeddings -> pseudo-labels + compact distillation targets -> labels/",
    "show": "PNG of one image with its top proposals and pseudo-labels (--key, --top, --out)",
    "vocab": "class list (text, comma list, COCO/LVIS JSON) -> class embeddings .npz (--classes, --out)",
    "transfer": "open-vocabulary detector on base classes, per init (pretrain student, teacher)",
    "evaluate": "detector AP50 novel/base/all, zero-shot (GT / RPN boxes), region top-1 -> eval/",
    "detect": "checkpoint + vocabulary + images -> detections JSON + labelled PNG (--images, --vocabulary)",
    "coco-ovd-split": "COCO instances files -> the 48 base / 17 novel open-vocabulary split (--train, --val)",
    "pretrain": "streaming region-concept pretraining of the student (tars + sidecars; torchrun for DDP) -> checkpoints/pretrain/",
}


def stage_module(name: str):
    return importlib.import_module(f"stages.{name.replace('-', '_')}")


def _load(path: str, overrides: list[str]):
    try:
        return load_manifest(path, overrides)
    except ManifestError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def run_stage(name: str, manifest, args=None) -> dict:
    started = time.time()
    print(f"== {name}", flush=True)
    module = stage_module(name)
    result = module.run(manifest, args) if name in COMMANDS_WITH_ARGUMENTS else module.run(manifest)
    print(f"== {name} finished in {time.time() - started:.1f}s", flush=True)
    return result


def run_all(manifest, manifest_path: str, overrides: list[str]) -> int:
    """Every enabled stage in order, each in a fresh process (`python -m stages.cli STAGE MANIFEST`, as
    a script or a Ray job would run it): a stage leaves nothing behind for the next one (thread
    settings, allocator state, Ray workers, GPU memory). Stops at the first stage that fails and
    returns its exit code; SIGTERM is passed on to the running stage (pretrain saves its state)."""
    started = time.time()
    for name in PIPELINE:
        module = stage_module(name)
        if hasattr(module, "enabled") and not module.enabled(manifest):
            print(f"== {name}: skipped (disabled in the manifest)", flush=True)
            continue
        command = [sys.executable, "-m", "stages.cli", name, manifest_path]
        for override in overrides:
            command += ["--set", override]
        code = run_child(command)
        if code != 0:
            print(f"error: stage {name} exited with status {code}; fix it and run again to resume",
                  file=sys.stderr)
            return code
    print(f"== run finished in {time.time() - started:.1f}s", flush=True)
    return 0


def run_child(command: list[str]) -> int:
    child = subprocess.Popen(command)
    forward = threading.current_thread() is threading.main_thread()
    if forward:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
    try:
        return child.wait()
    finally:
        if forward:
            signal.signal(signal.SIGTERM, previous)


def status(manifest) -> list[dict]:
    """One row per stage: done shards, rows in / out / rejected, from the stage manifests."""
    layout = RunLayout.of(manifest)
    rows = []
    for name in PIPELINE:
        stage_dir = layout.stage(name)
        m = read_stage_manifest(stage_dir)
        counts = (m or {}).get("counts", {})
        shards = (m or {}).get("shards", {})
        if m is None and stage_dir.root.is_dir():  # running or interrupted: count markers so far
            done = len(list(stage_dir.root.rglob("*_stats.json")))
            shard_text = f"{done} done" if done else "-"
        else:
            shard_text = f"{len(shards)}/{len(shards)}" if shards else "-"
        rows.append({"stage": name, "status": (m or {}).get("status", "not run"), "shards": shard_text,
                     "in": counts.get("in", ""), "out": counts.get("written", counts.get("out", "")),
                     "rejected": counts.get("rejected", ""),
                     "seconds": (m or {}).get("seconds", "")})
    return rows


def print_status(manifest) -> None:
    rows = status(manifest)
    cols = ["stage", "status", "shards", "in", "out", "rejected", "seconds"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    summary = RunLayout.of(manifest).summary_json
    if summary.exists():
        import json

        content = json.loads(summary.read_text())
        table = content.get("results_table") if isinstance(content, dict) else None
        if isinstance(table, str):     # the headline figures (stages/evaluate.py), readable
            print(f"\n{table}")
        print(f"\nresults: {summary}")
        if not isinstance(table, str):
            print(summary.read_text())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regionclip", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ["run", "status", *PIPELINE, *EXTRA_COMMANDS]:
        p = sub.add_parser(name, help=HELP.get(name, name))
        p.add_argument("manifest", help="run manifest (YAML), e.g. manifests/demo.yaml")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a manifest setting (YAML value), e.g. --set shard.max_side=640")
        if name in COMMANDS_WITH_ARGUMENTS:
            stage_module(name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    manifest = _load(args.manifest, args.overrides)
    try:
        if args.command == "run":
            code = run_all(manifest, args.manifest, args.overrides)
            if code != 0:
                return code
            print_status(manifest)
        elif args.command == "status":
            print_status(manifest)
        else:
            run_stage(args.command, manifest, args)
    except (StageInputError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def stage_main(name: str) -> None:
    """Entry point for `python -m stages.<name> MANIFEST`."""
    raise SystemExit(main([name, *sys.argv[1:]]))


if __name__ == "__main__":
    raise SystemExit(main())
