"""Stage `evaluate`: the transferred detectors and zero-shot inference on the evaluation set
(docs/method.md §6-7), with the all-class vocabulary (base + novel: the classifier is swapped, nothing else).

    data      transfer.val_annotations (default: the synthetic world's instances_val.json, all classes)
    detectors checkpoints/transfer/detector_<init>.pt for each of transfer.init, and each file of
              evaluate.detectors (e.g. RegionCLIP's released detector); proposals (NMS 0.7) of the
              detectors' RPN (transfer.rpn_checkpoint)
    zero-shot each CLIP of evaluate.zero_shot (teacher, pretrain = the student):
              GT boxes; RPN boxes of evaluate.zero_shot_rpn_checkpoint (NMS 0.9, top 1000, no box
              deltas, per-class NMS 0.5, score sqrt(p * sigmoid(objectness)) or the raw logit with
              evaluate.objectness: raw); region recognition (top-1 over GT regions, novel / base / all)
    RPN check an RPN whose checkpoint records training categories (train-rpn's do) that include
              evaluation-novel classes gets a logged warning naming them: its novel AP is not an
              open-vocabulary figure
    output    eval/metrics_<name>.json, eval/detections_<name>.json (COCO results),
              eval/detections_<name>.png (a few held-out images with that model's detections),
              eval/detections.png (those images side by side: ground truth, each detector, each
              zero-shot model on RPN boxes), and the `evaluate` section of eval/summary.json: the
              headline figures, the images and GT regions they rest on, and a 95% interval for every
              student - teacher margin (a paired bootstrap over the images, trainer/evaluation.py)

COCO-style sets report box AP50 over novel, base and all categories (pycocotools) plus the usual AP
table; LVIS sets (categories with `frequency`) report AP, APr, APc, APf with the LVIS API.
"""
from __future__ import annotations

import logging
import time

from pipeline.layout import RunLayout
from pipeline.runner import Stage, StageRun
from stages.resolve import rpn_from_train_rpn, teacher_from_train_teacher

SUMMARY_SECTION = "evaluate"
PICTURE_IMAGES = 4        # held-out images in the detection pictures
PICTURE_MIN_SCORE = 0.15  # detections drawn: this score or more (a softmax over every class and the
PICTURE_MAX_BOXES = 4     # background rarely gives more), the top 4 per image

log = logging.getLogger(__name__)


def reads(manifest) -> tuple[str, ...]:
    upstream = ()
    if manifest.transfer.val_annotations is None and manifest.corpus.format == "synthetic":
        upstream += ("synth",)
    if manifest.transfer.init:
        upstream += ("transfer",)
    if "pretrain" in manifest.evaluate.zero_shot:
        upstream += ("pretrain",)
    if teacher_from_train_teacher(manifest):
        upstream += ("train-teacher",)
    from_train_rpn = any(rpn_from_train_rpn(manifest, purpose) for purpose in rpn_purposes(manifest))
    return upstream + (("train-rpn",) if from_train_rpn else ())


def rpn_purposes(manifest) -> list[str]:
    """The RPNs evaluate uses: the detectors' (transfer) and zero-shot inference's."""
    detectors = manifest.transfer.init or manifest.evaluate.detectors
    return (["transfer"] if detectors else []) + (["zero_shot"] if manifest.evaluate.zero_shot else [])


def data_and_models(run: StageRun) -> dict:
    """What the figures depend on beyond the evaluate section: the evaluation set, the models (by
    checksum) and how the detectors and the RPN are set up."""
    from pipeline.io import sha256_file
    from stages.resolve import annotation_file, clip_checkpoint, rpn_checkpoint_file, rpn_inference

    manifest = run.manifest
    p = manifest.proposals
    rpns = {purpose: rpn_checkpoint_file(manifest, purpose) for purpose in rpn_purposes(manifest)}
    return {"val_annotations": sha256_file(annotation_file(manifest, "val")),
            "rpn": {"min_size": p.min_size, "max_size": p.max_size,
                    "pre_nms_top_n": {purpose: rpn_inference(manifest, purpose)["pre_nms_top_n"] for purpose in rpns},
                    # loaded (or refused) by the work
                    "checkpoints": {purpose: sha256_file(path) if path.is_file() else "missing"
                                    for purpose, path in rpns.items()}},
            "ensemble": manifest.embed.ensemble,
            "detectors": {"init": list(dict.fromkeys(manifest.transfer.init)),
                          "allow_partial": manifest.transfer.allow_partial,
                          "files": {name: sha256_file(path) if path.is_file() else "missing"
                                    for name, path in extra_detectors(manifest).items()}},
            "clip_checkpoints": {which: sha256_file(clip_checkpoint(manifest, which))
                                 for which in dict.fromkeys(["teacher", *manifest.evaluate.zero_shot])}}


