"""How much bf16 autocast changes the GPU stages' outputs (proposals.precision, label.precision),
measured on the CPU (autocast works there too) with the same models and images side by side:

  - proposals: the RPN at fp32 and at bf16 on each image; for every one of the fp32 top-100 boxes its
    best IoU among the bf16 top-100, averaged (1.0 = the same boxes);
  - label: the teacher at fp32 and at bf16 on the same (fp32) boxes; the share of regions whose
    pseudo-label (top-1 concept) is the same, the same for whole images, and the mean absolute change
    of the pseudo-label probability.

    python bench/precision.py [MANIFEST] [--set section.key=value ...] [--max-images 64]

With a finished run of MANIFEST (default manifests/demo.yaml: its trained tiny teacher, its RPN and
concept embeddings) the figures are that run's; without one, a tiny synthetic run with random-weight
models is made in a scratch folder (the figures then say little about trained models). CPU timings of
both precisions are printed too (bf16 is rarely faster on a CPU; the point of bf16 is the GPU).
Prints readable lines, then (last line) one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402

from pipeline.config import load_manifest  # noqa: E402
from pipeline.images import load_rgb  # noqa: E402
from pipeline.layout import RunLayout  # noqa: E402
from pipeline.sidecars import read_shard_images, sidecar_shards, written_keys  # noqa: E402
from trainer.data.images import image_tensor  # noqa: E402
from trainer.offline.labels import Teacher  # noqa: E402
from trainer.offline.proposals import DEFAULT_RPN_LOADER, ProposalJob, Proposer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOP = 100


def run_inputs(manifest, max_images: int):
    """(images, teacher CLIP model, concept embeddings, RPN checkpoint, RPN loader) of a finished run."""
    from stages.resolve import load_teacher_clip, rpn_checkpoint_path

    layout = RunLayout.of(manifest)
    images = []
    for s in sorted(int(p.stem) for p in layout.shards.root.glob("[0-9]*.tar")):
        keys = [k["key"] for k in written_keys(layout.shards, s)][: max_images - len(images)]
        images += [load_rgb(b) for b in read_shard_images(layout.shard_tar(s), keys).values()]
        if len(images) >= max_images:
            break
    model, _ = load_teacher_clip(manifest)
    return images, model, np.load(layout.concept_embeddings), rpn_checkpoint_path(manifest, "proposals"), DEFAULT_RPN_LOADER


def tiny_inputs(root: Path, max_images: int):
    """A tiny synthetic run with random-weight models (tests/labelkit.py), for a machine without a run."""
    from pipeline.config import parse_manifest
    import yaml

    from tests.labelkit import manifest_body, prepare_run, rpn_loader

    body = yaml.safe_load(manifest_body(num_images=max_images, per_shard=max_images))
    manifest = parse_manifest({"name": "precision", "output_dir": str(root), "ray": {"num_cpus": 2}, **body})
    layout = prepare_run(manifest)
    from trainer.models.clip import load_clip

    model, _ = load_clip("RN50-tiny", layout.teacher_checkpoint)
    keys = [k["key"] for k in written_keys(layout.shards, 0)]
    images = [load_rgb(b) for b in read_shard_images(layout.shard_tar(0), keys).values()]
    return images, model, np.load(layout.concept_embeddings), layout.rpn_checkpoint, rpn_loader()


def measure(manifest, images, model, concepts, rpn_checkpoint, loader) -> dict:
    p, lab = manifest.proposals, manifest.label
    batch = p.batch_size
    boxes, seconds = {}, {}
    for precision in ("fp32", "bf16"):
        job = ProposalJob(run_root="", checkpoint=str(rpn_checkpoint), min_size=p.min_size, max_size=p.max_size,
                          pre_nms_top_n=p.pre_nms_top_n, post_nms_top_n=max(p.post_nms_top_n, TOP),
                          nms_thresh=p.nms_thresh, batch_size=batch, fingerprint="", rpn_loader=loader,
                          device="cpu", precision=precision)
        proposer = Proposer(job)
        started = time.perf_counter()
        found = []
        for i in range(0, len(images), batch):
            part = images[i:i + batch]
            found += proposer.propose([image_tensor(im) for im in part], [im.size for im in part])
        seconds[f"proposals_{precision}"] = time.perf_counter() - started
        boxes[precision] = [b[:TOP] for b, _ in found]
    ious = []
    for b32, b16 in zip(boxes["fp32"], boxes["bf16"]):
        if len(b32) and len(b16):
            ious.append(box_iou(torch.from_numpy(b32), torch.from_numpy(b16)).max(1).values.numpy())
    mean_iou = float(np.concatenate(ious).mean()) if ious else float("nan")

    min_size, max_size = lab.min_size or p.min_size, lab.max_size or p.max_size
    labels = {}
    for precision in ("fp32", "bf16"):
        teacher = Teacher(model, concepts, min_size=min_size, max_size=max_size, temperature=lab.temperature,
                          device="cpu", precision=precision)
        started = time.perf_counter()
        region_labels, region_probs, image_labels = [], [], []
        for i in range(0, len(images), lab.batch_size):
            out = teacher.embed(images[i:i + lab.batch_size], boxes["fp32"][i:i + lab.batch_size])
            flat = torch.cat(out.regions)
            y, prob = teacher.score(flat)
            region_labels.append(y)
            region_probs.append(prob)
            image_labels.append(teacher.score(out.images)[0])
        seconds[f"label_{precision}"] = time.perf_counter() - started
        labels[precision] = [np.concatenate(x) for x in (region_labels, region_probs, image_labels)]
    (y32, p32, i32), (y16, p16, i16) = labels["fp32"], labels["bf16"]
    return {
        "images": len(images),
        "regions": int(len(y32)),
        "proposals_top100_mean_iou": round(mean_iou, 4),
        "label_top1_agreement": round(float((y32 == y16).mean()), 4),
        "image_label_top1_agreement": round(float((i32 == i16).mean()), 4),
        "label_prob_mean_abs_change": round(float(np.abs(p32 - p16).mean()), 5),
        **{f"cpu_seconds_{k}": round(v, 3) for k, v in seconds.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", nargs="?", default=str(REPO / "manifests" / "demo.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--max-images", type=int, default=64)
    args = parser.parse_args()
    manifest = load_manifest(args.manifest, args.overrides)
    layout = RunLayout.of(manifest)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        if sidecar_shards(layout.proposals) and (layout.concept_embeddings).is_file():
            source = f"run {layout.root}"
            inputs = run_inputs(manifest, args.max_images)
        else:
            source = "a tiny synthetic run with random-weight models (no finished run of the manifest)"
            inputs = tiny_inputs(Path(tmp) / "run", args.max_images)
            manifest = load_manifest(args.manifest, args.overrides + [
                "proposals.min_size=128", "proposals.max_size=192", "label.min_size=128", "label.max_size=192",
                "label.batch_size=2", "proposals.batch_size=2"])
        print(f"precision bench: {source}; {len(inputs[0])} images, CPU autocast bf16 vs fp32, "
              f"torch threads {torch.get_num_threads()}")
        figures = measure(manifest, *inputs)
    figures["source"] = "run" if source.startswith("run") else "tiny_random"
    print(f"  proposals: mean best IoU of the fp32 top-{TOP} among the bf16 top-{TOP}: "
          f"{figures['proposals_top100_mean_iou']}")
    print(f"  label: pseudo-label top-1 agreement {figures['label_top1_agreement']} over {figures['regions']} "
          f"regions; whole images {figures['image_label_top1_agreement']}; mean |prob change| "
          f"{figures['label_prob_mean_abs_change']}")
    print("  CPU seconds: " + ", ".join(f"{k[12:]} {v}" for k, v in figures.items() if k.startswith("cpu_seconds_")))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
