"""Why a demo run's figures are what they are: per-class region recognition of both models, the
teacher's training, the pseudo-labels per concept and the student's losses, for one or more finished
run folders of manifests/demo.yaml (or demo-small.yaml).

    python bench/demo_diagnose.py runs/demo                       # one run
    python bench/demo_diagnose.py runs/a runs/b --manifest manifests/demo.yaml --max-images 600

For each run folder it prints (and writes as JSON to <run>/eval/diagnosis.json):
- region top-1 per category (GT boxes of the held-out set, the evaluation scale) for the teacher and
  the student, and for the teacher at the scale it labels at (label.min_size): what it knows there;
- the teacher's held-out retrieval after each epoch and its loss (train-teacher's stage report);
- per concept of the world: how many stored proposals overlap one of its objects (IoU >= 0.5), the
  share of those the teacher labels correctly (pseudo-label accuracy), how many of all kept regions
  (teacher probability > pretrain.keep_threshold) carry its label, and the share of those that are
  right (the synthetic world redraws every corpus image's objects, so the truth is known);
- the student's losses over its last steps (pretrain's TensorBoard scalars): still falling or flat.

The last line is one JSON object (the project's convention for bench figures).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

IOU_MATCH = 0.5
LOSS_TAGS = ("loss_region_concept", "loss_distill", "loss_image_caption", "loss_total")   # pretrain/<name>


def load_run(manifest_path: Path, run_dir: Path):
    from pipeline.config import load_manifest
    from pipeline.layout import RunLayout

    manifest = load_manifest(manifest_path, [f"output_dir={run_dir.resolve()}"])
    return manifest, RunLayout.of(manifest)


def per_class_recognition(manifest, which: str, min_size: int, max_size: int, max_images: int) -> dict:
    """{category: {"regions", "top1", "confused_with"}} and the novel/base means, GT boxes of the val set."""
    import torch

    from stages.resolve import annotation_file, class_embeddings, clip_checkpoint, detection_images, load_teacher_clip
    from trainer.data.detection import DetectionSet
    from trainer.evaluation import zero_shot_detect
    from trainer.models.clip import load_clip
    from trainer.models.region_encoder import RegionEncoder

    data = DetectionSet(annotation_file(manifest, "val"), **detection_images(manifest, "val"))
    vocab = data.vocabulary("all")
    novel = set(data.category_split["novel"])
    embeddings = class_embeddings(manifest, vocab.names, "cpu", load_teacher_clip(manifest, device="cpu"))
    model, _ = load_clip(manifest.teacher.arch, clip_checkpoint(manifest, which), device="cpu")
    encoder = RegionEncoder.from_clip(model).eval()
    hits, totals, confusions = Counter(), Counter(), defaultdict(Counter)
    with torch.no_grad():
        for image_id in [im["id"] for im in data.images][:max_images]:
            boxes, labels = data.targets(image_id, vocab)
            if not len(labels):
                continue
            found = zero_shot_detect(encoder, data.load_image(data.image_by_id[image_id]), boxes, embeddings,
                                     min_size=min_size, max_size=max_size)
            for pred, label in zip(found["box_labels"].tolist(), labels.tolist()):
                name = vocab.names[label]
                totals[name] += 1
                hits[name] += int(pred == label)
                if pred != label:
                    confusions[name][vocab.names[pred]] += 1
    per_class = {name: {"regions": totals[name], "top1": round(100.0 * hits[name] / totals[name], 1),
                        "novel": cid in novel,
                        "confused_with": confusions[name].most_common(2)}
                 for name, cid in zip(vocab.names, vocab.ids) if totals[name]}

    def region_mean(is_novel: bool):
        n = sum(totals[k] for k, v in per_class.items() if v["novel"] == is_novel)
        h = sum(hits[k] for k, v in per_class.items() if v["novel"] == is_novel)
        return round(100.0 * h / n, 1) if n else None

    return {"scale": [min_size, max_size], "per_class": per_class,
            "top1_novel": region_mean(True), "top1_base": region_mean(False)}


def _iou(boxes: np.ndarray, box) -> np.ndarray:
    x1, y1, w, h = box
    x2, y2 = x1 + w, y1 + h
    ix = np.clip(np.minimum(boxes[:, 2], x2) - np.maximum(boxes[:, 0], x1), 0, None)
    iy = np.clip(np.minimum(boxes[:, 3], y2) - np.maximum(boxes[:, 1], y1), 0, None)
    inter = ix * iy
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + w * h - inter, 1e-9)


def pseudo_label_quality(manifest, layout) -> dict:
    """Per world category: proposals on its objects, pseudo-label accuracy on them, kept regions
    labelled with it and their precision (IoU >= 0.5 with an object of that category)."""
    import pyarrow.parquet as pq

    from pipeline.sidecars import read_proposals
    from pipeline.synth import render_scene

    concepts = pq.read_table(layout.concepts_parquet).to_pylist()
    concept_name = {r["concept_id"]: r["name"] for r in concepts}
    keep = manifest.pretrain.keep_threshold
    on_objects, correct = Counter(), Counter()
    kept_with_label, kept_right = Counter(), Counter()
    kept_total = 0
    # every region's (teacher probability, right?, on a novel object?, labelled novel?) for the sweep below
    sweep_rows: list[tuple[float, bool, bool, bool]] = []
    world = json.loads((layout.synth / "world.json").read_text()) if (layout.synth / "world.json").is_file() else {}
    novel_names = set(world.get("novel_categories", []))
    for labels_path in sorted(layout.labels.root.glob("[0-9]*.parquet")):
        shard_id = int(labels_path.stem)
        urls = {r["key"]: r["url"] for r in pq.read_table(layout.shards.parquet(shard_id),
                                                          columns=["key", "url", "status"]).to_pylist()
                if r["status"] == "success"}
        proposals = read_proposals(layout.proposals, shard_id)
        labels = pq.read_table(labels_path, columns=["key", "pseudo_label", "pseudo_prob"]).to_pylist()
        for row in labels:
            index = int(Path(urls[row["key"]]).stem)
            objects = render_scene(manifest.synth, "train", index).objects
            boxes = np.asarray(proposals[row["key"]].boxes, dtype=np.float64).reshape(-1, 4)
            truth = [None] * len(boxes)        # the category of the object each proposal covers, if any
            best = np.zeros(len(boxes))
            for obj in objects:
                iou = _iou(boxes, obj.box)
                better = (iou >= IOU_MATCH) & (iou > best)
                best = np.where(better, iou, best)
                for i in np.nonzero(better)[0]:
                    truth[i] = obj.name
            for name_true, label, prob in zip(truth, row["pseudo_label"], row["pseudo_prob"]):
                name = concept_name.get(label, str(label))
                if name_true is not None:
                    on_objects[name_true] += 1
                    correct[name_true] += int(name == name_true)
                sweep_rows.append((prob, name == name_true, name_true in novel_names, name in novel_names))
                if prob > keep:
                    kept_total += 1
                    kept_with_label[name] += 1
                    kept_right[name] += int(name == name_true)
    names = sorted(set(on_objects) | set(kept_with_label))
    probs = np.array([r[0] for r in sweep_rows])
    right, on_novel, says_novel = (np.array([r[i] for r in sweep_rows], dtype=bool) for i in (1, 2, 3))
    sweep = {}
    for threshold in (0.1, 0.3, 0.5, 0.7, 0.9):
        kept = probs > threshold
        sweep[threshold] = {
            "kept_share": round(float(kept.mean()), 3),
            "precision": round(100.0 * float(right[kept].mean()), 1) if kept.any() else None,
            "novel_labels_kept": int((kept & says_novel).sum()),
            "novel_label_precision": (round(100.0 * float(right[kept & says_novel].mean()), 1)
                                      if (kept & says_novel).any() else None),
            "novel_objects_kept_right": int((kept & on_novel & right).sum())}
    return {"keep_threshold": keep, "kept_regions": kept_total, "threshold_sweep": sweep, "per_concept": {
        name: {"proposals_on_objects": on_objects[name],
               "pseudo_label_accuracy": round(100.0 * correct[name] / on_objects[name], 1) if on_objects[name] else None,
               "kept_with_label": kept_with_label[name],
               "kept_precision": round(100.0 * kept_right[name] / kept_with_label[name], 1) if kept_with_label[name] else None}
        for name in names}}


def teacher_training(layout) -> dict:
    """train-teacher's per-epoch held-out retrieval and loss, from its stage report."""
    for path in (layout.checkpoints("teacher") / "manifest.json", layout.root / "train-teacher" / "manifest.json"):
        if path.is_file():
            report = json.loads(path.read_text())
            metrics = (report.get("result") or report).get("metrics") or {}
            return {"epochs": [{k: e.get(k) for k in ("epoch", "loss", "r1", "r5", "r1_same_group")}
                               for e in metrics.get("epochs", [])]}
    return {"epochs": None}


