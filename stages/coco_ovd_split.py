"""Command `coco-ovd-split`: the COCO open-vocabulary split (OVR-CNN: 48 base / 17 novel, REFERENCE §6)
from the standard COCO 2017 instances files.

    regionclip coco-ovd-split MANIFEST --train instances_train2017.json --val instances_val2017.json \\
        --out-dir data/coco/ovd

Writes `instances_train2017_base48.json` (base annotations only, images with at least one base box)
and `instances_val2017_ovd65.json` (the 65 classes, images with at least one of their boxes); every
category keeps its COCO id and gains `split: base|novel`. Point transfer.annotations and
transfer.val_annotations at them (and transfer.images_root / val_images_root at train2017/, val2017/).
"""
from __future__ import annotations

import argparse

from pipeline.config import RunManifest

STAGE = "coco-ovd-split"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", required=True, help="COCO instances_train2017.json")
    parser.add_argument("--val", required=True, help="COCO instances_val2017.json")
    parser.add_argument("--out-dir", required=True, help="folder for the two split files")


def run(manifest: RunManifest, args: argparse.Namespace) -> dict:
    from trainer.detection_data import write_coco_ovd_split

    result = write_coco_ovd_split(args.train, args.val, args.out_dir)
    print(f"coco-ovd-split: train {result['train_images']} images / {result['train_annotations']} base boxes "
          f"-> {result['train']}; val {result['val_images']} images / {result['val_annotations']} boxes "
          f"-> {result['val']}")
    return result


if __name__ == "__main__":
    from stages.cli import stage_main

    stage_main(STAGE)
