"""Stage bookkeeping: fingerprints, per-shard completion markers and the stage manifest.

A stage's *fingerprint* hashes its settings and the fingerprints of its inputs. A shard is done when
its `_stats.json` marker exists and carries the current fingerprint; the marker is written after the
shard's other files, so a shard killed half-way is simply not done. A rerun does only the shards that
are not done; a stage whose fingerprint changed redoes everything (old markers no longer match).

    state = StageState.open("label", layout.stage("label"), settings, inputs={"proposals": fp})
    for shard_id in state.start_pending(all_shard_ids):
        ... write the shard's files, then:
        state.mark_shard_done(shard_id, counts={...}, files=[...])
    state.finish()
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from pipeline import __version__
from pipeline.io import file_record, read_json, remove_stale_temporaries, write_json
from pipeline.layout import StageDir, shard_name

# Bump when a stage's output format changes incompatibly, so old outputs are recomputed.
FORMAT_VERSION = 1


class StageInputError(RuntimeError):
    """A stage's input is missing or incomplete; the message says which stage to run first."""


def fingerprint_of(stage: str, settings: dict, inputs: dict[str, str]) -> str:
    blob = json.dumps({"stage": stage, "settings": settings, "inputs": inputs,
                       "format_version": FORMAT_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_stage_manifest(stage_dir: StageDir) -> Optional[dict]:
    try:
        return read_json(stage_dir.manifest)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def require_complete(stage: str, stage_dir: StageDir) -> dict:
    """The manifest of a finished upstream stage, or a clear error naming the command to run."""
    manifest = read_stage_manifest(stage_dir)
    if manifest is None or manifest.get("status") != "done":
        raise StageInputError(f"stage '{stage}' has not finished (no complete {stage_dir.manifest}); "
                              f"run `regionclip {stage} MANIFEST` first")
    return manifest


@dataclass
class StageState:
    stage: str
    stage_dir: StageDir
    settings: dict
    inputs: dict[str, str]
    fingerprint: str
    started: float = field(default_factory=time.time)

    @classmethod
    def open(cls, stage: str, stage_dir: StageDir, settings: dict,
             inputs: Optional[dict[str, str]] = None) -> "StageState":
        inputs = inputs or {}
        stage_dir.root.mkdir(parents=True, exist_ok=True)
        return cls(stage, stage_dir, settings, inputs, fingerprint_of(stage, settings, inputs))

    # -- per-shard markers ---------------------------------------------------------------------
    def shard_stats(self, shard_id: int) -> Optional[dict]:
        """The shard's stats if it is done under the current fingerprint, else None."""
        try:
            stats = read_json(self.stage_dir.stats(shard_id))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(stats, dict) or stats.get("fingerprint") != self.fingerprint:
            return None
        # A marker vouches for its files: one whose files are gone or changed size (a truncated tar,
        # a deleted sidecar) is not done. Sizes only (a stat per file); `regionclip verify` hashes.
        from pipeline.verify import files_intact

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

    def is_done(self, shard_ids: Iterable[int] = ()) -> bool:
        manifest = read_stage_manifest(self.stage_dir)
        return (manifest is not None and manifest.get("status") == "done"
                and manifest.get("fingerprint") == self.fingerprint
                and not self.pending(shard_ids))

    def clean_temporaries(self) -> None:
        remove_stale_temporaries(self.stage_dir.root)

    def mark_shard_done(self, shard_id: int, counts: dict, files: Iterable[Path],
                        extra: Optional[dict] = None) -> dict:
        return write_shard_stats(self.stage_dir, shard_id, self.fingerprint, counts, files, extra)

    # -- the stage manifest ----------------------------------------------------------------------
    def finish(self, shard_ids: Iterable[int] = (), outputs: Iterable[Path] = (),
               extra: Optional[dict] = None) -> dict:
        """Write manifest.json (last) once every shard is done."""
        shard_ids = list(shard_ids)
        shards, totals = {}, {}
        for s in shard_ids:
            stats = self.shard_stats(s)
            if stats is None:
                raise RuntimeError(f"{self.stage}: shard {shard_name(s)} is not done; cannot finish")
            shards[shard_name(s)] = {"status": "done", "counts": stats["counts"], "files": stats["files"],
                                     "seconds": stats.get("seconds")}
            for k, v in stats["counts"].items():
                if isinstance(v, (int, float)):
                    totals[k] = totals.get(k, 0) + v
        manifest = {
            "stage": self.stage,
            "status": "done",
            "fingerprint": self.fingerprint,
            "code_version": __version__,
            "settings": self.settings,
            "inputs": self.inputs,
            "shards": shards,
            "counts": totals,
            "outputs": {Path(p).name: file_record(p) for p in outputs},
            "seconds": round(time.time() - self.started, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if extra:
            manifest.update(extra)
        write_json(self.stage_dir.manifest, manifest)
        return manifest


def forget_marker(stage_dir: StageDir, shard_id: int) -> None:
    """Remove a shard's marker before its files are replaced: a kill between the new files and the new
    marker would otherwise leave the old marker vouching for bytes it never saw."""
    stage_dir.stats(shard_id).unlink(missing_ok=True)


def write_shard_stats(stage_dir: StageDir, shard_id: int, fingerprint: str, counts: dict,
                      files: Iterable[Path], extra: Optional[dict] = None,
                      seconds: Optional[float] = None) -> dict:
    """The per-shard completion marker. Call it only after the shard's files are in place.

    A free function so that Ray workers can call it without holding a StageState.
    """
    stats = {"shard": shard_name(shard_id), "fingerprint": fingerprint, "counts": counts,
             "files": {Path(p).name: file_record(p) for p in files}, "seconds": seconds}
    if extra:
        stats.update(extra)
    write_json(stage_dir.stats(shard_id), stats)
    return stats
