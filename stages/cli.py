"""The `regionclip` command line.

    regionclip <stage> MANIFEST [--set section.key=value ...]   run one stage
    regionclip run MANIFEST                                     run every stage in order, resuming
    regionclip status MANIFEST                                  what is done

The stages and the other commands are those of stages/registry.py. This module is the one entry point:
`python -m stages.cli <name> MANIFEST` is `regionclip <name> MANIFEST` (and `torchrun ... -m stages.cli
pretrain MANIFEST` trains with DDP). One run at a time per output_dir: a second is refused.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pipeline.config import ManifestError, load_manifest
from pipeline.layout import RunLayout
from pipeline.runner import run_lock
from stages.errors import debug_requested, exit_code_for
from stages.registry import PIPELINE, STAGES, TOOL_MODULES, TOOLS
from stages.status import print_status

COMMANDS = {"run": "run every enabled stage in order, each in its own process, resuming where outputs are complete",
            "status": "show which stages and shards are done, and the results table"}

# Third-party loggers that speak at INFO about their own set-up (faiss's loader reports each CPU build
# it could not load as a `ModuleNotFoundError(...)` line, which reads like a failure).
# numexpr (pulled in by some installs) announces its thread count the same way.
QUIET_LOGGERS = ("faiss", "numexpr")

# A command's shorthands for one of its settings: `regionclip pretrain MANIFEST --resume never` is
# `--set pretrain.resume=never`. flag -> (setting, metavar, help)
SETTING_SHORTHANDS = {
    "pretrain": {"--resume": ("pretrain.resume", "auto|never|PATH",
                              "pretrain.resume: auto (this run's saved state, if any), never (start fresh), or a "
                              "trainer state file")},
}

# `--strict`: an annotation file that would lose (or clip) annotations is refused rather than cleaned.
STRICT_COMMANDS = ("run", "train-rpn", "transfer", "evaluate")
STRICT_SETTINGS = ("train_rpn.strict_annotations=true", "transfer.strict_annotations=true")


def _load(path: str, overrides: list[str]):
    try:
        return load_manifest(path, overrides)
    except ManifestError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def run_one(name: str, manifest, args=None) -> dict:
    """One stage (through the runner) or one other command, timed. A command whose stdout is its data
    (PRINTS_DATA, e.g. search's JSON lines) has these lines on stderr."""
    started = time.time()
    out = sys.stderr if getattr(TOOL_MODULES.get(name), "PRINTS_DATA", False) else sys.stdout
    print(f"== {name}", flush=True, file=out)
    result = STAGES[name].run(manifest) if name in STAGES else TOOL_MODULES[name].run(manifest, args)
    print(f"== {name} finished in {time.time() - started:.1f}s", flush=True, file=out)
    return result


def run_all(manifest, manifest_path: str, overrides: list[str]) -> int:
    """Every enabled stage in order, each in a fresh process (`python -m stages.cli STAGE MANIFEST`, as
    a script or a Ray job would run it): a stage leaves nothing behind for the next one (thread
    settings, allocator state, Ray workers, GPU memory). The stage processes run under this process's
    run lock. Stops at the first stage that fails and returns its exit code; SIGTERM is passed on to
    the running stage (pretrain saves its state)."""
    started = time.time()
    for stage in PIPELINE:
        if not stage.is_enabled(manifest):
            print(f"== {stage.name}: skipped (disabled in the manifest)", flush=True)
            continue
        command = [sys.executable, "-m", "stages.cli", stage.name, manifest_path]
        for override in overrides:
            command += ["--set", override]
        code = run_child(command)
        if code != 0:
            print(f"error: stage {stage.name} exited with status {code}; fix it and run again to resume",
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


class SettingShorthand(argparse.Action):
    """An option that adds `--set <setting>=VALUE` to the overrides, in its place among the --set options."""

    def __init__(self, option_strings, dest, setting: str, **kwargs):
        self.setting = setting
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), f"{self.setting}={value}"])


class AppendSettings(argparse.Action):
    """A flag without a value that adds fixed `--set` overrides (--strict)."""

    def __init__(self, option_strings, dest, settings: tuple, **kwargs):
        self.settings = settings
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), *self.settings])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regionclip", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = [*COMMANDS.items(), *((s.name, s.help) for s in PIPELINE), *((t.COMMAND, t.HELP) for t in TOOLS)]
    for name, help_text in commands:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("manifest", help="run manifest (YAML), e.g. manifests/demo.yaml")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a manifest setting (YAML value), e.g. --set shard.max_side=640")
        p.add_argument("--debug", action="store_true", help="print the traceback of an error")
        if name in STRICT_COMMANDS:
            p.add_argument("--strict", dest="overrides", action=AppendSettings, settings=STRICT_SETTINGS,
                           help="refuse an annotation file that would lose annotations or clip boxes, instead "
                           "of dropping them with a count per reason (train_rpn/transfer.strict_annotations)")
        if name in TOOL_MODULES:
            TOOL_MODULES[name].add_arguments(p)
        for flag, (setting, metavar, text) in SETTING_SHORTHANDS.get(name, {}).items():
            p.add_argument(flag, dest="overrides", action=SettingShorthand, setting=setting, metavar=metavar,
                           help=text)
    return parser


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_library_chatter)


_OURS = tuple(str(Path(__file__).resolve().parents[1] / package) for package in ("pipeline", "trainer", "stages"))


def _library_chatter(record: logging.LogRecord) -> bool:
    """False for a library's INFO record on the root logger (open_clip logs each model and tokenizer step
    with `logging.info`); its warnings and our own records pass."""
    return record.levelno >= logging.WARNING or record.name != "root" or record.pathname.startswith(_OURS)


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    debug = debug_requested(args.debug)
    holds_lock = (args.command == "run" or args.command in STAGES
                  or getattr(TOOL_MODULES.get(args.command), "HOLDS_RUN_LOCK", False))
    try:
        manifest = _load(args.manifest, args.overrides)
        lock = run_lock(RunLayout.of(manifest), " ".join(["regionclip", *argv])) if holds_lock else \
            contextlib.nullcontext()
        with lock:
            if args.command == "run":
                code = run_all(manifest, args.manifest, args.overrides)
                if code != 0:
                    return code
                print_status(manifest)
            elif args.command == "status":
                print_status(manifest)
            else:
                run_one(args.command, manifest, args)
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - the boundary: one line (stages/errors.py)
        return exit_code_for(err, debug)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
