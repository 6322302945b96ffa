"""One runner for every stage: a stage is a declaration (`Stage`), and `run_stage` does the bookkeeping
every stage needs, so that a stage module holds only its own work.

    STAGE = Stage(name="proposals", help="...", reads=("shard",), sections=("proposals",),
                  identify=checkpoint_checksum, current=shards_done, work=propose)
    STAGE.run(manifest)                       # what `regionclip proposals MANIFEST` does

`run_stage`, in order:
1. Upstream: every stage this one reads has finished ("done") and is still current: the upstream
   fingerprints it recorded are the ones its upstream stages have now, all the way up. Otherwise a
   StageInputError names the stage to rerun.
2. Fingerprint: the stage's manifest sections (runtime-only fields left out: pipeline/config.py), what
   its `identify` derives (the checksum of a checkpoint it reads, the parser, ...) and the upstream
   fingerprints.
3. Up to date: its stage manifest is done under that fingerprint, its outputs exist and its own
   `current` check holds (e.g. every shard's marker): nothing to do, nothing written.
4. Otherwise the stage manifest is marked "running" with the new fingerprint before any output is
   touched, so a rerun killed half-way is never read as done and every stage downstream refuses it;
   temporaries of a killed run are removed; `work` runs; the manifest is written "done".

One run at a time per run folder: `run_lock` refuses a second run and names the first.
"""
from __future__ import annotations

import contextlib
import os
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

from pipeline import __version__
from pipeline.config import fingerprinted_settings
from pipeline.io import file_record, read_json, remove_stale_temporaries, write_json
from pipeline.layout import RunLayout, StageDir
from pipeline.stage import UNREADABLE, ShardMarkers, StageInputError, fingerprint_of, read_stage_manifest

RUNNING, DONE, DAMAGED = "running", "done", "damaged"   # a stage manifest's status (DAMAGED: verify --repair)


@dataclass
class StageRun:
    """One run of a stage: what `identify` and `work` are given."""
    stage: "Stage"
    manifest: Any                      # the run manifest (pipeline.config.RunManifest)
    layout: RunLayout
    upstream: dict[str, dict]          # the stage manifests of the stages it reads, by name
    previous: Optional[dict]           # this stage's last complete manifest (for reuse finer than a stage)
    options: dict                      # keyword arguments of Stage.run (e.g. a test's model loader)
    memo: dict = field(default_factory=dict)   # what identify found that work needs too (the corpus rows)
    settings: dict = field(default_factory=dict)
    fingerprint: str = ""
    report: Any = None                 # what work did, returned to the caller as "work"

    @property
    def stage_dir(self) -> StageDir:
        return self.layout.stage(self.stage.name)

    def markers(self, stage_dir: Optional[StageDir] = None, fingerprint: Optional[str] = None) -> ShardMarkers:
        """The per-shard markers of this run (in the stage folder, under the stage's fingerprint)."""
        return ShardMarkers(stage_dir or self.stage_dir, fingerprint or self.fingerprint)

    def shard_ids(self, upstream: str = "shard") -> list[int]:
        """The shards an upstream stage finished, in order."""
        return sorted(int(s) for s in self.upstream[upstream].get("shards", {}))


def _no_outputs(layout: RunLayout, manifest) -> list[Path]:
    return []


@dataclass(frozen=True)
class Stage:
    """A stage declared: what it reads, which settings decide its outputs, what it writes, its work."""
    name: str                                              # the command: `regionclip <name> MANIFEST`
    help: str                                              # one line for `regionclip --help`
    work: Callable[[StageRun], Optional[dict]]             # does the work; returns stage-manifest fields
    reads: Union[tuple[str, ...], Callable[[Any], Iterable[str]]] = ()  # upstream stages (or manifest -> them)
    sections: tuple[str, ...] = ()                         # manifest sections fingerprinted
    outputs: Callable[[RunLayout, Any], Iterable[Path]] = _no_outputs  # stage-level files it writes
    identify: Optional[Callable[[StageRun], dict]] = None  # derived settings (checksums ...), read-only
    current: Optional[Callable[[StageRun], bool]] = None   # its own check that a done stage is intact
    enabled: Optional[Callable[[Any], bool]] = None        # optional stages: manifest -> whether it runs
    nothing_done: Any = False                              # the "work" report of an up-to-date stage

    def is_enabled(self, manifest) -> bool:
        return self.enabled is None or bool(self.enabled(manifest))

    def upstream(self, manifest) -> list[str]:
        return list(self.reads(manifest) if callable(self.reads) else self.reads)

    def run(self, manifest, **options) -> dict:
        return run_stage(self, manifest, **options)


# -- upstream: complete and current, all the way up ---------------------------------------------------

def require_current(layout: RunLayout, names: Iterable[str]) -> dict[str, dict]:
    """The manifests of stages `names`, each finished and current, or a StageInputError naming the
    stage to rerun."""
    checked: dict[str, dict] = {}
    return {name: _current_manifest(layout, name, checked) for name in names}