def extra_detectors(manifest) -> dict:
    """evaluate.detectors: name -> path (relative to the manifest)."""
    return {name: manifest.resolve(path) for name, path in manifest.evaluate.detectors.items()}


def evaluate(run: StageRun) -> dict:
    from tqdm import tqdm

    from trainer.models.clip import load_clip
    from trainer.data.detection import DetectionSet
    from trainer.models.detector import build_detector
    from trainer.evaluation import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, Ap50Matches, RecognitionTally,
                                    coco_evaluate, image_features, lvis_evaluate,
                                    margin_intervals, merge_summary, results_table, to_coco_results,
                                    zero_shot_detect)
    from trainer.models.region_encoder import RegionEncoder
    from trainer.engine.device import resolve_device
    from pipeline.io import write_json
    from stages.resolve import (annotation_file, apply_test_settings, class_embeddings, clip_checkpoint,
                                detection_images, load_frozen_rpn, load_teacher_clip, rpn_checkpoint_file,
                                rpn_inference)
    from trainer.tasks.rpn import novel_classes_seen
    from trainer.tasks.transfer import compute_proposals, detect_dataset, rpn_proposal_fn

    manifest, layout = run.manifest, run.layout
    cfg, t = manifest.evaluate, manifest.transfer
    device = resolve_device(cfg.device)
    detector_files = {init: layout.transfer_checkpoint(init) for init in dict.fromkeys(t.init)}
    detector_files.update(extra_detectors(manifest))
    started = time.time()

    val_path = annotation_file(manifest, "val")
    data = DetectionSet(val_path, **detection_images(manifest, "val"))  # images are read as they are used
    vocab = data.vocabulary("all")
    novel_ids = set(data.category_split["novel"])
    image_ids = data.evaluation_image_ids()[: cfg.max_images]
    names = dict(zip(vocab.ids, vocab.names))
    embeddings = class_embeddings(manifest, vocab.names, device, load_teacher_clip(manifest, device=device))
    print(f"evaluate: {len(image_ids)} images of {val_path} ({data.kind}), {len(vocab)} classes "
          f"({len(novel_ids)} novel)")

    def score(detections: list[dict]) -> dict:
        if data.kind == "lvis":
            return {"lvis": lvis_evaluate(data.data, detections, max_dets=max(300, cfg.detections_per_image))}
        return coco_evaluate(data.data, detections, data.category_split, image_ids)

    picture_ids = picture_image_ids(data, image_ids, novel_ids, cfg.picture_image)
    pictured: dict[str, list[dict]] = {}     # model name -> its detections on the picture images

    def record(name: str, detections: list[dict], metrics: dict) -> dict:
        write_json(layout.eval_detections(name), detections)
        write_json(layout.eval_metrics(name), metrics)
        pictured[name] = [d for d in detections if d["image_id"] in picture_ids]
        return metrics

    rpns, loaded = {}, {}
    for purpose in rpn_purposes(manifest):
        path = rpn_checkpoint_file(manifest, purpose)
        if path not in loaded:       # one RPN serving both purposes is loaded once
            loaded[path] = load_frozen_rpn(manifest, purpose, device)
            seen = novel_classes_seen(getattr(loaded[path], "training_categories", None),
                                      [names[c] for c in sorted(novel_ids)])
            if seen:
                log.warning("evaluate: the RPN %s (%s) was trained on boxes of %d evaluation-novel classes "
                            "(%s): its proposals favour them, so novel AP is not an open-vocabulary figure; "
                            "an RPN trained on the base classes only gives one", path, purpose, len(seen),
                            ", ".join(seen))
        rpns[purpose] = loaded[path]
    results: dict = {"dataset": str(val_path), "kind": data.kind, "images": len(image_ids),
                     "classes": {"all": len(vocab), "novel": len(novel_ids)}, "detector": {}, "zero_shot": {}}
    # per-image records of every model on the same images, for the margins' bootstrap intervals (COCO sets)
    tallies: dict = {}
    matches: dict = {"gt_boxes": {}, "detector": {}}
    coco_kind = data.kind != "lvis"

    # -- transferred detectors (ours, and those of evaluate.detectors) -------------------------------------
    if detector_files:
        proposals = compute_proposals(rpn_proposal_fn(rpns["transfer"], **rpn_inference(manifest, "transfer")),
                                      data, image_ids, desc="val proposals", folder=run.stage_dir.root)
        for init, checkpoint in detector_files.items():
            detector = build_detector(manifest.teacher.arch, checkpoint, embeddings,
                                      allow_partial=t.allow_partial, device=device, class_names=vocab.names)
            apply_test_settings(detector, cfg)
            t0 = time.time()
            detections = detect_dataset(detector, data, vocab, image_ids, proposals)
            metrics = score(detections)
            metrics["seconds"] = round(time.time() - t0, 2)
            results["detector"][init] = record(f"detector_{init}", detections, metrics)
            if coco_kind:
                matches["detector"][init] = Ap50Matches(data.data, detections, image_ids)
            print(f"evaluate: detector[{init}] {_headline(metrics)}")

    # -- zero-shot -------------------------------------------------------------------------------------
    zs_proposals = None
    if cfg.zero_shot:
        zs_proposals = compute_proposals(rpn_proposal_fn(rpns["zero_shot"], **rpn_inference(manifest, "zero_shot")),
                                         data, image_ids, desc="zero-shot proposals",
                                         folder=run.stage_dir.root)
    for which in cfg.zero_shot:
        model, _ = load_clip(manifest.teacher.arch, clip_checkpoint(manifest, which),
                             allow_partial=manifest.teacher.allow_partial, device=device,
                             trust_torchscript=manifest.teacher.trust_torchscript)
        encoder = RegionEncoder.from_clip(model).eval()
        t0 = time.time()
        kw = dict(min_size=cfg.min_size, max_size=cfg.max_size, nms_thresh=cfg.zero_shot_nms_thresh,
                  score_threshold=cfg.score_threshold, detections_per_image=cfg.detections_per_image)
        gt_dets, rpn_dets = [], []
        tally = RecognitionTally(vocab, novel_ids)
        for image_id in tqdm(image_ids, desc=f"zero-shot {which}", unit="img", dynamic_ncols=True,
                             mininterval=2.0):
            image = data.load_image(data.image_by_id[image_id])
            features = image_features(encoder, image, cfg.min_size, cfg.max_size, device)
            gt_boxes, gt_labels = data.targets(image_id, vocab)
            found = zero_shot_detect(encoder, image, gt_boxes, embeddings, features=features, **kw)
            tally.add(found["box_labels"].cpu(), gt_labels)
            gt_dets += to_coco_results(image_id, found["boxes"].cpu(), found["scores"].cpu(),
                                       found["labels"].cpu(), vocab)
            boxes, objectness = zs_proposals[image_id]
            found = zero_shot_detect(encoder, image, boxes, embeddings, objectness=objectness,
                                     objectness_mode=cfg.objectness, features=features, **kw)
            rpn_dets += to_coco_results(image_id, found["boxes"].cpu(), found["scores"].cpu(),
                                        found["labels"].cpu(), vocab)
        recognition = tally.result()
        tallies[which] = tally
        if coco_kind:
            matches["gt_boxes"][which] = Ap50Matches(data.data, gt_dets, image_ids)
        entry = {"gt_boxes": record(f"zeroshot_gt_{which}", gt_dets, score(gt_dets)),
                 "rpn_boxes": record(f"zeroshot_rpn_{which}", rpn_dets, score(rpn_dets)),
                 "recognition": recognition, "seconds": round(time.time() - t0, 2)}
        results["zero_shot"][which] = entry
        print(f"evaluate: zero-shot[{which}] GT boxes {_headline(entry['gt_boxes'])}; RPN boxes "
              f"{_headline(entry['rpn_boxes'])}; region top-1 {recognition['top1']}")
        del model, encoder

    if coco_kind and image_ids:
        results["intervals"] = margin_intervals(data.category_split, len(image_ids), recognition=tallies,
                                                gt_boxes=matches["gt_boxes"], detector=matches["detector"])
        results["bootstrap"] = {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "level": 0.95,
                                "over": "images", "paired": True}
    if tallies:
        results["regions"] = next(iter(tallies.values())).result()["regions"]
    draw_pictures(layout, data, names, novel_ids, picture_ids, pictured)
    results["seconds"] = round(time.time() - started, 2)
    merge_summary(layout.summary_json, SUMMARY_SECTION, summarize(results))
    if data.kind != "lvis":    # the demo's headline: teacher vs student (trainer.evaluation.results_table)
        table = results_table(summarize(results))
        merge_summary(layout.summary_json, "results_table", table)
        print(table)
    return {"results": summarize(results)}


