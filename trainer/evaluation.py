"""Evaluation: COCO-style box AP (pycocotools) split by novel / base / all categories, LVIS AP
(the LVIS API), zero-shot inference with ground-truth or RPN boxes (docs/method.md §7), zero-shot region
recognition (its pictures: pipeline/pictures.py, drawn by stages/evaluate.py).

Detections everywhere are COCO results: {"image_id", "category_id", "bbox": [x, y, w, h], "score"}.

AP50 per split is the mean, over the split's categories that have ground truth, of each category's
AP at IoU 0.5 (area all, 100 detections) -- exactly what pycocotools' `stats[1]` gives when its
`params.catIds` is restricted to the split (tests/test_evaluation.py checks this), computed from one
evaluation over all categories.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torchvision.ops import batched_nms

from trainer.data.detection import DetectionSet, DetectorClasses
from trainer.models.detector import class_logits, prepare_images, rpn_weighted_scores, scale_boxes
from trainer.models.region_encoder import RegionEncoder

COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

# A proposal source: image [3, H, W] in 0..1 -> (boxes [N, 4] original pixels, objectness logits [N]).
ProposalFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class LvisNotInstalledError(ImportError):
    pass


# -- COCO results ---------------------------------------------------------------------------------------

def to_coco_results(image_id: int, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                    vocab: DetectorClasses) -> list[dict]:
    """Detections of one image (xyxy boxes, vocabulary indices) -> COCO result records."""
    out = []
    for (x1, y1, x2, y2), s, c in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
        out.append({"image_id": int(image_id), "category_id": int(vocab.ids[c]),
                    "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                    "score": round(float(s), 6)})
    return out


def ground_truth_as_detections(gt: dict, image_ids: Optional[Sequence[int]] = None) -> list[dict]:
    """Every non-crowd GT box as a detection with score 1 (the evaluation's sanity check)."""
    keep = set(image_ids) if image_ids is not None else None
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]),
             "score": 1.0} for a in gt["annotations"]
            if not a.get("iscrowd", 0) and (keep is None or a["image_id"] in keep)]


def _load_gt(gt: Union[dict, str, os.PathLike]) -> dict:
    if isinstance(gt, dict):
        return gt
    return json.loads(Path(gt).read_text(encoding="utf-8"))