def _current_manifest(layout: RunLayout, name: str, checked: dict[str, Optional[dict]]) -> dict:
    rerun = f"run `regionclip {name} MANIFEST`"
    if name in checked:
        if checked[name] is None:       # still being checked: a manifest that names itself upstream
            raise StageInputError(f"stage '{name}': its manifest names itself upstream (damaged); {rerun}")
        return checked[name]
    checked[name] = None
    stage_dir = layout.stage(name)
    manifest = read_stage_manifest(stage_dir)
    status = (manifest or {}).get("status")
    if manifest is None:
        raise StageInputError(f"stage '{name}' has not run (no {stage_dir.manifest}); {rerun} first")
    if status == UNREADABLE:
        raise StageInputError(f"stage '{name}': {stage_dir.manifest} is not a stage manifest "
                              f"({manifest['problem']}); {rerun}")
    if status == RUNNING:
        raise StageInputError(f"stage '{name}' is running or was interrupted; {rerun}")
    if status == DAMAGED:
        raise StageInputError(f"stage '{name}' has damaged outputs (regionclip verify --repair); {rerun} "
                              "to redo them")
    if status != DONE:
        raise StageInputError(f"stage '{name}' is not done (status {status!r}); {rerun}")
    for upstream, recorded in (manifest.get("upstream") or {}).items():
        now = _current_manifest(layout, upstream, checked).get("fingerprint")
        if now != recorded:
            raise StageInputError(f"stage '{name}' is out of date: it read {upstream} {recorded}, and "
                                  f"{upstream} has been rerun since ({now}); {rerun}")
    checked[name] = manifest
    return manifest


def stage_status(layout: RunLayout, name: str) -> tuple[str, str]:
    """(status, why) of a stage for `regionclip status`: done, running, damaged, not run, or out of date
    (its own outputs are done but an upstream stage changed or is being rerun)."""
    manifest = read_stage_manifest(layout.stage(name))
    if manifest is None:
        return "not run", ""
    try:
        _current_manifest(layout, name, {})
    except StageInputError as err:
        status = manifest.get("status", "?")
        return (status, "") if status != DONE else ("out of date", str(err))
    return DONE, ""


# -- the runner -------------------------------------------------------------------------------------

def is_primary_process() -> bool:
    """False on the other ranks of a torchrun job: rank 0 alone keeps the books."""
    return os.environ.get("RANK", "0") == "0"


def run_stage(stage: Stage, manifest, **options) -> dict:
    """Run one stage with its bookkeeping (see the module doc). Returns its stage manifest with
    `work`: what this run did (`stage.nothing_done` when it was up to date)."""
    layout = RunLayout.of(manifest)
    if not stage.is_enabled(manifest):
        print(f"{stage.name}: disabled in the manifest; nothing to do", flush=True)
        return {"stage": stage.name, "status": "disabled", "work": stage.nothing_done}
    stage_dir = layout.stage(stage.name)
    upstream = require_current(layout, stage.upstream(manifest))
    recorded = read_stage_manifest(stage_dir)
    run = StageRun(stage, manifest, layout, upstream, previous=_last_complete(recorded), options=options)
    run.settings = {section: fingerprinted_settings(getattr(manifest, section)) for section in stage.sections}
    if stage.identify is not None:
        run.settings.update(stage.identify(run))
    inputs = {name: m.get("fingerprint") for name, m in upstream.items()}
    run.fingerprint = fingerprint_of(stage.name, run.settings, inputs)
    outputs = [Path(p) for p in stage.outputs(layout, manifest)]

    if (recorded is not None and recorded.get("status") == DONE and recorded.get("fingerprint") == run.fingerprint
            and all(p.exists() for p in outputs) and (stage.current is None or stage.current(run))):
        print(f"{stage.name}: up to date", flush=True)
        return {**recorded, "work": stage.nothing_done}

    primary = is_primary_process()
    started = time.time()
    if primary:
        # Nothing is written through a link: not the stage's files, not the cleanup of temporaries.
        layout.refuse_links(stage_dir.root)
        # Before any output changes: from here until "done" the stage reads as interrupted.
        stage_dir.root.mkdir(parents=True, exist_ok=True)
        write_json(stage_dir.manifest, {
            "stage": stage.name, "status": RUNNING, "fingerprint": run.fingerprint, "code_version": __version__,
            "settings": run.settings, "upstream": inputs, "pid": os.getpid(), "started_at": _now(),
            "last_complete": run.previous})
        remove_stale_temporaries(stage_dir.root)
    extra = stage.work(run) or {}
    if not primary:
        return {**extra, "work": run.report}
    reserved = {"stage", "status", "fingerprint", "upstream", "settings"} & set(extra)
    if reserved:
        raise ValueError(f"{stage.name}: work returned the runner's own fields {sorted(reserved)}")
    done = {"stage": stage.name, "status": DONE, "fingerprint": run.fingerprint, "code_version": __version__,
            "settings": run.settings, "upstream": inputs,
            "outputs": {_output_name(stage_dir, p): file_record(p) for p in outputs},
            "seconds": round(time.time() - started, 3), "finished_at": _now(), **extra}
    write_json(stage_dir.manifest, done)
    return {**done, "work": run.report}