def picture_image_ids(data, image_ids: list[int], novel_ids: set[int], first: int) -> list[int]:
    """The held-out images the pictures show: from evaluate.picture_image on, those with a box of a
    novel class first."""
    ordered = image_ids[first:] + image_ids[:first]
    novel = [i for i in ordered if any(a["category_id"] in novel_ids for a in data.annotations_by_image.get(i, []))]
    return (novel + [i for i in ordered if i not in set(novel)])[:PICTURE_IMAGES]


def picture_title(name: str) -> str:
    """`detector_pretrain` -> "detector from the student", `zeroshot_rpn_teacher` -> "zero-shot teacher, RPN boxes"."""
    model = {"pretrain": "the student", "teacher": "the teacher"}
    if name.startswith("detector_"):
        init = name[len("detector_"):]
        return f"detector from {model.get(init, init)}"
    _, boxes, which = name.split("_", 2)
    return f"zero-shot {model.get(which, which).split()[-1]}, {'RPN' if boxes == 'rpn' else 'GT'} boxes"


def draw_pictures(layout: RunLayout, data, names: dict, novel_ids: set[int], picture_ids: list[int],
                  pictured: dict[str, list[dict]]) -> None:
    """eval/detections_<name>.png per model (the picture images, ground truth dashed) and
    eval/detections.png: the images as rows, ground truth then each detector and zero-shot RPN model
    as columns."""
    from pipeline.images import open_rgb
    from pipeline.pictures import LabelledBox, Panel, detection_grid, save_png, shown_detections

    def boxes(records: list[dict], image_id: int, scored: bool) -> list[LabelledBox]:
        return [LabelledBox((x, y, x + w, y + h), names[r["category_id"]], r["score"] if scored else None)
                for r in records if r["image_id"] == image_id for x, y, w, h in [r["bbox"]]]

    if not picture_ids:
        return
    images = {i: open_rgb(data.image_path(data.image_by_id[i])) for i in picture_ids}
    truth = {i: boxes(data.annotations_by_image.get(i, []), i, scored=False) for i in picture_ids}
    novel = [names[c] for c in novel_ids]
    shown = {b.label for i in picture_ids for records in pictured.values()
             for b in shown_detections(boxes(records, i, True), PICTURE_MIN_SCORE, PICTURE_MAX_BOXES)}
    classes = sorted(shown | {b.label for t in truth.values() for b in t})     # one colour per class in every picture
    draw = dict(marked=novel, min_score=PICTURE_MIN_SCORE, max_per_panel=PICTURE_MAX_BOXES, classes=classes)
    for name, records in pictured.items():
        panels = [Panel(images[i], boxes(records, i, True), truth[i], caption=f"image {i}") for i in picture_ids]
        rows = [panels[k:k + 2] for k in range(0, len(panels), 2)]
        save_png(detection_grid(rows, title=picture_title(name), **draw), layout.eval_picture(name))
    columns = [n for n in pictured if not n.startswith("zeroshot_gt_")]
    rows = [[Panel(images[i], (), truth[i], caption=f"image {i}", label_truth=True)]
            + [Panel(images[i], boxes(pictured[n], i, True), truth[i]) for n in columns] for i in picture_ids]
    save_png(detection_grid(rows, column_titles=["ground truth", *map(picture_title, columns)], **draw),
             layout.eval_detections_picture)


