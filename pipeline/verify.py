"""Integrity of a run directory: every output file against the checksums its stage recorded.

Each shard marker (`NNNNN_stats.json`) records `files: {name: {bytes, sha256}}` for the shard's files,
and each stage manifest records its stage-level `outputs` the same way (and, for per-shard stages,
the shards it expects). `verify_run` re-reads all of them and returns one `Damage` per damaged file:

    missing             a recorded file (or a whole shard, marker included) is gone
    size mismatch       e.g. a truncated tar or Parquet
    checksum mismatch   same size, different bytes (an altered byte)
    unreadable marker   a marker or stage manifest that is not valid JSON
    unsafe name         a marker or stage manifest naming a file outside its folder (`../x`, `/x`, a
                        link leading out): the name is never followed; the marker is what is damaged

`quarantine` makes the next run redo exactly the damaged work: each damaged file and the marker of
its shard are renamed to `<name>.damaged` (kept for inspection; delete them at will) and the stage
manifest's status becomes `damaged`, so the stage is no longer "done" and its rerun writes only the
shards whose markers are gone. Shards that are intact keep their files and markers untouched.

    damages = verify_run(manifest, ["shard", "concepts", ...])     # the stages to check, in order
    quarantine(manifest, damages)

Every name read from a marker or a stage manifest is resolved inside its folder (`pipeline.layout.inside`);
the one exception is a stage output the run's own manifest puts elsewhere (the synthetic world in
corpus.path), which must lie inside that folder.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from pipeline.io import CHECKSUM, MISSING, SIZE, check_file, read_json, sha256_file, write_json
from pipeline.layout import RunLayout, StageDir, UnsafeName, inside, shard_name, synthetic_world
from pipeline.stage import UNREADABLE as STAGE_UNREADABLE, read_stage_manifest

DAMAGED_SUFFIX = ".damaged"

UNREADABLE = "unreadable marker"
UNSAFE = "unsafe name"


@dataclass(frozen=True)
class Damage:
    stage: str
    shard: Optional[str]       # "00003", or None for a stage-level output / the stage manifest
    file: str                  # path relative to the run directory
    problem: str               # one of MISSING, SIZE, CHECKSUM, UNREADABLE (+ detail after ": ")
    marker: Optional[str] = None  # the shard's marker (relative path) that vouched for the file

    def as_dict(self) -> dict:
        return {"stage": self.stage, "shard": self.shard, "file": self.file, "problem": self.problem}


def marker_dirs(layout: RunLayout, stage: str) -> list[StageDir]:
    """The folders holding a stage's per-shard markers (sidecar stages keep them beside the Parquet)."""
    return {"shard": [layout.shards], "concepts": [layout.caption_concepts],
            "embed": [layout.caption_embeddings], "proposals": [layout.proposals],
            "label": [layout.labels]}.get(stage, [layout.stage(stage)])


def run_roots(manifest) -> tuple[Path, ...]:
    """The folders a run's recorded names may lead into: the run folder, and the synthetic world when the
    manifest puts it elsewhere (corpus.path; the synth stage records its outputs there by absolute name)."""
    if isinstance(manifest, RunLayout):
        return (manifest.root,)
    layout = RunLayout.of(manifest)
    roots = [layout.root]
    if manifest.corpus.format == "synthetic":
        roots.append(synthetic_world(manifest))
    return tuple(roots)


def _recorded_path(folder: Path, name, roots: tuple[Path, ...], entry_only: bool = False) -> Path:
    """A name recorded in a marker or stage manifest: relative to its folder, or (stage outputs only)
    absolute inside one of the run's roots. UnsafeName otherwise."""
    if isinstance(name, str) and os.path.isabs(name):
        for root in roots:
            try:
                return inside(root, os.path.relpath(name, root), entry_only=entry_only)
            except UnsafeName:
                continue
        raise UnsafeName(f"{folder}: {name!r} leads outside the run folder")
    return inside(folder, name, entry_only=entry_only)


def _rel(layout: RunLayout, path: Path) -> str:
    try:
        return str(Path(path).relative_to(layout.root))
    except ValueError:
        return str(path)


