"""Command `detect`: one checkpoint + a vocabulary + images -> detections JSON and labelled pictures.

    regionclip detect MANIFEST --images photo.jpg more/ --vocabulary "cat,dog,hot dog"
    regionclip detect MANIFEST --checkpoint runs/demo/checkpoints/pretrain/student.pt \\
        --vocabulary classes.txt --images photo.jpg --out out/

`--checkpoint`: a transferred detector (checkpoints/transfer/detector_<init>.pt; the default is the
first of transfer.init that exists), or a plain CLIP / student checkpoint for zero-shot detection
(RPN boxes, no box deltas, score sqrt(p * objectness), per-class NMS). `--vocabulary`: a comma list,
a text file (one name per line), a COCO/LVIS JSON, or an .npz from `regionclip vocab`; names are
embedded with the 81 templates by the CLIP text encoder (the checkpoint's own for a CLIP file, the
manifest's teacher for a detector). Proposals come from the manifest's RPN for the purpose: a
detector's from transfer.rpn_checkpoint, zero-shot ones from evaluate.zero_shot_rpn_checkpoint (each
null: proposals.checkpoint or train-rpn's output). Outputs: `<out>/detections.json` and `<out>/<image stem>.png` (default out:
eval/detect/).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import RunManifest
from pipeline.io import write_json
from pipeline.layout import RunLayout

COMMAND = "detect"
HELP = "checkpoint + vocabulary + images -> detections JSON + labelled PNG (--images, --vocabulary)"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", nargs="+", required=True, help="image files or folders")
    parser.add_argument("--vocabulary", required=True,
                        help="class names: 'cat,dog,...', a text file, a COCO/LVIS JSON, or a vocab .npz")
    parser.add_argument("--checkpoint", default=None,
                        help="detector or CLIP/student checkpoint (default: the transfer stage's detector)")
    parser.add_argument("--out", default=None, help="output folder (default: <output_dir>/eval/detect)")
    parser.add_argument("--min-score", type=float, default=0.3, help="score threshold for the picture")
    parser.add_argument("--max-boxes", type=int, default=10, help="detections drawn per picture (highest first)")
    parser.add_argument("--arch", default=None, help="CLIP architecture of a CLIP checkpoint (default "
                        "teacher.arch)")


def image_files(specs: list[str]) -> list[Path]:
    files = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            files.append(path)   # a FIFO or device is refused when read (check_images)
        else:
            raise FileNotFoundError(f"{path}: no such image or folder")
    if not files:
        raise FileNotFoundError(f"no images in {' '.join(specs)}")
    return files


def check_images(files: list[Path]) -> None:
    """Every image decodes (pipeline.images.open_rgb: a regular file, within the pixel limit), or one
    ValueError naming each that does not, before any model is loaded."""
    from pipeline.images import ImageError, open_rgb

    bad = []
    for path in files:
        try:
            open_rgb(path)
        except (ImageError, OSError, EOFError) as err:
            bad.append(f"  {err}")  # names the file
    if bad:
        raise ValueError(f"detect: {len(bad)} of {len(files)} images cannot be used:\n" + "\n".join(bad))


def run(manifest: RunManifest, args: argparse.Namespace) -> dict:
    import torch

    from pipeline.concepts import read_vocabulary
    from pipeline.images import open_rgb
    from trainer.data.images import image_tensor
    from trainer.models.checkpoint import load_checkpoint_file
    from trainer.models.clip import embedding_dim, load_clip
    from trainer.models.detector import build_detector, read_checkpoint_kind
    from pipeline.pictures import LabelledBox, Panel, detection_grid, save_png
    from trainer.evaluation import zero_shot_detect
    from trainer.models.region_encoder import RegionEncoder
    from trainer.engine.device import resolve_device
    from stages.resolve import (apply_test_settings, load_frozen_rpn, load_teacher_clip, rpn_inference,
                                synthetic_world_note)
    from trainer.offline.text_embed import embed_names, load_vocabulary

    images = image_files(args.images)
    check_images(images)  # a non-image or a decompression bomb is a clear error, before any model loads
    note = synthetic_world_note(manifest)
    if note:
        print(note, file=sys.stderr)
    layout = RunLayout.of(manifest)
    cfg = manifest.evaluate
    device = resolve_device(cfg.device)
    checkpoint = Path(args.checkpoint) if args.checkpoint else _default_checkpoint(manifest, layout)
    kind = read_checkpoint_kind(checkpoint)
    arch = args.arch or manifest.teacher.arch
    clip_model = None
    if kind == "clip":
        clip_model = load_clip(arch, checkpoint, allow_partial=manifest.teacher.allow_partial, device=device,
                               trust_torchscript=manifest.teacher.trust_torchscript)
        text_model = clip_model
    else:
        payload_arch = load_checkpoint_file(checkpoint).get("arch") or arch
        arch = payload_arch
        text_model = None

    if args.vocabulary.endswith(".npz"):
        vocab = load_vocabulary(args.vocabulary, None, arch)
        names, embeddings = vocab["names"], torch.from_numpy(vocab["embeddings"]).to(device)
    else:
        names = read_vocabulary(args.vocabulary).names
        model, tokenizer = text_model or load_teacher_clip(manifest, device=device)
        embeddings = torch.from_numpy(embed_names(model, tokenizer, names, manifest.embed.ensemble,
                                                  device=device, progress=False)).to(device)

    purpose = "transfer" if kind == "detector" else "zero_shot"
    rpn = load_frozen_rpn(manifest, purpose, device)
    if kind == "detector":
        detector = build_detector(arch, checkpoint, embeddings, device=device, class_names=names)
        apply_test_settings(detector, cfg)
    else:
        from trainer.models.clip import check_embedding_dim

        model = clip_model[0]
        check_embedding_dim(embedding_dim(model), embeddings.shape[1], "the class embeddings", arch)
        encoder = RegionEncoder.from_clip(model).eval()

    out_dir = Path(args.out) if args.out else layout.detect_output("detections", ".json").parent
    report = {"checkpoint": str(checkpoint), "kind": kind, "arch": arch, "vocabulary": list(names),
              "mode": "detector" if kind == "detector" else "zero-shot (RPN boxes)", "images": []}
    for path in images:
        rgb = open_rgb(path)
        image = image_tensor(rgb, unit_range=True)
        ((boxes, objectness),) = rpn.propose([image], **rpn_inference(manifest, purpose))
        if kind == "detector":
            (found,) = detector.detect([image], [boxes], [objectness])
        else:
            found = zero_shot_detect(encoder, image, boxes, embeddings, objectness=objectness,
                                     objectness_mode=cfg.objectness, min_size=cfg.min_size,
                                     max_size=cfg.max_size, nms_thresh=cfg.zero_shot_nms_thresh,
                                     score_threshold=cfg.score_threshold,
                                     detections_per_image=cfg.detections_per_image)
        detections = [{"box": [round(v, 2) for v in b], "label": names[c], "score": round(float(s), 5)}
                      for b, s, c in zip(found["boxes"].tolist(), found["scores"].tolist(),
                                         found["labels"].tolist())]
        panel = Panel(rgb, [LabelledBox(tuple(d["box"]), d["label"], d["score"]) for d in detections])
        picture = save_png(detection_grid([[panel]], title=path.name, cell=max(512, min(rgb.size)),
                                          min_score=args.min_score, max_per_panel=args.max_boxes),
                           out_dir / f"{path.stem}.png")
        report["images"].append({"image": str(path), "width": rgb.width, "height": rgb.height,
                                 "picture": str(picture), "detections": detections})
        shown = [f"{d['label']} {d['score']:.2f}" for d in detections if d["score"] >= args.min_score]
        print(f"detect: {path.name}: {len(detections)} detections; above {args.min_score}: "
              f"{', '.join(shown[:10]) or 'none'} -> {picture}")
    write_json(out_dir / "detections.json", report)
    print(f"detect: {out_dir / 'detections.json'}")
    return {"out": str(out_dir / "detections.json"), "images": len(report["images"])}


def _default_checkpoint(manifest: RunManifest, layout: RunLayout) -> Path:
    for init in manifest.transfer.init:
        if layout.transfer_checkpoint(init).is_file():
            return layout.transfer_checkpoint(init)
    raise FileNotFoundError("no detector checkpoint: run `regionclip transfer MANIFEST`, or pass --checkpoint "
                            "(a detector, or a CLIP/student checkpoint for zero-shot detection)")
