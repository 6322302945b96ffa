"""The open-vocabulary C4 detector (docs/method.md §6) on torchvision's detection parts.

    image -> resize (short side, long-side cap) -> CLIP normalisation -> pad to 32
          -> region encoder stem..res4 (the backbone, stem and res2 frozen, every BatchNorm frozen)
    proposals (a frozen class-agnostic RPN, never trained here; + the GT boxes in training)
          -> RoIAlign (the region encoder's pooler size: 14x14 for RN50) -> res5 -> attention pool = x
    x -> score_c = cos(x, e_c) / 0.01 over frozen class text embeddings e_c; background logit fixed 0
    x -> class-agnostic box deltas (Linear(D, 4), weights 10, 10, 5, 5, L1 loss)

Training (per image): proposals + GT matched at IoU 0.5 (torchvision's Matcher), 512 RoIs with 25%
positives (BalancedPositiveNegativeSampler); loss = classification (cross-entropy, optionally
focal-scaled by (1 - p_t)^gamma, background rows weighted) + L1 box loss over foreground rows
divided by the number of sampled RoIs (detectron2's normalisation). With only_sample_fg_proposals
(RegionCLIP's ONLY_SAMPLE_FG_PROPOSALS) only foreground RoIs are sampled.

Inference: softmax over classes + background (times the RPN's objectness, square-rooted, with
multiply_rpn_score: rpn_weighted_scores), deltas applied to the proposals, per-class soft-NMS
(gaussian, sigma 0.5, implemented here: torchvision has none), score threshold, top-k per image.
The vocabulary is a buffer, not a weight: `set_vocabulary` swaps base classes for all classes (or any
custom list) at test time, with no class count anywhere in the weights.
"""
from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image

from pipeline.io import atomic_path
from trainer.models.checkpoint import (CheckpointError, CheckpointNotFoundError, LoadReport, load_checkpoint_file,
                                       load_fitting, reference_state_dict)
from trainer.models.clip import check_embedding_dim, create_clip, load_clip
from trainer.models.constants import CLIP_MEAN, CLIP_STD
from trainer.models.geometry import padded, resized_size
from trainer.models.reference_weights import DETECTOR_MAP, load_by_map, reference_kind, require_kind
from trainer.models.region_encoder import RegionEncoder

DETECTOR_FORMAT = "regionclip-detector-v1"


@dataclass
class DetectorSettings:
    """Everything that shapes the detector's training and inference (saved inside its checkpoint)."""
    min_sizes: tuple[int, ...] = (640, 672, 704, 736, 768, 800)   # training short sides (random)
    max_size: int = 1333
    test_min_size: int = 800
    test_max_size: int = 1333
    flip: bool = True
    rois_per_image: int = 512
    positive_fraction: float = 0.25
    iou_threshold: float = 0.5
    temperature: float = 0.01
    focal_gamma: Optional[float] = 0.5          # COCO 0.5; LVIS None (plain weighted CE)
    background_weight: float = 0.2              # COCO 0.2; LVIS 0.8
    box_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    score_threshold: float = 0.001
    detections_per_image: int = 100
    nms: str = "soft"                           # "soft" (gaussian) or "hard"
    soft_nms_sigma: float = 0.5
    soft_nms_prune: float = 0.001               # soft-NMS drops boxes decayed to this (detectron2's SOFT_NMS_PRUNE)
    only_sample_fg_proposals: bool = False      # train the classifier on foreground RoIs only
    multiply_rpn_score: bool = False            # score sqrt(p * objectness) at inference (rpn_weighted_scores)
    objectness: str = "sigmoid"                 # ... objectness = sigmoid(logit), or "raw": the logit (reference)
    nms_thresh: float = 0.5                     # hard NMS only
    roi_chunk: int = 256                        # RoIs per res5 pass at inference (memory)

    @classmethod
    def from_dict(cls, data: dict) -> "DetectorSettings":
        names = {f.name for f in fields(cls)}
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names}
        return cls(**kwargs)


# -- images ----------------------------------------------------------------------------------------



