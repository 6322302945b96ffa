"""Per-shard bookkeeping: fingerprints and the completion marker of each shard.

A stage's *fingerprint* hashes its settings and the fingerprints of its inputs (pipeline/runner.py
computes it). A shard is done when its `_stats.json` marker exists and carries the current fingerprint;
the marker is written after the shard's other files, so a shard killed half-way is simply not done. A
rerun does only the shards that are not done; a stage whose fingerprint changed redoes every shard (old
markers no longer match).

    markers = ShardMarkers(layout.labels, fingerprint)
    for shard_id in markers.start_pending(all_shard_ids):
        ... write the shard's files, then:
        markers.mark_done(shard_id, counts={...}, files=[...])
    markers.summary(all_shard_ids)          # {"shards": ..., "counts": ...} for the stage manifest
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from pipeline.io import check_file, file_record, read_json, write_json
from pipeline.layout import StageDir, UnsafeName, inside, shard_name

# Bump when a stage's output format changes incompatibly, so old outputs are recomputed.
# 2: fingerprints are the runner's (sections without runtime-only fields, derived settings, upstream).
# 3: shard rows and markers speak img2dataset's status words (success, failed_to_*; reason, error_message).
FORMAT_VERSION = 3


class StageInputError(RuntimeError):
    """A stage's input is missing, incomplete or stale; the message says which stage to run."""


def fingerprint_of(stage: str, settings: dict, inputs: dict[str, str]) -> str:
    blob = json.dumps({"stage": stage, "settings": settings, "inputs": inputs,
                       "format_version": FORMAT_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# The status of a stage manifest that exists but cannot be used (not JSON, or fields of the wrong shape).
UNREADABLE = "unreadable"
STAGE_NAME = re.compile(r"[a-z][a-z0-9-]*")


def read_stage_manifest(stage_dir: StageDir) -> Optional[dict]:
    """The stage manifest, None when there is none, or {"status": "unreadable", "problem": ...} when the
    file is not a stage manifest (not JSON, or a field of the wrong shape, e.g. crafted): every reader
    (the runner, `status`, `verify`) then sees a stage that is not done, never a field it cannot use."""
    try:
        manifest = read_json(stage_dir.manifest)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:        # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return {"status": UNREADABLE, "problem": f"{type(err).__name__}: {err}"}
    problem = stage_manifest_problem(manifest)
    return manifest if problem is None else {"status": UNREADABLE, "problem": problem}


def stage_manifest_problem(manifest) -> Optional[str]:
    """What makes `manifest` unusable as a stage manifest (the fields every reader relies on), or None."""
    if not isinstance(manifest, dict):
        return f"not a JSON object but a {type(manifest).__name__}"
    if not isinstance(manifest.get("status"), str) or not isinstance(manifest.get("fingerprint", ""), str):
        return "status and fingerprint must be text"
    for key in ("upstream", "outputs", "shards", "counts", "settings"):
        if not isinstance(manifest.get(key, {}), dict):
            return f"{key} must be an object, not {type(manifest[key]).__name__}"
    if not isinstance(manifest.get("last_complete") or {}, dict):
        return "last_complete must be an object"
    for name, fingerprint in manifest.get("upstream", {}).items():
        if not STAGE_NAME.fullmatch(name) or not isinstance(fingerprint, str):
            return f"upstream names a stage {name!r} with fingerprint {fingerprint!r}"
    for name, record in manifest.get("outputs", {}).items():
        if not _file_record_ok(record):
            return f"outputs: {name!r} has no size and checksum record"
    for name, entry in manifest.get("shards", {}).items():
        if not (name.isascii() and name.isdigit()) or not isinstance(entry, dict) \
                or not isinstance(entry.get("files", {}), dict) or not isinstance(entry.get("counts", {}), dict) \
                or not all(_file_record_ok(r) for r in entry.get("files", {}).values()):
            return f"shards: entry {name!r} is not a shard's record"
    return None


def _file_record_ok(record) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("bytes", 0), int) and record.get("bytes", 0) >= 0
            and isinstance(record.get("sha256", ""), str))


@dataclass(frozen=True)
class ShardMarkers:
    """The per-shard markers of one stage folder under one fingerprint."""
    stage_dir: StageDir
    fingerprint: str

    def shard_stats(self, shard_id: int) -> Optional[dict]:
        """The shard's stats if it is done under the current fingerprint, else None."""
        try:
            stats = read_json(self.stage_dir.stats(shard_id))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(stats, dict) or stats.get("fingerprint") != self.fingerprint \
                or not isinstance(stats.get("counts"), dict) or not isinstance(stats.get("files", {}), dict):
            return None
        # A marker vouches for its files: one whose files are gone or changed size (a truncated tar,
        # a deleted sidecar) is not done. Sizes only (a stat per file); `regionclip verify` hashes.
        files = stats.get("files")
        if isinstance(files, dict) and not files_intact(self.stage_dir.root, files):
            return None
        return stats

    def pending(self, shard_ids: Iterable[int]) -> list[int]:
        return [s for s in shard_ids if self.shard_stats(s) is None]

    def start_pending(self, shard_ids: Iterable[int]) -> list[int]:
        """The pending shards, with their stale markers removed before any of their files is replaced."""
        pending = self.pending(shard_ids)
        for shard_id in pending:
            forget_marker(self.stage_dir, shard_id)
        return pending

    def mark_done(self, shard_id: int, counts: dict, files: Iterable[Path], extra: Optional[dict] = None) -> dict:
        return write_shard_stats(self.stage_dir, shard_id, self.fingerprint, counts, files, extra)

    def summary(self, shard_ids: Iterable[int]) -> dict:
        """Every shard's entry and the summed counts, for the stage manifest; every shard must be done."""
        shards, totals = {}, {}
        for s in shard_ids:
            stats = self.shard_stats(s)
            if stats is None:
                raise RuntimeError(f"{self.stage_dir.root}: shard {shard_name(s)} is not done; cannot finish")
            shards[shard_name(s)] = {"status": "done", "counts": stats["counts"], "files": stats["files"],
                                     "seconds": stats.get("seconds")}
            for k, v in stats["counts"].items():
                if isinstance(v, (int, float)):
                    totals[k] = totals.get(k, 0) + v
        return {"shards": shards, "counts": totals}


def forget_marker(stage_dir: StageDir, shard_id: int) -> None:
    """Remove a shard's marker before its files are replaced: a kill between the new files and the new
    marker would otherwise leave the old marker vouching for bytes it never saw."""
    stage_dir.stats(shard_id).unlink(missing_ok=True)


def write_shard_stats(stage_dir: StageDir, shard_id: int, fingerprint: str, counts: dict,
                      files: Iterable[Path], extra: Optional[dict] = None,
                      seconds: Optional[float] = None) -> dict:
    """The per-shard completion marker. Call it only after the shard's files are in place.

    A free function so that Ray workers can call it without holding a ShardMarkers.
    """
    stats = {"shard": shard_name(shard_id), "fingerprint": fingerprint, "counts": counts,
             "files": {Path(p).name: file_record(p) for p in files}, "seconds": seconds}
    if extra:
        stats.update(extra)
    write_json(stage_dir.stats(shard_id), stats)
    return stats


def files_intact(folder: Path, files: dict) -> bool:
    """Cheap check (sizes only, one stat per file) that a marker's files are all still in place; a marker
    naming a file outside its folder vouches for nothing."""
    try:
        return all(isinstance(rec, dict) and check_file(inside(folder, name), rec, full=False) is None
                   for name, rec in files.items())
    except UnsafeName:
        return False