def _last_complete(manifest: Optional[dict]) -> Optional[dict]:
    """The last manifest this stage wrote as complete: the manifest itself, or the one a rerun (running,
    perhaps killed) keeps, so that reuse finer than the stage (a detector per init) survives a kill."""
    if manifest is None:
        return None
    if manifest.get("status") in (DONE, DAMAGED):
        return manifest
    return manifest.get("last_complete")


def _output_name(stage_dir: StageDir, path: Path) -> str:
    """How the manifest names an output: relative to the stage folder (as `regionclip verify` reads it),
    absolute when it lies elsewhere (a synthetic world in corpus.path)."""
    try:
        return str(path.relative_to(stage_dir.root))
    except ValueError:
        return str(path.resolve())


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# -- one run at a time per run folder ---------------------------------------------------------------

# Set (to the lock's path) by the process that holds a run folder's lock, so that the processes it
# starts for each stage (`regionclip run`) work under its lock instead of waiting for it.
LOCK_HELD_ENV = "REGIONCLIP_RUN_LOCK_HELD"


class RunFolderBusy(RuntimeError):
    """Another run is using the run folder; the message names it."""


class ForeignLockFile(RuntimeError):
    """A file named like the lock's side file (run.lock.json) that this tool did not write."""


# The mark of a run.lock.json this tool wrote: a user's file of that name is never overwritten or removed.
LOCK_HOLDER_MARK = "regionclip run lock"
PLAIN_HOLDER_KEYS = {"pid", "command", "started_at", "host"}


@contextlib.contextmanager
def run_lock(layout: RunLayout, command: str) -> Iterator[None]:
    """Hold the run folder's lock while the block runs; a second run is refused with RunFolderBusy naming
    the first (pid, command, start time). The lock is the kernel's (filelock: flock), so a killed run
    leaves none behind. Processes started inside the block inherit it (LOCK_HELD_ENV), and the other
    ranks of a torchrun job run under rank 0's."""
    from filelock import FileLock, Timeout

    path = layout.run_lock
    if os.environ.get(LOCK_HELD_ENV) == str(path.resolve()) or not is_primary_process():
        yield
        return
    layout.root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunFolderBusy(f"{layout.root} is in use by another run: {_holder(layout)}; wait for it to "
                            "finish or stop it") from None
    previous = os.environ.get(LOCK_HELD_ENV)
    holder = {"written_by": LOCK_HOLDER_MARK, "pid": os.getpid(), "command": command, "started_at": _now(),
              "host": socket.gethostname(), "token": os.urandom(8).hex()}
    try:
        if _foreign_holder_file(layout):
            raise ForeignLockFile(f"{layout.run_lock_holder} was not written by regionclip, and the run folder's "
                                  "lock writes that name while a run holds it; move the file out of "
                                  f"{layout.root} (or choose another output_dir)")
        layout.refuse_links()
        write_json(layout.run_lock_holder, holder)
        os.environ[LOCK_HELD_ENV] = str(path.resolve())
        yield
    finally:
        if previous is None:
            os.environ.pop(LOCK_HELD_ENV, None)
        else:
            os.environ[LOCK_HELD_ENV] = previous
        if _read_holder(layout).get("token") == holder["token"]:      # ours: remove it, and only it
            layout.run_lock_holder.unlink(missing_ok=True)
        lock.release()


def _read_holder(layout: RunLayout) -> dict:
    """run.lock.json as written by a run lock, or {} (absent, a link, not a regular file, not ours)."""
    try:
        if not stat.S_ISREG(os.lstat(layout.run_lock_holder).st_mode):
            return {}
        holder = read_json(layout.run_lock_holder)
    except (OSError, ValueError):
        return {}
    if not isinstance(holder, dict):
        return {}
    # (the keys alone: what a run lock wrote before it marked its file)
    return holder if holder.get("written_by") == LOCK_HOLDER_MARK or set(holder) == PLAIN_HOLDER_KEYS else {}


def _foreign_holder_file(layout: RunLayout) -> bool:
    """Whether run.lock.json exists and is not a run lock's (a stale one of a killed run is ours)."""
    return os.path.lexists(layout.run_lock_holder) and not _read_holder(layout)


def run_in_progress(layout: RunLayout) -> Optional[str]:
    """Who else holds the run folder's lock now, or None: free, held by this run itself (the status that
    `regionclip run` prints at its end), or left by a killed run (its run.lock.json is no holder)."""
    from filelock import FileLock, Timeout

    if not layout.run_lock.exists() or os.environ.get(LOCK_HELD_ENV) == str(layout.run_lock.resolve()):
        return None
    lock = FileLock(str(layout.run_lock))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return _holder(layout)
    lock.release()
    return None


def _holder(layout: RunLayout) -> str:
    holder = _read_holder(layout)
    try:
        return (f"pid {holder['pid']} on {holder.get('host', '?')}, `{holder['command']}`, "
                f"started {holder['started_at']}")
    except KeyError:
        return f"a process holding {layout.run_lock} (starting up)"