def prepare_images(images: Sequence[torch.Tensor], min_size: Union[int, Sequence[int]], max_size: int,
                   device: Union[str, torch.device]) -> tuple[torch.Tensor, list[float], list[tuple[int, int]]]:
    """Resize (bilinear) float images [3, H, W] in 0..1, CLIP-normalise, pad to a batch divisible by 32.
    `min_size` may be a list: each image draws one short side at random (multi-scale training).
    Returns (batch [B, 3, Hp, Wp], per-image scale, per-image resized (h, w))."""
    mean = torch.tensor(CLIP_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(3, 1, 1)
    resized, scales, sizes = [], [], []
    for image in images:
        size = random.choice(list(min_size)) if isinstance(min_size, (list, tuple)) else min_size
        h, w = image.shape[-2:]
        nw, nh = resized_size(w, h, size, max_size)
        x = image.to(device=device, dtype=torch.float32)
        if (nh, nw) != (h, w):
            x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        resized.append((x - mean) / std)
        # Boxes scale per axis exactly as the pixels did.
        scales.append((nw / w, nh / h))
        sizes.append((nh, nw))
    hp, wp = padded(max(s[0] for s in sizes)), padded(max(s[1] for s in sizes))
    batch = torch.zeros(len(resized), 3, hp, wp, device=device)
    for i, x in enumerate(resized):
        batch[i, :, : x.shape[1], : x.shape[2]] = x
    return batch, scales, sizes


def scale_boxes(boxes: torch.Tensor, scale: tuple[float, float]) -> torch.Tensor:
    sx, sy = scale
    return boxes * boxes.new_tensor([sx, sy, sx, sy])


def unscale_boxes(boxes: torch.Tensor, scale: tuple[float, float]) -> torch.Tensor:
    sx, sy = scale
    return boxes / boxes.new_tensor([sx, sy, sx, sy])


# -- scores ------------------------------------------------------------------------------------------

OBJECTNESS_MODES = ("sigmoid", "raw")


def rpn_weighted_scores(probs: torch.Tensor, objectness_logits: torch.Tensor, mode: str = "sigmoid") -> torch.Tensor:
    """RegionCLIP's MULTIPLY_RPN_SCORE: score = sqrt(p_c * o) for each proposal (row of `probs` [N, C]),
    o = sigmoid(objectness logit) (`sigmoid`), or the raw logit itself (`raw`), as the reference
    multiplies it (fast_rcnn.py: `(scores * objectness_logits) ** 0.5`): its scores can exceed 1, and
    a negative logit gives NaN, which the reference's finite-score mask drops with the proposal. Such
    a proposal scores -1 here, below every score threshold."""
    if mode not in OBJECTNESS_MODES:
        raise ValueError(f"objectness mode {mode!r}: one of {', '.join(OBJECTNESS_MODES)}")
    obj = objectness_logits.to(probs.device, torch.float32).reshape(-1, 1)
    if mode == "sigmoid":
        obj = torch.sigmoid(obj)
    return torch.nan_to_num(torch.sqrt(probs.float() * obj), nan=-1.0)


# -- soft-NMS ----------------------------------------------------------------------------------------

def soft_nms(boxes: torch.Tensor, scores: torch.Tensor, sigma: float = 0.5, score_threshold: float = 0.001,
             max_per_class: Optional[int] = None, prune_threshold: Optional[float] = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian soft-NMS (Bodla et al. 2017), per class, all classes at once, as detectron2 runs it:
    scores not above `score_threshold` never enter (fast_rcnn_inference_single_image's filter); each
    class repeatedly keeps its highest remaining box and decays every other remaining box of the class
    by exp(-IoU^2 / sigma), and a box decayed to `prune_threshold` or below is dropped (default: the
    score threshold). The reference's LVIS test filters at 0.02 and prunes at 0.001, so a box decayed
    to between the two is still kept.

    boxes [N, 4] shared by every class (class-agnostic regression) or [N, C, 4]; scores [N, C].
    Returns (box indices [K], class indices [K], decayed scores [K]), in no particular order.
    """
    prune = score_threshold if prune_threshold is None else prune_threshold
    n, c = scores.shape
    if n == 0 or c == 0:
        empty = torch.zeros(0, dtype=torch.long, device=scores.device)
        return empty, empty, scores.new_zeros(0)
    if boxes.dim() == 2:
        iou = box_iou(boxes, boxes).unsqueeze(0).expand(c, n, n)         # [C, N, N] (a view)
    else:
        per_class = boxes.permute(1, 0, 2)                                # [C, N, 4]
        iou = torch.stack([box_iou(b, b) for b in per_class])
    live = scores.t().clone()                                             # [C, N]
    live[~(live > score_threshold)] = -1.0                                # NaN scores never enter either
    steps = n if max_per_class is None else min(n, max_per_class)
    kept_idx, kept_cls, kept_score = [], [], []
    classes = torch.arange(c, device=scores.device)
    for _ in range(steps):
        best, idx = live.max(dim=1)                                       # [C]
        active = best >= 0                                                # a live score is above `prune`
        if not bool(active.any()):
            break
        kept_idx.append(idx[active])
        kept_cls.append(classes[active])
        kept_score.append(best[active])
        overlap = iou[classes, idx]                                       # [C, N]: IoU with each pick
        decay = torch.exp(-(overlap * overlap) / sigma)
        alive = live >= 0
        live = torch.where(alive, live * decay, live)
        live[classes, idx] = -1.0                                         # the picks leave the pool
        live[~(live > prune) & alive] = -1.0
    if not kept_idx:
        empty = torch.zeros(0, dtype=torch.long, device=scores.device)
        return empty, empty, scores.new_zeros(0)
    return torch.cat(kept_idx), torch.cat(kept_cls), torch.cat(kept_score)


def select_detections(boxes: torch.Tensor, probs: torch.Tensor, settings: DetectorSettings,
                      image_size: tuple[int, int]) -> dict:
    """Per-class suppression + score threshold + top-k. boxes [N, 4] (shared) or [N, C, 4]; probs [N, C]."""
    k = settings.detections_per_image
    if settings.nms == "soft":
        idx, cls, score = soft_nms(boxes, probs, settings.soft_nms_sigma, settings.score_threshold,
                                   max_per_class=k, prune_threshold=settings.soft_nms_prune)
        picked = boxes[idx] if boxes.dim() == 2 else boxes[idx, cls]
    else:
        n, c = probs.shape
        flat = boxes[:, None, :].expand(n, c, 4) if boxes.dim() == 2 else boxes
        keep = probs > settings.score_threshold
        idx, cls = keep.nonzero(as_tuple=True)
        picked, score = flat[idx, cls], probs[idx, cls]
        sel = batched_nms(picked, score, cls, settings.nms_thresh)
        picked, score, cls = picked[sel], score[sel], cls[sel]
    order = score.argsort(descending=True)[:k]
    out = {"boxes": clip_boxes_to_image(picked[order], image_size), "scores": score[order],
           "labels": cls[order]}
    return out


# -- the classifier ------------------------------------------------------------------------------------

def normalize_embeddings(embeddings) -> torch.Tensor:
    e = torch.as_tensor(embeddings, dtype=torch.float32)
    if e.dim() != 2:
        raise ValueError(f"class embeddings must be a [classes, dim] matrix, got shape {tuple(e.shape)}")
    return F.normalize(e, dim=-1)


def class_logits(x: torch.Tensor, embeddings: torch.Tensor, temperature: float,
                 background: bool = True) -> torch.Tensor:
    """cos(x, e_c) / T for each class, plus a background logit fixed at 0 (an all-zero embedding)."""
    logits = F.normalize(x.float(), dim=-1) @ embeddings.t() / temperature
    if background:
        logits = torch.cat([logits, logits.new_zeros(len(logits), 1)], dim=1)
    return logits


class OpenVocabDetector(nn.Module):
    """C4 Faster R-CNN head on a CLIP ResNet; proposals come from outside (a frozen RPN)."""

    def __init__(self, visual: nn.Module, class_embeddings, settings: Optional[DetectorSettings] = None,
                 arch: str = ""):
        super().__init__()
        self.settings = settings or DetectorSettings()
        self.arch = arch
        self.encoder = RegionEncoder(visual, freeze_stem_res2=True, freeze_bn=True)
        dim = self.encoder.output_dim
        self.bbox_pred = nn.Linear(dim, 4)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.bbox_pred.bias)
        self.register_buffer("class_embeddings", torch.zeros(0, dim), persistent=False)
        self.class_names: list[str] = []
        self.set_vocabulary(class_embeddings)
        self.box_coder = BoxCoder(self.settings.box_weights)
        self.matcher = Matcher(self.settings.iou_threshold, self.settings.iou_threshold,
                               allow_low_quality_matches=False)
        self.sampler = BalancedPositiveNegativeSampler(self.settings.rois_per_image,
                                                       self.settings.positive_fraction)

    @property
    def embed_dim(self) -> int:
        return self.encoder.output_dim

    @property
    def num_classes(self) -> int:
        return self.class_embeddings.shape[0]

    def set_vocabulary(self, embeddings, names: Optional[Sequence[str]] = None) -> None:
        """Swap the classes (e.g. base -> all at test time): frozen text embeddings [C, D]."""
        e = normalize_embeddings(embeddings)
        check_embedding_dim(self.embed_dim, e.shape[1], "the class embeddings", self.arch,
                            hint="make them with the text encoder of the same CLIP architecture")
        self.class_embeddings = e.to(self.class_embeddings.device)
        self.class_names = list(names) if names is not None else [str(i) for i in range(len(e))]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True):
        super().train(mode)
        return self

    # -- heads -------------------------------------------------------------------------------------------
    def head(self, features: torch.Tensor, rois: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Region features x [K, D] for rois (resized-image pixels), then (class logits, box deltas)."""
        x = self.encoder.pool_regions(features, rois)
        return class_logits(x, self.class_embeddings, self.settings.temperature), self.bbox_pred(x.float())

    # -- training ------------------------------------------------------------------------------------------
    def forward(self, images: Sequence[torch.Tensor], proposals: Sequence[torch.Tensor],
                targets: Optional[Sequence[dict]] = None):
        if self.training:
            if targets is None:
                raise ValueError("training needs targets (boxes, labels per image)")
            return self.losses(images, proposals, targets)
        return self.detect(images, proposals)

    def losses(self, images: Sequence[torch.Tensor], proposals: Sequence[torch.Tensor],
               targets: Sequence[dict]) -> dict[str, torch.Tensor]:
        """images: float [3, H, W] in 0..1; proposals and targets["boxes"]: original pixels;
        targets["labels"]: indices into the current vocabulary."""
        s = self.settings
        device = self.class_embeddings.device
        batch, scales, _ = prepare_images(images, s.min_sizes, s.max_size, device)
        rois, labels, regression = [], [], []
        for props, target, scale in zip(proposals, targets, scales):
            gt = scale_boxes(target["boxes"].to(device, torch.float32).reshape(-1, 4), scale)
            gt_labels = target["labels"].to(device, torch.long)
            props = scale_boxes(props.to(device, torch.float32).reshape(-1, 4), scale)
            props = torch.cat([props, gt])                                  # proposal_append_gt
            if len(gt):
                matched = self.matcher(box_iou(gt, props))
                fg = matched >= 0
                cls = torch.where(fg, gt_labels[matched.clamp(min=0)],
                                  torch.full_like(matched, self.num_classes))
                cls[matched == Matcher.BETWEEN_THRESHOLDS] = -1             # never with equal thresholds
                matched_gt = gt[matched.clamp(min=0)]
            else:
                cls = torch.full((len(props),), self.num_classes, dtype=torch.long, device=device)
                matched_gt = props
            # The sampler wants 1 = positive, 0 = negative, -1 = ignore.
            sampler_labels = torch.where(cls == self.num_classes, torch.zeros_like(cls),
                                         torch.where(cls >= 0, torch.ones_like(cls), cls))
            if s.only_sample_fg_proposals:
                keep = self._sample_foreground(sampler_labels)
            else:
                pos, neg = self.sampler([sampler_labels])
                keep = (pos[0] | neg[0]).nonzero(as_tuple=True)[0]
            rois.append(props[keep])
            labels.append(cls[keep])
            regression.append(self.box_coder.encode_single(matched_gt[keep], props[keep]))
        features = self.encoder.features(batch)
        logits, deltas = self.head(features, rois)
        labels = torch.cat(labels)
        regression = torch.cat(regression)
        return {"loss_cls": self.classification_loss(logits, labels),
                "loss_box": self.box_loss(deltas, regression, labels)}

    def _sample_foreground(self, sampler_labels: torch.Tensor) -> torch.Tensor:
        """RegionCLIP's ONLY_SAMPLE_FG_PROPOSALS: up to rois_per_image * positive_fraction foreground
        RoIs at random, no background (an image without boxes keeps one background RoI)."""
        positive = (sampler_labels == 1).nonzero(as_tuple=True)[0]
        if len(positive) == 0:
            return (sampler_labels == 0).nonzero(as_tuple=True)[0][:1]
        count = min(len(positive), int(self.settings.rois_per_image * self.settings.positive_fraction))
        return positive[torch.randperm(len(positive), device=positive.device)[:count]]

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        s = self.settings
        if labels.numel() == 0:
            return logits.sum() * 0.0
        background = labels == self.num_classes
        if s.focal_gamma is None:
            # Weighted cross-entropy, normalised by the weights (F.cross_entropy's `weight`), as for LVIS.
            weight = logits.new_ones(logits.shape[1])
            weight[-1] = s.background_weight
            return F.cross_entropy(logits, labels, weight=weight)
        ce = F.cross_entropy(logits, labels, reduction="none")
        # 1 - p_t from the log-probability: exact when p_t is near 1 (logits are cos / 0.01), and
        # clamped so that d/dp (1 - p)^gamma (infinite at p = 1 for gamma < 1) stays finite.
        one_minus_p = (-torch.expm1(-ce)).clamp(min=1e-6)
        loss = ce * one_minus_p ** s.focal_gamma
        loss = torch.where(background, loss * s.background_weight, loss)
        return loss.mean()

    def box_loss(self, deltas: torch.Tensor, regression: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        fg = (labels >= 0) & (labels < self.num_classes)
        if labels.numel() == 0:
            return deltas.sum() * 0.0
        return F.l1_loss(deltas[fg], regression[fg], reduction="sum") / max(1, labels.numel())

    # -- inference ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def detect(self, images: Sequence[torch.Tensor], proposals: Sequence[torch.Tensor],
               objectness: Optional[Sequence[torch.Tensor]] = None) -> list[dict]:
        """Detections per image: boxes [K, 4] in original pixels, scores [K], labels [K] (vocabulary index).

        With `objectness` (the RPN's logits per proposal) and settings.multiply_rpn_score, a score is
        sqrt(p_c * objectness) (rpn_weighted_scores, settings.objectness), RegionCLIP's MULTIPLY_RPN_SCORE."""
        s = self.settings
        device = self.class_embeddings.device
        results = []
        if objectness is None or not s.multiply_rpn_score:
            objectness = [None] * len(images)
        for image, props, obj in zip(images, proposals, objectness):
            batch, (scale,), (size,) = prepare_images([image], s.test_min_size, s.test_max_size, device)
            features = self.encoder.features(batch)
            props = scale_boxes(props.to(device, torch.float32).reshape(-1, 4), scale)
            logits, deltas = [], []
            for start in range(0, len(props), s.roi_chunk):
                lg, dl = self.head(features, [props[start:start + s.roi_chunk]])
                logits.append(lg)
                deltas.append(dl)
            if not logits:
                results.append(_empty_detections(device))
                continue
            probs = torch.cat(logits).softmax(dim=1)[:, :-1]
            if obj is not None:
                probs = rpn_weighted_scores(probs, obj, s.objectness)
            boxes = self.box_coder.decode_single(torch.cat(deltas), props)
            boxes = clip_boxes_to_image(boxes, size)
            found = select_detections(boxes, probs, s, size)
            found["boxes"] = unscale_boxes(found["boxes"], scale)
            h, w = image.shape[-2:]
            found["boxes"] = clip_boxes_to_image(found["boxes"], (h, w))
            results.append(found)
        return results


def _empty_detections(device) -> dict:
    return {"boxes": torch.zeros(0, 4, device=device), "scores": torch.zeros(0, device=device),
            "labels": torch.zeros(0, dtype=torch.long, device=device)}


# -- checkpoints ----------------------------------------------------------------------------------------

def save_detector(detector: OpenVocabDetector, path: Union[str, os.PathLike], **extra) -> Path:
    """{"format", "state_dict", "arch", "settings", "embed_dim", "class_names", **extra}, atomically.
    Plain data and tensors only: the file reads back with torch.load(weights_only=True)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": DETECTOR_FORMAT, "arch": detector.arch,
               "state_dict": {k: v.detach().cpu() for k, v in detector.state_dict().items()},
               "settings": asdict(detector.settings), "embed_dim": detector.embed_dim,
               "class_names": list(detector.class_names), **extra}
    with atomic_path(path) as tmp:  # a temporary file, fsync, then rename
        torch.save(payload, tmp)
    return path


def read_checkpoint_kind(path: Union[str, os.PathLike]) -> str:
    """'detector' for a file written by save_detector or a transferred RegionCLIP detector (detectron2
    file), 'clip' for any CLIP checkpoint (a pretrained RegionCLIP region encoder too)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return "clip"
    try:
        obj = load_checkpoint_file(path)
    except CheckpointError:  # TorchScript (OpenAI), pickled objects or unreadable: load_clip says which
        return "clip"
    if isinstance(obj, dict) and obj.get("format") == DETECTOR_FORMAT:
        return "detector"
    reference = reference_state_dict(obj)
    if reference is not None and reference_kind(reference) == "detector":
        return "detector"
    return "clip"


def load_detector_state(detector: OpenVocabDetector, state_dict: dict, source: str,
                        allow_partial: bool = False) -> LoadReport:
    """Load detector weights; a mismatch is a CheckpointError listing the keys, unless allow_partial."""
    report = LoadReport(source=str(source), format=DETECTOR_FORMAT)
    advice = ("This detector checkpoint was made for another architecture or code version; check "
              "transfer/teacher arch, or set allow_partial to load only what fits.")
    return load_fitting(detector, state_dict, report, detector.arch or "the detector", advice, allow_partial)


def detector_from_reference(state_dict: dict[str, torch.Tensor], *, source: str, arch: str, class_embeddings,
                            settings: Optional[DetectorSettings] = None,
                            allow_partial: bool = False) -> OpenVocabDetector:
    """An OpenVocabDetector with the weights of a transferred RegionCLIP detector (CLIPFastRCNN +
    CLIPRes5ROIHeads; reference_weights.py maps the keys): backbone -> encoder.visual,
    box_predictor.bbox_pred -> bbox_pred."""
    require_kind(state_dict, source, ("detector",), "a transferred detector")
    background = state_dict.get("roi_heads.box_predictor.cls_bg_score.weight")
    if background is not None and bool(background.abs().max() > 0):
        raise CheckpointError(f"{source}: roi_heads.box_predictor.cls_bg_score.weight is not zero; our "
                              "detector's background logit is a constant 0 (the reference freezes that "
                              "embedding at zero), so this detector cannot be represented")
    model, _ = create_clip(arch)
    detector = OpenVocabDetector(model.visual, class_embeddings, settings, arch=arch)
    load_by_map(detector, state_dict, DETECTOR_MAP, source=source, name=arch, allow_partial=allow_partial,
                advice="Check that the architecture (teacher.arch: RN50 or RN50x4) is the detector's.")
    return detector


def build_detector(arch: str, checkpoint: Union[str, os.PathLike], class_embeddings,
                   settings: Optional[DetectorSettings] = None, allow_partial: bool = False,
                   device: Union[str, torch.device] = "cpu",
                   class_names: Optional[Sequence[str]] = None, trust_torchscript: bool = False) -> OpenVocabDetector:
    """A detector from a detector checkpoint (exact key match required: save_detector's, or a
    transferred RegionCLIP detector, reference_weights.py) or a CLIP checkpoint (teacher, pretrain
    student: the visual tower initialises the backbone and box head, the box regressor is new; a
    TorchScript one only with `trust_torchscript`, see load_clip).

    `settings` None: the detector checkpoint's own settings (default settings for a CLIP checkpoint or
    a RegionCLIP detector)."""
    path = Path(checkpoint).expanduser()
    if read_checkpoint_kind(path) == "detector":
        payload = load_checkpoint_file(path)
        reference = reference_state_dict(payload)
        if reference is not None:
            detector = detector_from_reference(reference, source=str(path), arch=arch,
                                               class_embeddings=class_embeddings, settings=settings,
                                               allow_partial=allow_partial)
        else:
            saved_arch = payload.get("arch") or arch
            if arch and saved_arch and arch != saved_arch:
                raise CheckpointError(f"{path}: a detector for {saved_arch!r}, asked to load as {arch!r}")
            if settings is None:
                settings = DetectorSettings.from_dict(payload.get("settings", {}))
            model, _ = create_clip(saved_arch)
            detector = OpenVocabDetector(model.visual, class_embeddings, settings, arch=saved_arch)
            load_detector_state(detector, payload["state_dict"], str(path), allow_partial)
    else:
        model, _ = load_clip(arch, path, allow_partial=allow_partial, trust_torchscript=trust_torchscript)
        detector = OpenVocabDetector(model.visual, class_embeddings, settings, arch=arch)
    if class_names is not None:
        detector.class_names = list(class_names)
    return detector.to(device)