def coco_evaluate(gt: Union[dict, str, os.PathLike], detections: list[dict],
                  split: Optional[dict[str, list[int]]] = None,
                  image_ids: Optional[Sequence[int]] = None) -> dict:
    """pycocotools bbox evaluation. Returns
    {"AP50": {"all", "base", "novel"}, "coco": {AP, AP50, ... ARl}, "per_category_AP50": {name: v},
     "num_images", "num_detections"}; AP values in percent; a split with no ground truth is null."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    data = _load_gt(gt)
    # pycocotools wants `info` and `iscrowd`/`area` on every annotation.
    data = {**data, "info": data.get("info", {}), "annotations": [
        {**a, "iscrowd": a.get("iscrowd", 0), "area": a.get("area", a["bbox"][2] * a["bbox"][3])}
        for a in data["annotations"]]}
    ids = list(image_ids) if image_ids is not None else [im["id"] for im in data["images"]]
    id_set = set(ids)
    detections = [d for d in detections if d["image_id"] in id_set]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = data
        coco_gt.createIndex()
    names = {c["id"]: c["name"] for c in data["categories"]}
    cat_ids = sorted(names)
    if not detections:
        per_cat = {cid: (0.0 if coco_gt.getAnnIds(imgIds=ids, catIds=[cid], iscrowd=False) else None)
                   for cid in cat_ids}
        stats = [0.0] * len(COCO_STATS)
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(detections)
            ev = COCOeval(coco_gt, coco_dt, "bbox")
            ev.params.imgIds = ids
            ev.params.catIds = cat_ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        stats = [float(s) * 100 for s in ev.stats]
        precision = ev.eval["precision"]          # [T iou, R recall, K cat, A area, M maxdets]
        t = int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))
        m = ev.params.maxDets.index(100)
        per_cat = {}
        for k, cid in enumerate(cat_ids):
            p = precision[t, :, k, 0, m]
            p = p[p > -1]
            per_cat[cid] = float(p.mean()) * 100 if p.size else None
    split = split or {"base": cat_ids, "novel": []}
    groups = {"all": cat_ids, "base": split.get("base", []), "novel": split.get("novel", [])}
    ap50 = {}
    for group, members in groups.items():
        values = [per_cat[c] for c in members if c in per_cat and per_cat[c] is not None]
        ap50[group] = round(float(np.mean(values)), 3) if values else None
    return {"AP50": ap50,
            "coco": {name: round(v, 3) if v >= 0 else None for name, v in zip(COCO_STATS, stats)},
            "per_category_AP50": {names[c]: (round(v, 3) if v is not None else None) for c, v in per_cat.items()},
            "num_images": len(ids), "num_detections": len(detections)}


@contextlib.contextmanager
def _numpy_float_alias():
    """The LVIS API (0.5.3, the latest release) still writes `np.float`, which NumPy 1.24 removed;
    the alias exists only while it runs."""
    added = "float" not in np.__dict__
    if added:
        np.float = float  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if added:
            del np.float


def lvis_evaluate(gt_path: Union[dict, str, os.PathLike], detections: list[dict], max_dets: int = 300) -> dict:
    """LVIS API box evaluation: {"AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"} in percent.
    `gt_path`: the LVIS file, or its content as loaded (DetectionSet.data: validated), which the LVIS API
    reads from a temporary file."""
    try:
        from lvis import LVIS, LVISEval, LVISResults
    except ImportError as err:
        raise LvisNotInstalledError(
            "LVIS evaluation needs the LVIS API: pip install 'regionclip-pipeline[lvis]' (or pip install "
            f"lvis) ({err})") from None
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()), _numpy_float_alias():
        if isinstance(gt_path, dict):
            content, gt_path = gt_path, Path(tmp) / "gt.json"
            gt_path.write_text(json.dumps(content))
        gt = LVIS(str(gt_path))
        if not detections:
            return {k: 0.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")}
        results = LVISResults(gt, detections, max_dets=max_dets)
        ev = LVISEval(gt, results, iou_type="bbox")
        ev.run()
    return {k: round(float(v) * 100, 3) for k, v in ev.get_results().items()}


# -- zero-shot inference ----------------------------------------------------------------------------------

@torch.no_grad()
def image_features(encoder: RegionEncoder, image: torch.Tensor, min_size: int = 800, max_size: int = 1333,
                   device=None) -> tuple[torch.Tensor, tuple[float, float]]:
    """(res4 map [1, C, h, w], (x, y) scale from original pixels) of one image at the test size."""
    device = device or next(encoder.parameters()).device
    batch, (scale,), _ = prepare_images([image], min_size, max_size, device)
    return encoder.features(batch), scale


@torch.no_grad()
def zero_shot_detect(encoder: RegionEncoder, image: Optional[torch.Tensor], boxes: torch.Tensor,
                     class_embeddings: torch.Tensor, *, objectness: Optional[torch.Tensor] = None,
                     objectness_mode: str = "sigmoid", min_size: int = 800, max_size: int = 1333,
                     temperature: float = 0.01, nms_thresh: float = 0.5, score_threshold: float = 0.001,
                     detections_per_image: int = 100, chunk: int = 256,
                     features: Optional[tuple] = None) -> dict:
    """docs/method.md §7: boxes are used as they are (GT boxes, or RPN boxes: no box deltas); each box is
    classified over the vocabulary (softmax of cos / T with the background logit 0 in the denominator,
    as the reference's detector head scores it, then the background column dropped); score = p_c for
    GT boxes and sqrt(p_c * objectness) for RPN boxes (rpn_weighted_scores), with objectness =
    sigmoid(logit) (default) or the raw logit (`raw`, the reference's form: negative logits are
    dropped); per-class NMS, top-k.

    `features`: image_features()'s output, to share one backbone pass between several box sets.
    Returns boxes, scores, labels (vocabulary indices) and `box_labels`: the argmax class of every
    input box (zero-shot region recognition)."""
    device = class_embeddings.device
    boxes = boxes.to(device, torch.float32).reshape(-1, 4)
    if len(boxes) == 0:
        none = torch.zeros(0, dtype=torch.long, device=device)
        return {"boxes": boxes, "scores": boxes.new_zeros(0), "labels": none, "box_labels": none}
    res4, scale = features if features is not None else image_features(encoder, image, min_size, max_size, device)
    rois = scale_boxes(boxes, scale)
    x = torch.cat([encoder.pool_regions(res4, [rois[s:s + chunk]]) for s in range(0, len(rois), chunk)])
    probs = class_logits(x, class_embeddings, temperature).softmax(dim=1)[:, :-1]
    box_labels = probs.argmax(dim=1)
    if objectness is not None:
        probs = rpn_weighted_scores(probs, objectness, objectness_mode)   # -1 where a raw logit is negative
    idx, cls = (probs > score_threshold).nonzero(as_tuple=True)
    picked, scores = boxes[idx], probs[idx, cls]
    keep = batched_nms(picked, scores, cls, nms_thresh)[:detections_per_image]
    return {"boxes": picked[keep], "scores": scores[keep], "labels": cls[keep], "box_labels": box_labels}


class RecognitionTally:
    """Top-1 accuracy of zero-shot region recognition over GT regions, by split. One `add` per image,
    in a fixed image order: the per-image hits and counts are kept for the bootstrap over images."""

    GROUPS = ("all", "base", "novel")

    def __init__(self, vocab: DetectorClasses, novel_ids):
        novel_ids = set(novel_ids)
        self.group = ["novel" if cid in novel_ids else "base" for cid in vocab.ids]
        self.image_hits: dict[str, list[int]] = {g: [] for g in self.GROUPS}
        self.image_counts: dict[str, list[int]] = {g: [] for g in self.GROUPS}

    def add(self, predicted: torch.Tensor, labels: torch.Tensor) -> None:
        hits, counts = dict.fromkeys(self.GROUPS, 0), dict.fromkeys(self.GROUPS, 0)
        for pred, label in zip(predicted.tolist(), labels.tolist()):
            for g in ("all", self.group[label]):
                counts[g] += 1
                hits[g] += int(pred == label)
        for g in self.GROUPS:
            self.image_hits[g].append(hits[g])
            self.image_counts[g].append(counts[g])

    @property
    def hits(self) -> dict[str, int]:
        return {g: sum(v) for g, v in self.image_hits.items()}

    @property
    def counts(self) -> dict[str, int]:
        return {g: sum(v) for g, v in self.image_counts.items()}

    def top1(self, group: str, weights: np.ndarray) -> np.ndarray:
        """Top-1 (percent) of `group` for each row of image weights [R, images] (bootstrap_weights):
        regions of an image drawn k times count k times. NaN where a row holds no region of the group."""
        hits = weights @ np.asarray(self.image_hits[group], dtype=np.float64)
        counts = weights @ np.asarray(self.image_counts[group], dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, 100.0 * hits / counts, np.nan)

    def result(self) -> dict:
        hits, counts = self.hits, self.counts
        return {"top1": {g: (round(100.0 * hits[g] / counts[g], 3) if counts[g] else None)
                         for g in self.GROUPS}, "regions": counts}


@torch.no_grad()
def region_recognition(encoder: RegionEncoder, data: DetectionSet, class_embeddings: torch.Tensor,
                       vocab: DetectorClasses, image_ids: Sequence[int], *, min_size: int = 800,
                       max_size: int = 1333, temperature: float = 0.01) -> dict:
    """Zero-shot recognition of ground-truth regions: top-1 accuracy (percent) of argmax_c cos(v, e_c)
    over the whole vocabulary, for GT regions of novel, base and all categories."""
    tally = RecognitionTally(vocab, data.category_split["novel"])
    for image_id in image_ids:
        gt_boxes, gt_labels = data.targets(image_id, vocab)
        if not len(gt_labels):
            continue
        found = zero_shot_detect(encoder, data.load_image(data.image_by_id[image_id]), gt_boxes,
                                 class_embeddings, min_size=min_size, max_size=max_size,
                                 temperature=temperature)
        tally.add(found["box_labels"].cpu(), gt_labels)
    return tally.result()


# -- intervals: a paired bootstrap over the evaluation images ------------------------------------------------
#
# A figure of the held-out set rests on its images, and so does its sampling error: the images are drawn
# again with replacement, many times. Each draw is one row of weights (how often each image was drawn: a
# multinomial draw of n images out of the n), both models are scored on the same draws (paired: the margin's
# interval, not two intervals), and the 95% interval is the 2.5th and 97.5th percentiles of the margin over
# the draws (the percentile bootstrap). Region top-1 weighs each image's hits and regions; AP50 is
# recomputed from pycocotools' own matches (`Ap50Matches`), so an all-ones row gives pycocotools' figure.

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)      # pycocotools' 101-point interpolation
_ROWS_PER_BLOCK = 100                               # bootstrap rows scored at once (bounds the memory)


def bootstrap_weights(num_images: int, resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """[resamples, num_images]: how many times each image is drawn in each bootstrap draw (numpy's
    multinomial: n draws with replacement among n equally likely images), seeded."""
    if num_images < 1:
        raise ValueError("bootstrap_weights: no images to draw from")
    rng = np.random.default_rng(seed)
    return rng.multinomial(num_images, np.full(num_images, 1.0 / num_images), size=resamples).astype(np.float64)


def percentile_interval(values, level: float = 0.95) -> Optional[list[float]]:
    """[low, high]: the central `level` share of the finite `values` (numpy's percentiles); None if none."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return None
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return [round(float(low), 3), round(float(high), 3)]


class Ap50Matches:
    """The detections of one evaluation as pycocotools matches them at IoU 0.5 (area all, the top 100 per
    image), kept per image so that AP50 can be recomputed for any weighting of the images.

    Per category: the detections in pycocotools' order (images in `image_ids` order, then a stable sort by
    descending score) as (image index, true positive, false positive) arrays, and the number of
    non-ignored GT boxes of every image."""

    def __init__(self, gt: Union[dict, str, os.PathLike], detections: list[dict], image_ids: Sequence[int]):
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        data = _load_gt(gt)
        data = {**data, "info": data.get("info", {}), "annotations": [
            {**a, "iscrowd": a.get("iscrowd", 0), "area": a.get("area", a["bbox"][2] * a["bbox"][3])}
            for a in data["annotations"]]}
        self.image_ids = list(image_ids)
        self.category_ids = sorted(c["id"] for c in data["categories"])
        position = {image_id: i for i, image_id in enumerate(self.image_ids)}
        detections = [d for d in detections if d["image_id"] in position]
        n, k = len(self.image_ids), len(self.category_ids)
        self.gt_counts = np.zeros((n, k), dtype=np.float64)
        self.detections: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO()
            coco_gt.dataset = data
            coco_gt.createIndex()
            if not detections:
                for a in data["annotations"]:
                    if a["image_id"] in position and not a["iscrowd"]:
                        self.gt_counts[position[a["image_id"]], self.category_ids.index(a["category_id"])] += 1
                empty = np.zeros(0)
                self.detections = [(empty.astype(np.int64), empty, empty)] * k
                return
            ev = COCOeval(coco_gt, coco_gt.loadRes(detections), "bbox")
            ev.params.imgIds, ev.params.catIds = self.image_ids, self.category_ids
            ev.params.iouThrs = np.array([0.5])
            ev.params.areaRng, ev.params.areaRngLbl, ev.params.maxDets = [[0, 1e10]], ["all"], [100]
            ev.evaluate()
        for c in range(k):          # evalImgs: category-major, then area (one), then image
            images, scores, tp, fp = [], [], [], []
            for i in range(n):
                e = ev.evalImgs[c * n + i]
                if e is None:
                    continue
                self.gt_counts[i, c] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
                matched = np.asarray(e["dtMatches"][0], dtype=bool)
                ignored = np.asarray(e["dtIgnore"][0], dtype=bool)
                images.append(np.full(len(matched), i, dtype=np.int64))
                scores.append(np.asarray(e["dtScores"], dtype=np.float64))
                tp.append(matched & ~ignored)
                fp.append(~matched & ~ignored)
            if not images:
                empty = np.zeros(0)
                self.detections.append((empty.astype(np.int64), empty, empty))
                continue
            order = np.argsort(-np.concatenate(scores), kind="mergesort")
            self.detections.append((np.concatenate(images)[order], np.concatenate(tp)[order].astype(np.float64),
                                    np.concatenate(fp)[order].astype(np.float64)))

    def ap50(self, weights: np.ndarray) -> np.ndarray:
        """[R, categories] AP50 (percent) for each row of image weights [R, images]; NaN for a category
        with no GT box in a row (pycocotools leaves such a category out of the mean)."""
        weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        out = np.full((len(weights), len(self.category_ids)), np.nan)
        for start in range(0, len(weights), _ROWS_PER_BLOCK):
            block = weights[start:start + _ROWS_PER_BLOCK]
            out[start:start + len(block)] = self._ap50_block(block)
        return out

    def _ap50_block(self, weights: np.ndarray) -> np.ndarray:
        rows = len(weights)
        positives = weights @ self.gt_counts                       # [R, K] GT boxes per draw
        out = np.where(positives > 0, 0.0, np.nan)
        for c, (images, tp, fp) in enumerate(self.detections):
            if not len(images):
                continue
            w = weights[:, images]                                 # [R, D]: each detection counts as often as its image
            tp_sum, fp_sum = np.cumsum(w * tp, axis=1), np.cumsum(w * fp, axis=1)
            recall = tp_sum / np.maximum(positives[:, c:c + 1], 1.0)
            precision = tp_sum / (tp_sum + fp_sum + np.spacing(1))
            precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]   # the envelope
            # the first detection reaching each recall threshold; recall rises along each row, so one
            # searchsorted over the rows laid end to end (each shifted by 2, above any recall) finds them all
            d = recall.shape[1]
            shift = 2.0 * np.arange(rows)[:, None]
            found = np.searchsorted((recall + shift).ravel(), (RECALL_THRESHOLDS[None, :] + shift).ravel(),
                                    side="left").reshape(rows, -1) - d * np.arange(rows)[:, None]
            reached = np.take_along_axis(precision, np.minimum(found, d - 1), axis=1)
            ap = 100.0 * np.where(found < d, reached, 0.0).mean(axis=1)
            out[:, c] = np.where(positives[:, c] > 0, ap, np.nan)
        return out


def split_mean(per_category: np.ndarray, category_ids: Sequence[int], members: Sequence[int]) -> np.ndarray:
    """Row means over the `members` columns of a [R, categories] table, NaN columns left out (as
    `coco_evaluate`'s split means); NaN where a row has none."""
    columns = [i for i, c in enumerate(category_ids) if c in set(members)]
    values = per_category[:, columns]
    counted = np.isfinite(values).sum(axis=1)
    return np.where(counted > 0, np.nansum(values, axis=1) / np.maximum(counted, 1), np.nan)


def margin_intervals(split: dict[str, list[int]], num_images: int, *,
                     recognition: Optional[dict[str, RecognitionTally]] = None,
                     gt_boxes: Optional[dict[str, Ap50Matches]] = None,
                     detector: Optional[dict[str, Ap50Matches]] = None,
                     student: str = "pretrain", baseline: str = "teacher",
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                     level: float = 0.95) -> dict:
    """95% intervals of every student - baseline margin by a paired bootstrap over the images: region
    top-1 (novel, base), zero-shot GT-box AP50 (novel, base), detector AP50 (novel, base, all).
    Each argument maps a model name to its per-image record over the same `num_images` images in the same
    order; a figure missing for either model is left out. Returns {figure: [low, high]}."""
    weights = bootstrap_weights(num_images, resamples, seed)
    groups = {"novel": split.get("novel", []), "base": split.get("base", [])}
    out: dict = {}
    recognition, gt_boxes, detector = recognition or {}, gt_boxes or {}, detector or {}
    if student in recognition and baseline in recognition:
        for group in ("novel", "base"):
            margins = recognition[student].top1(group, weights) - recognition[baseline].top1(group, weights)
            out[f"region_top1_{group}"] = percentile_interval(margins, level)
    for name, matches, splits in (("gt_ap50", gt_boxes, ("novel", "base")),
                                  ("transfer_ap50", detector, ("novel", "base", "all"))):
        if student not in matches or baseline not in matches:
            continue
        a, b = matches[student], matches[baseline]
        ap_a, ap_b = a.ap50(weights), b.ap50(weights)
        for group in splits:
            members = a.category_ids if group == "all" else groups[group]
            margins = split_mean(ap_a, a.category_ids, members) - split_mean(ap_b, b.category_ids, members)
            out[f"{name}_{group}"] = percentile_interval(margins, level)
    return out


# -- eval/summary.json ---------------------------------------------------------------------------------------

def merge_summary(path: Union[str, os.PathLike], section: str, content: dict) -> dict:
    """Set one section of eval/summary.json (a dict of sections), keeping every other section."""
    from pipeline.io import read_json, write_json

    path = Path(path)
    try:
        summary = read_json(path)
        if not isinstance(summary, dict):
            summary = {}
    except (FileNotFoundError, json.JSONDecodeError):
        summary = {}
    summary[section] = content
    write_json(path, summary)
    return summary


# -- the results table (the demo's headline: image-level teacher vs region-pretrained student) -----------

_INIT_NAMES = {"teacher": "teacher (image-level CLIP)", "pretrain": "student (region-pretrained)"}


MARGINS = ("region_top1_novel", "region_top1_base", "gt_ap50_novel", "gt_ap50_base",
           "transfer_ap50_novel", "transfer_ap50_base", "transfer_ap50_all")


def headline_figures(summary: dict) -> dict:
    """Flat headline figures from `summarize`'s output (the `evaluate` section of eval/summary.json):
    region top-1 and GT-box AP50 (novel/base) per zero-shot model, detector AP50 (novel/base/all) per
    initialisation, the margins student - teacher (`margin_<figure>`) with their 95% bootstrap intervals
    (`margin_<figure>_ci95`: [low, high], same units), and what they rest on: `images`, `novel_regions`,
    `base_regions` (GT regions of the held-out set). Missing figures are None."""
    def get(section: str, model: str, group: str):
        value = (summary.get(section) or {}).get(model) or {}
        return value.get(group) if isinstance(value, dict) else None

    figures: dict = {}
    for model in ("teacher", "pretrain"):
        for group in ("novel", "base", "all"):
            figures[f"region_top1_{group}_{model}"] = get("region_recognition_top1", model, group)
            figures[f"gt_ap50_{group}_{model}"] = get("zero_shot_gt_boxes", model, group)
            figures[f"transfer_ap50_{group}_{model}"] = get("detector", model, group)

    def margin(name: str):
        a, b = figures.get(f"{name}_pretrain"), figures.get(f"{name}_teacher")
        return None if a is None or b is None else round(a - b, 3)

    intervals = summary.get("intervals") or {}
    for name in MARGINS:
        figures[f"margin_{name}"] = margin(name)
        figures[f"margin_{name}_ci95"] = intervals.get(name)
    regions = summary.get("regions") or {}
    figures["images"] = summary.get("images")
    figures["novel_regions"] = regions.get("novel")
    figures["base_regions"] = regions.get("base")
    return figures


def results_table(summary: dict) -> str:
    """The results table (Markdown) from the `evaluate` section of eval/summary.json; each margin with
    its 95% interval (`+12.3 [+7.1, +17.6]`)."""
    f = headline_figures(summary)

    def cell(value) -> str:
        return "-" if value is None else f"{value:.1f}"

    def diff(name: str) -> str:
        value, interval = f[f"margin_{name}"], f[f"margin_{name}_ci95"]
        if value is None:
            return "-"
        return f"{value:+.1f}" + ("" if interval is None else f" [{interval[0]:+.1f}, {interval[1]:+.1f}]")

    regions = ("" if f["novel_regions"] is None else
               f": {f['novel_regions']} novel and {f['base_regions']} base regions")
    lines = [f"Zero-shot region recognition with ground-truth boxes ({f['images'] or '?'} images{regions}; "
             "top-1 accuracy % and box AP50)", "",
             "| model | top-1 novel | top-1 base | AP50 novel | AP50 base |", "|---|---:|---:|---:|---:|"]
    keys = ("region_top1_novel", "region_top1_base", "gt_ap50_novel", "gt_ap50_base")
    for model in ("teacher", "pretrain"):
        lines.append(f"| {_INIT_NAMES[model]} | " + " | ".join(cell(f[f"{k}_{model}"]) for k in keys) + " |")
    lines.append("| student - teacher | " + " | ".join(diff(k) for k in keys) + " |")
    lines += ["", f"Detector transfer on base classes, evaluated on all classes (box AP50, the same "
              f"{f['images'] or '?'} images)", "",
              "| initialised from | AP50 novel | AP50 base | AP50 all |", "|---|---:|---:|---:|"]
    keys = ("transfer_ap50_novel", "transfer_ap50_base", "transfer_ap50_all")
    for model in ("teacher", "pretrain"):
        lines.append(f"| {_INIT_NAMES[model]} | " + " | ".join(cell(f[f"{k}_{model}"]) for k in keys) + " |")
    lines.append("| student - teacher | " + " | ".join(diff(k) for k in keys) + " |")
    bootstrap = summary.get("bootstrap")
    if bootstrap:
        lines += ["", f"[low, high]: 95% interval of the margin, a paired bootstrap over the images "
                  f"({bootstrap['resamples']} draws, seed {bootstrap['seed']})"]
    return "\n".join(lines)
