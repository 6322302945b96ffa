"""Stage `synth`: generate the synthetic open-vocabulary world (images, captions, COCO boxes).

The `shard` stage generates it on demand when `corpus.format: synthetic`; this stage exists so a user
can make (and look at) the world on its own: it also writes `synth/contact_sheet.png`.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.config import RunManifest
from pipeline.layout import RunLayout
from pipeline.synth import generate_world, write_contact_sheet

STAGE = "synth"


def run(manifest: RunManifest) -> dict:
    world = Path(manifest.resolve(manifest.corpus.path) or RunLayout.of(manifest).synth)
    info = generate_world(manifest.synth, world)
    sheet = world / "contact_sheet.png"
    if not sheet.exists():
        write_contact_sheet(world, sheet)
    print(f"synth: world in {world} (contact sheet: {sheet})")
    return info


if __name__ == "__main__":
    from stages.cli import stage_main

    stage_main(STAGE)
