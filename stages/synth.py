"""Stage `synth`: the synthetic open-vocabulary world (images, captions, COCO boxes with a base/novel
split) that `corpus.format: synthetic` reads. Runs when the corpus is synthetic.

    world   corpus.path (default <output_dir>/synth): captions.tsv, images/, val_images/,
            instances_train.json (base boxes only), instances_val.json (every category), categories.json,
            world.json, contact_sheet.png (the first val images with their boxes)
"""
from __future__ import annotations

from pathlib import Path

from pipeline.layout import RunLayout, synthetic_world
from pipeline.runner import Stage, StageRun

WORLD_FILES = ("world.json", "captions.tsv", "instances_train.json", "instances_val.json", "categories.json",
               "contact_sheet.png")


def enabled(manifest) -> bool:
    return manifest.corpus.format == "synthetic"


def world_files(layout: RunLayout, manifest) -> list[Path]:
    world = synthetic_world(manifest)
    return [world / name for name in WORLD_FILES]


def generator(run: StageRun) -> dict:
    from pipeline.synth import GENERATOR_VERSION

    return {"generator_version": GENERATOR_VERSION}


def generate(run: StageRun) -> dict:
    from pipeline.synth import generate_world, write_contact_sheet

    world = synthetic_world(run.manifest)
    if not all((world / name).is_file() for name in WORLD_FILES if name != "contact_sheet.png"):
        # a file lost (or quarantined by `verify --repair`): world.json no longer vouches for the folder
        (world / "world.json").unlink(missing_ok=True)
    info = generate_world(run.manifest.synth, world)
    sheet = world / "contact_sheet.png"
    write_contact_sheet(world, sheet)
    print(f"synth: world in {world} (contact sheet: {sheet})")
    return {"world": str(world), "counts": info["counts"]}


STAGE = Stage(
    name="synth", help="the synthetic world (images, captions, base/novel boxes) for corpus.format: synthetic",
    sections=("synth",), identify=generator, outputs=world_files, enabled=enabled, work=generate)
run = STAGE.run