def metrics_files(layout: RunLayout, manifest) -> list:
    names = ([f"detector_{i}" for i in [*dict.fromkeys(manifest.transfer.init), *manifest.evaluate.detectors]]
             + [f"zeroshot_{m}_{w}" for w in manifest.evaluate.zero_shot for m in ("gt", "rpn")])
    return [layout.eval_metrics(n) for n in names] + [layout.summary_json]


def _headline(metrics: dict) -> str:
    if "lvis" in metrics:
        m = metrics["lvis"]
        return f"AP {m.get('AP')} APr {m.get('APr')} APc {m.get('APc')} APf {m.get('APf')}"
    a = metrics["AP50"]
    return f"AP50 novel {a['novel']} base {a['base']} all {a['all']}"


def summarize(results: dict) -> dict:
    """The headline figures: AP50 novel/base/all (or LVIS AP, APr, APc, APf) per detector and per
    zero-shot mode, and region recognition top-1."""
    def head(metrics: dict) -> dict:
        return metrics["lvis"] if "lvis" in metrics else metrics["AP50"]

    return {"dataset": results["dataset"], "kind": results["kind"], "images": results["images"],
            "regions": results.get("regions"), "classes": results["classes"],
            "metric": "LVIS box AP" if results["kind"] == "lvis" else "box AP50",
            "detector": {k: head(v) for k, v in results["detector"].items()},
            "zero_shot_gt_boxes": {k: head(v["gt_boxes"]) for k, v in results["zero_shot"].items()},
            "zero_shot_rpn_boxes": {k: head(v["rpn_boxes"]) for k, v in results["zero_shot"].items()},
            "region_recognition_top1": {k: v["recognition"]["top1"] for k, v in results["zero_shot"].items()},
            "intervals": results.get("intervals", {}), "bootstrap": results.get("bootstrap"),
            "seconds": results["seconds"]}


STAGE = Stage(
    name="evaluate", help="detector AP50 novel/base/all, zero-shot (GT / RPN boxes), region top-1 -> eval/",
    reads=reads, sections=("evaluate", "teacher"), identify=data_and_models, outputs=metrics_files, work=evaluate)
run = STAGE.run
