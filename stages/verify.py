"""`regionclip verify MANIFEST [--repair] [--quick]`: every output of the run against the sizes and
sha256 checksums recorded in the shard markers and stage manifests (pipeline/verify.py).

Prints one line per damaged file (stage, shard, file, problem) and exits 1 when anything is damaged,
0 when the run is intact. Without `--repair` nothing is changed. With `--repair` each damaged file
and its shard's marker are renamed to `*.damaged` and the stage manifest is marked `damaged`, so the
next `regionclip run MANIFEST` (or the stage's own command) redoes exactly the damaged shards.
See docs/hardening.md.
"""
from __future__ import annotations

import json

from pipeline.config import RunManifest
from pipeline.layout import RunLayout
from pipeline.verify import damage_table, quarantine, verify_run

COMMAND = "verify"
HELP = "check every output against its recorded checksums; --repair makes the next run redo damaged shards"
# It reads every output of the run: a run still writing them would look damaged.
HOLDS_RUN_LOCK = True


def add_arguments(parser) -> None:
    parser.add_argument("--repair", action="store_true",
                        help="quarantine damaged files and their shards' markers so the next run redoes them")
    parser.add_argument("--quick", action="store_true", help="compare sizes only (no sha256)")
    parser.add_argument("--json", action="store_true", help="print the damage list as JSON")


def run(manifest: RunManifest, args=None) -> dict:
    from stages.stage_list import stage_names

    repair = bool(getattr(args, "repair", False))
    damages = verify_run(manifest, stage_names(), full=not getattr(args, "quick", False))
    layout = RunLayout.of(manifest)
    if getattr(args, "json", False):
        print(json.dumps([d.as_dict() for d in damages], indent=2))
    elif damages:
        print(damage_table(damages))
    result = {"damaged": [d.as_dict() for d in damages]}
    if not damages:
        print(f"verify: {layout.root}: every recorded output matches its checksum")
        return result
    print(f"verify: {len(damages)} damaged file(s) in {len({(d.stage, d.shard) for d in damages})} "
          f"shard(s)/output(s)")
    if repair:
        result["repair"] = quarantine(manifest, damages)
        print(f"verify: quarantined {len(result['repair']['moved'])} file(s) as *.damaged; stages "
              f"{', '.join(result['repair']['stages'])} marked damaged: rerun them to redo exactly those shards")
    else:
        print("verify: run again with --repair so that the next run redoes the damaged shards")
    raise SystemExit(1)