def student_losses(layout, last: int = 50) -> dict:
    """Each pretrain loss averaged over the first and the last `last` logged steps, and the slope of a
    straight line through the last ones (per 100 steps): negative and large is still falling."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return {"error": "tensorboard is not installed"}
    folder = layout.tensorboard / "pretrain"
    if not folder.is_dir():
        return {"error": f"{folder}: no TensorBoard scalars"}
    events = EventAccumulator(str(folder))
    events.Reload()
    out = {}
    for tag in events.Tags().get("scalars", []):
        if tag.rsplit("/", 1)[-1] not in LOSS_TAGS:
            continue
        points = events.Scalars(tag)
        steps = np.array([p.step for p in points], dtype=float)
        values = np.array([p.value for p in points], dtype=float)
        tail = slice(max(0, len(values) - max(2, last // 10)), None)   # logged every log_every steps
        slope = float(np.polyfit(steps[tail], values[tail], 1)[0] * 100) if len(values[tail]) > 1 else None
        out[tag] = {"first": round(float(values[: max(1, len(values) // 10)].mean()), 4),
                    "last": round(float(values[tail].mean()), 4),
                    "slope_per_100_steps_at_end": None if slope is None else round(slope, 4)}
    return out


def diagnose(manifest_path: Path, run_dir: Path, max_images: int) -> dict:
    manifest, layout = load_run(manifest_path, run_dir)
    ev, lab = manifest.evaluate, manifest.label
    # a run still under way gets the parts its finished stages allow
    recognition = {
        "teacher": per_class_recognition(manifest, "teacher", ev.min_size, ev.max_size, max_images),
        "teacher_at_label_scale": per_class_recognition(manifest, "teacher", lab.min_size, lab.max_size, max_images)}
    if layout.student_checkpoint.is_file():
        recognition["student"] = per_class_recognition(manifest, "pretrain", ev.min_size, ev.max_size, max_images)
    result = {"run": str(run_dir), "teacher_training": teacher_training(layout), "recognition": recognition,
              "pseudo_labels": pseudo_label_quality(manifest, layout) if any(layout.labels.root.glob("*_stats.json"))
              else None,
              "student_losses": student_losses(layout)}
    (layout.root / "eval").mkdir(parents=True, exist_ok=True)
    (layout.root / "eval" / "diagnosis.json").write_text(json.dumps(result, indent=1))
    return result


def print_report(result: dict) -> None:
    print(f"== {result['run']}")
    for e in result["teacher_training"]["epochs"] or []:
        print(f"  teacher epoch {e['epoch']}: loss {e['loss']}, held-out R@1 {e['r1']}, same-concepts R@1 "
              f"{e['r1_same_group']}")
    rec = result["recognition"]
    names = list(rec["teacher"]["per_class"])
    print("  region top-1 per class: teacher (eval scale) | teacher (label scale) | student; novel first")
    for name in sorted(names, key=lambda n: not rec["teacher"]["per_class"][n]["novel"]):
        row = [rec[m]["per_class"].get(name, {}) for m in rec]
        mark = "*" if row[0].get("novel") else " "
        print(f"   {mark}{name:9s} n={row[0].get('regions'):4d}  " + " | ".join(
            f"{r.get('top1', 0):5.1f} {str(r.get('confused_with', ''))[:34]:34s}" for r in row))
    for m in rec:
        print(f"  {m}: novel {rec[m]['top1_novel']}, base {rec[m]['top1_base']}")
    pl = result["pseudo_labels"] or {"kept_regions": None, "keep_threshold": None, "per_concept": {},
                                     "threshold_sweep": {}}
    print(f"  pseudo-labels: {pl['kept_regions']} kept regions (p > {pl['keep_threshold']})")
    for name, v in sorted(pl["per_concept"].items(), key=lambda kv: -kv[1]["proposals_on_objects"]):
        print(f"    {name:9s} on objects {v['proposals_on_objects']:6d}  label acc {v['pseudo_label_accuracy']}  "
              f"kept with label {v['kept_with_label']:6d}  precision {v['kept_precision']}")
    for threshold, v in pl["threshold_sweep"].items():
        print(f"    keep p > {threshold}: {v}")
    for tag, v in result["student_losses"].items():
        print(f"  student {tag}: {v}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="finished run folders")
    parser.add_argument("--manifest", default=str(REPO / "manifests" / "demo.yaml"),
                        help="the manifest the runs were made with (their output_dir is replaced)")
    parser.add_argument("--max-images", type=int, default=100000, help="held-out images to score")
    args = parser.parse_args()
    results = []
    for run in args.runs:
        result = diagnose(Path(args.manifest), Path(run), args.max_images)
        print_report(result)
        results.append(result)
    print(json.dumps([{"run": r["run"], **{f"{m}_novel": r["recognition"][m]["top1_novel"]
                                           for m in r["recognition"]}} for r in results]))


if __name__ == "__main__":
    main()