def verify_stage(layout: RunLayout, stage: str, full: bool = True, roots: tuple[Path, ...] = ()) -> list[Damage]:
    """The damaged files of one stage; `roots`: run_roots (default: the run folder alone)."""
    roots = roots or (layout.root,)
    stage_dir = layout.stage(stage)
    if not stage_dir.manifest.exists():
        return []
    manifest = read_stage_manifest(stage_dir)
    if manifest is not None and manifest.get("status") == STAGE_UNREADABLE:
        # not JSON, or fields of the wrong shape: never "intact"
        return [Damage(stage, None, _rel(layout, stage_dir.manifest), f"{UNREADABLE}: {manifest['problem']}")]
    if manifest is None:
        return []
    found: dict[str, Damage] = {}

    def add(shard, path, problem, marker=None):
        key = _rel(layout, path)
        if key not in found:
            found[key] = Damage(stage, shard, key, problem, marker)

    outputs, shards = manifest.get("outputs"), manifest.get("shards")
    for name, record in (outputs if isinstance(outputs, dict) else {}).items():
        try:
            path = _recorded_path(stage_dir.root, name, roots)
        except UnsafeName:
            add(None, stage_dir.manifest, f"{UNSAFE}: outputs name {name!r}, outside the run folder")
            continue
        problem = check_file(path, record if isinstance(record, dict) else {}, full)
        if problem:
            add(None, path, problem)

    expected = {str(s): entry for s, entry in (shards if isinstance(shards, dict) else {}).items()}
    for folder in marker_dirs(layout, stage):
        on_disk = {p.name[:-len("_stats.json")] for p in folder.root.glob("*_stats.json")} \
            if folder.root.is_dir() else set()
        for name in sorted(set(expected) | on_disk):
            if not (name.isascii() and name.isdigit()):
                continue
            sid = int(name)
            marker = folder.stats(sid)
            entry = expected.get(name) or {}
            recorded = entry.get("files") if isinstance(entry, dict) else None
            if not marker.exists():
                add(name, marker, MISSING, _rel(layout, marker))
                # Name the shard's files too: from the stage manifest when it recorded them, else the
                # sidecar Parquet every per-shard stage writes.
                for fname, rec in (recorded if isinstance(recorded, dict) else {}).items():
                    try:
                        path = inside(folder.root, fname)
                    except UnsafeName:
                        add(None, stage_dir.manifest, f"{UNSAFE}: shard {name} names {fname!r}, outside "
                            "its folder")
                        continue
                    problem = check_file(path, rec if isinstance(rec, dict) else {}, full)
                    if problem:
                        add(name, path, problem, _rel(layout, marker))
                if not recorded and not folder.parquet(sid).exists():
                    add(name, folder.parquet(sid), MISSING, _rel(layout, marker))
                continue
            try:
                stats = read_json(marker)
                files = stats["files"]
                if not isinstance(files, dict):
                    raise ValueError("files is not a mapping")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
                add(name, marker, f"{UNREADABLE}: {type(err).__name__}", _rel(layout, marker))
                continue
            for fname, rec in files.items():
                try:
                    path = inside(folder.root, fname)
                except UnsafeName:
                    # The marker itself is what is damaged: the name is never followed, and repairing
                    # quarantines the marker so that the shard is redone.
                    add(name, marker, f"{UNSAFE}: names {fname!r}, outside its folder", _rel(layout, marker))
                    continue
                problem = check_file(path, rec if isinstance(rec, dict) else {}, full)
                if problem:
                    add(name, path, problem, _rel(layout, marker))
    return list(found.values())


def verify_run(manifest, stages: Iterable[str], full: bool = True) -> list[Damage]:
    """Every damaged file of the run, stage by stage (`stages`: their names, e.g. the registry's in
    stages/registry.py). `full=False` compares sizes only (fast)."""
    layout = manifest if isinstance(manifest, RunLayout) else RunLayout.of(manifest)
    roots = run_roots(manifest)
    damages: list[Damage] = []
    for stage in stages:
        damages += verify_stage(layout, stage, full, roots)
    return damages


def damaged_name(path: Path) -> Path:
    return path.with_name(path.name + DAMAGED_SUFFIX)


def quarantine(manifest, damages: Iterable[Damage]) -> dict:
    """Make the next run redo exactly the damaged work (see the module doc). Returns what was moved.
    `manifest`: the run manifest (or its RunLayout). Only names inside the run's roots are renamed
    (UnsafeName otherwise: damages come from verify_run, which names nothing else)."""
    layout = manifest if isinstance(manifest, RunLayout) else RunLayout.of(manifest)
    roots = run_roots(manifest)
    moved, stages = [], set()
    for d in damages:
        stages.add(d.stage)
        for rel in {d.file, d.marker} - {None}:
            path = _recorded_path(layout.root, rel, roots, entry_only=True)
            if path.exists() and not path.name.endswith(DAMAGED_SUFFIX):
                path.replace(damaged_name(path))
                moved.append(rel)
    for stage in stages:
        stage_dir = layout.stage(stage)
        try:
            manifest = read_json(stage_dir.manifest)
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(manifest, dict):
            manifest["status"] = "damaged"
            manifest["damaged"] = sorted(d.file for d in damages if d.stage == stage)
            write_json(stage_dir.manifest, manifest)
    return {"moved": sorted(set(moved)), "stages": sorted(stages)}


def damage_table(damages: list[Damage]) -> str:
    cols = ["stage", "shard", "file", "problem"]
    rows = [{c: str(v if v is not None else "-") for c, v in d.as_dict().items()} for d in damages]
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


__all__ = ["Damage", "verify_run", "verify_stage", "quarantine", "files_intact", "damage_table",
           "run_roots", "shard_name"]
