"""Command `coco-ovd-split`: the COCO open-vocabulary split (OVR-CNN: 48 base / 17 novel, docs/method.md §6)
from the standard COCO 2017 instances files.

    regionclip coco-ovd-split MANIFEST --train instances_train2017.json --val instances_val2017.json
    regionclip coco-ovd-split MANIFEST --train ... --val ... --out-dir data/coco/ovd

Writes the train split (base annotations only, images with at least one base box) and the val split
(the 65 classes, images with at least one of their boxes); every category keeps its COCO id and
gains `split: base|novel`. Without --out-dir the files go where the manifest's transfer.annotations
and transfer.val_annotations point (so the manifest is ready to run); with it, they are
`instances_train2017_base48.json` and `instances_val2017_ovd65.json` in that folder.
"""
from __future__ import annotations

import argparse

from pipeline.config import RunManifest

COMMAND = "coco-ovd-split"
HELP = "COCO instances files -> the 48 base / 17 novel open-vocabulary split (--train, --val)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", required=True, help="COCO instances_train2017.json")
    parser.add_argument("--val", required=True, help="COCO instances_val2017.json")
    parser.add_argument("--out-dir", default=None, help="folder for the two split files (default: the "
                        "manifest's transfer.annotations and transfer.val_annotations)")


def run(manifest: RunManifest, args: argparse.Namespace) -> dict:
    from trainer.data.detection import write_coco_ovd_split

    t = manifest.transfer
    if args.out_dir is None and not (t.annotations and t.val_annotations):
        raise ValueError("give --out-dir, or set transfer.annotations and transfer.val_annotations in the "
                         "manifest (the split is written there)")
    result = write_coco_ovd_split(args.train, args.val, args.out_dir,
                                  train_out=None if args.out_dir else manifest.resolve(t.annotations),
                                  val_out=None if args.out_dir else manifest.resolve(t.val_annotations))
    print(f"coco-ovd-split: train {result['train_images']} images / {result['train_annotations']} base boxes "
          f"-> {result['train']}; val {result['val_images']} images / {result['val_annotations']} boxes "
          f"-> {result['val']}")
    return result
