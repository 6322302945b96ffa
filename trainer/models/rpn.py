"""A class-agnostic region proposal network from torchvision's detection parts (docs/method.md §2).

    model = build_rpn(RpnConfig("resnet50_fpn"), backbone_weights="weights/resnet50.pth")   # or None: scratch
    model = build_rpn(RpnConfig("clip_res4", clip_arch="RN50-tiny"), backbone_weights="teacher.pt")
    losses = model(images, targets)            # train mode: {'loss_objectness', 'loss_rpn_box_reg'}
    [(boxes, objectness)] = model.propose(images, min_size=800, max_size=1333)
    save_rpn_checkpoint(model, path, recall={...});  model = load_rpn(path)

`ProposalNetwork` = torchvision's GeneralizedRCNNTransform (resize so the short side is min_size and
the long side at most max_size, normalise, pad) + a backbone + torchvision's RegionProposalNetwork
with one "object" class. Backbones:
  - resnet50_fpn: torchvision's ResNet-50-FPN (the paper's RPN), from a local weights file
    (torchvision ImageNet ResNet-50 or a Faster R-CNN R50-FPN state dict) or from scratch;
  - resnet18_fpn: the same with ResNet-18 (fast on a CPU; for the demo and tests);
  - resnet50_c4: torchvision's ResNet-50 up to layer3 (res4, stride 16), one level: detectron2's R50-C4;
  - clip_res4: the stride-16 res4 map of a CLIP ResNet (open_clip, e.g. the teacher), one level.
With a weights file the BatchNorms are frozen (torchvision's FrozenBatchNorm2d) and the stem and res2
do not train, as in detectron2; from scratch every layer trains with ordinary BatchNorm.

RegionCLIP's released RPNs are detectron2 models; `load_rpn` reads them too (rpn_from_reference;
reference_weights.py maps their keys) and builds the network with the RpnConfig options that make
torchvision's parts compute what detectron2's do: `stride_in_1x1`, `anchor_layout="detectron2"`,
`pixel_mean`/`pixel_std`, `fpn_norm`, `head_convs`.

Boxes that `propose` returns are float32 x1,y1,x2,y2 in the *original* input image pixels, ordered by
objectness (logits, not probabilities). Checkpoints are read with torch.load(weights_only=True).
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torchvision.models import resnet50
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import FrozenBatchNorm2d, batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from pipeline.io import atomic_path
from trainer.models.checkpoint import (CheckpointError, CheckpointNotFoundError, PathLike, load_checkpoint_file,
                                       reference_state_dict, without_module_prefix)
from trainer.models.clip import create_clip, load_clip
from trainer.models.constants import (CLIP_MEAN, CLIP_STD, DETECTRON2_PIXEL_MEAN, DETECTRON2_PIXEL_STD,
                                      IMAGENET_MEAN, IMAGENET_STD)
from trainer.models.reference_weights import REFERENCE_FORMAT, load_by_map, require_kind, rpn_key_map

BACKBONES = ("resnet50_fpn", "resnet18_fpn", "resnet50_c4", "clip_res4")
FPN_LEVELS = 5                                   # P2..P5 + the max-pooled P6
DEFAULT_FPN_ANCHORS = (32, 64, 128, 256, 512)    # one size per FPN level (torchvision, detectron2)
DEFAULT_C4_ANCHORS = (32, 64, 128, 256, 512)     # all sizes on the single res4 level
ASPECT_RATIOS = (0.5, 1.0, 2.0)
FPN_STRIDES = (4, 8, 16, 32, 64)                 # P2..P6
C4_STRIDE = 16
ANCHOR_LAYOUTS = ("torchvision", "detectron2")


class RpnCheckpointNotFoundError(CheckpointNotFoundError):
    """No RPN checkpoint at the given path."""


@dataclass
class RpnConfig:
    """What shapes an RPN: build_rpn builds one from it, and its checkpoint records it (`config`, with
    the defaults left None resolved). `backbone`: resnet50_fpn, resnet18_fpn, resnet50_c4 or clip_res4
    (needs `clip_arch`). `anchor_sizes`: for FPN backbones one size per level (5), for one-level
    backbones any sizes, all on the stride-16 map; 3 aspect ratios each. `frozen_bn` (default: frozen
    iff backbone weights are given) and `trainable_layers` (default 3 with weights, all without) follow
    torchvision's resnet_fpn_backbone; the IoU thresholds and sampling are torchvision's RPN training.

    The options from `stride_in_1x1` on reproduce a detectron2 RPN (RegionCLIP's released ones,
    rpn_from_reference): `stride_in_1x1` (ResNet stages stride in the first block's 1x1 conv),
    `anchor_layout` "detectron2" (Detectron2AnchorGenerator), `pixel_mean`/`pixel_std` (RGB, for
    images in 0..1; default ImageNet's, CLIP's for clip_res4), `fpn_norm` (a frozen BatchNorm after
    every FPN conv) and `head_convs` (3x3 convs in the RPN head before its two predictors)."""
    backbone: str = "resnet50_fpn"
    clip_arch: Optional[str] = None
    anchor_sizes: Optional[Sequence[int]] = None
    min_size: int = 800
    max_size: int = 1333
    frozen_bn: Optional[bool] = None
    trainable_layers: Optional[int] = None
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    stride_in_1x1: bool = False
    anchor_layout: str = "torchvision"
    pixel_mean: Optional[Sequence[float]] = None
    pixel_std: Optional[Sequence[float]] = None
    fpn_norm: bool = False
    head_convs: int = 1

    @classmethod
    def from_dict(cls, data: dict) -> "RpnConfig":
        """The config a checkpoint recorded; its other entries (e.g. `source`) are not build options."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# -- backbones ---------------------------------------------------------------------------------------

class ClipRes4Backbone(nn.Module):
    """A CLIP ResNet's stem..layer3 (res4, stride 16) as a one-level detection backbone."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        if not all(hasattr(visual, a) for a in ("stem", "layer1", "layer2", "layer3")):
            raise TypeError(f"clip_res4 needs a CLIP ResNet image tower (RN50, RN50-tiny, ...); got "
                            f"{type(visual).__name__}")
        # Only the layers up to res4 are kept; res5 and the attention pool are not part of an RPN.
        visual.layer4 = nn.Identity()
        visual.attnpool = nn.Identity()
        self.visual = visual
        last = visual.layer3[-1]
        self.out_channels = (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        v = self.visual
        x = v.stem(x)
        return OrderedDict([("0", v.layer3(v.layer2(v.layer1(x))))])


class ResNetC4Backbone(nn.Module):
    """torchvision's ResNet-50 up to layer3 (res4, stride 16) as a one-level detection backbone: the
    backbone of detectron2's R50-C4 RPN (its res5 belongs to the box head, not to the RPN)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        del body.layer4, body.avgpool, body.fc
        self.body = body
        self.out_channels = body.layer3[-1].conv3.out_channels

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        return OrderedDict([("0", b.layer3(b.layer2(b.layer1(x))))])


def _resnet_c4_backbone(frozen_bn: bool, trainable_layers: int) -> ResNetC4Backbone:
    norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    backbone = ResNetC4Backbone(resnet50(weights=None, norm_layer=norm))
    # torchvision's rule (_resnet_fpn_extractor), counted from the top: 3 = layer3, layer2, layer1 train.
    layers_to_train = ["layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    for name, parameter in backbone.body.named_parameters():
        if all(not name.startswith(layer) for layer in layers_to_train):
            parameter.requires_grad_(False)
    return backbone


def _move_stride_to_1x1(body: nn.Module) -> None:
    """detectron2's STRIDE_IN_1X1 (the MSRA ResNets): a stage's first block strides in its 1x1 conv,
    not in the 3x3 as torchvision's does. The weights have the same shapes either way."""
    for name in ("layer2", "layer3", "layer4"):
        layer = getattr(body, name, None)
        if layer is not None:
            block = layer[0]
            block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)


class Detectron2AnchorGenerator(AnchorGenerator):
    """detectron2's DefaultAnchorGenerator (offset 0) behind torchvision's interface. Two differences
    with torchvision's own: a level's cell anchors are ordered size-major then aspect ratio and are not
    rounded to whole pixels, and each level's stride is fixed (torchvision derives it as padded image
    size // grid size, which for P6 of an 800-pixel image is 61, not 64). Anchors are float32 always."""

    def __init__(self, sizes, aspect_ratios, strides: Sequence[int]):
        super().__init__(sizes, aspect_ratios)
        self.strides = tuple(int(s) for s in strides)

    def generate_anchors(self, scales, aspect_ratios, dtype: torch.dtype = torch.float32,
                         device: torch.device = torch.device("cpu")) -> Tensor:
        anchors = []
        for size in scales:
            for ratio in aspect_ratios:    # ratio = height / width, area size^2 (detectron2's algebra)
                w = math.sqrt(float(size) ** 2 / float(ratio))
                h = float(ratio) * w
                anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
        return torch.tensor(anchors, dtype=dtype, device=device)

    def forward(self, image_list, feature_maps: list[Tensor]) -> list[Tensor]:
        device = feature_maps[0].device
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(torch.float32, device)
        per_level = self.grid_anchors([f.shape[-2:] for f in feature_maps], strides)
        return [torch.cat(per_level) for _ in image_list.image_sizes]


def _freeze_bn(module: nn.Module) -> nn.Module:
    from trainer.models.region_encoder import freeze_batch_norm

    return freeze_batch_norm(module)


def _clip_backbone(clip_arch: str, weights: Optional[PathLike], frozen_bn: bool,
                   trainable_layers: int, trust_torchscript: bool = False) -> ClipRes4Backbone:
    if weights is not None:
        model, _ = load_clip(clip_arch, weights, trust_torchscript=trust_torchscript)
    else:
        model, _ = create_clip(clip_arch)
    backbone = ClipRes4Backbone(model.visual)
    if frozen_bn:
        _freeze_bn(backbone.visual)
    # trainable_layers counts from the top: 3 = layer3, layer2, layer1 train; the stem does not.
    parts = [("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"), ("layer1",), ("layer2",), ("layer3",)]
    for depth, names in enumerate(parts):
        trainable = depth >= len(parts) - trainable_layers
        for name in names:
            if hasattr(backbone.visual, name):
                getattr(backbone.visual, name).requires_grad_(trainable)
    return backbone


def _torchvision_state_dict(path: Path) -> dict:
    obj = load_checkpoint_file(path)
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not (isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values())):
        raise CheckpointError(f"{path}: no state dict found (expected tensors keyed by parameter names)")
    return without_module_prefix(obj)


def _resnet_fpn_backbone(name: str, frozen_bn: bool, trainable_layers: int, fpn_norm: bool = False):
    norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    net = resnet_fpn_backbone(backbone_name=name, weights=None, norm_layer=norm,
                              trainable_layers=trainable_layers)
    if fpn_norm:   # every FPN conv followed by a (frozen) BatchNorm, its conv without bias
        in_channels = [block[0].in_channels for block in net.fpn.inner_blocks]
        net.fpn = FeaturePyramidNetwork(in_channels, net.out_channels, extra_blocks=LastLevelMaxPool(),
                                        norm_layer=FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d)
    return net


def _load_resnet_weights(model: "ProposalNetwork", path: PathLike) -> dict:
    """Load an ImageNet ResNet (torchvision keys: conv1, layer1.., fc) into backbone.body, or a Faster
    R-CNN / RPN state dict (backbone.body.*, backbone.fpn.*, rpn.head.*) into backbone and RPN head."""
    path = Path(path).expanduser()
    state = _torchvision_state_dict(path)
    if any(k.startswith("backbone.") for k in state):
        targets = {"backbone.": model.backbone, "rpn.head.": model.rpn.head}
    else:
        targets = {"": model.backbone.body}
    loaded, total = 0, 0
    for prefix, module in targets.items():
        own = module.state_dict()
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        fitting = {k: v for k, v in part.items() if k in own and v.shape == own[k].shape}
        module.load_state_dict(fitting, strict=False)
        loaded += len(fitting)
        total += len([k for k in own if not k.endswith("num_batches_tracked")])
    body_keys = [k for k in model.backbone.body.state_dict() if not k.endswith("num_batches_tracked")]
    if loaded < 0.9 * len(body_keys):
        raise CheckpointError(f"{path}: only {loaded} of the backbone's {len(body_keys)} tensors fit; is it "
                              f"a torchvision {model.config['backbone'].split('_')[0]} ImageNet or Faster "
                              "R-CNN state dict?")
    return {"loaded": loaded, "total": total}


# -- the network ---------------------------------------------------------------------------------------

class ProposalNetwork(nn.Module):
    """GeneralizedRCNNTransform + backbone + class-agnostic RegionProposalNetwork.

    Train mode: `model(images, targets)` -> loss dict. Eval: `model.propose(...)` (or `model(images)`,
    which returns propose()'s output with the sizes the model was built with).
    """

    def __init__(self, transform: GeneralizedRCNNTransform, backbone: nn.Module,
                 rpn: RegionProposalNetwork, config: dict):
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.config = dict(config)
        # Names of the categories whose boxes it trained on, when its checkpoint records them (train-rpn's
        # do); evaluate warns when they include evaluation-novel classes.
        self.training_categories: Optional[list[str]] = None

    def _features(self, tensors: Tensor) -> "OrderedDict[str, Tensor]":
        features = self.backbone(tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        return features

    def forward(self, images: list[Tensor], targets: Optional[list[dict]] = None):
        if not self.training:
            return self.propose(images, min_size=self.config["min_size"], max_size=self.config["max_size"])
        if targets is None:
            raise ValueError("ProposalNetwork in train mode needs targets ([{'boxes': Tensor[N, 4]}])")
        targets = [{"boxes": t["boxes"].float()} for t in targets]
        image_list, targets = self.transform(images, targets)
        return self.rpn_losses(image_list, self._features(image_list.tensors), targets)

    def rpn_losses(self, image_list, features: "OrderedDict[str, Tensor]", targets: list[dict]) -> dict:
        """torchvision's RegionProposalNetwork.forward in training mode, less the proposals: it also decodes
        and NMS-filters boxes for a second stage, which a standalone RPN never uses (10-17% of a CPU
        step, measured).
        Same ops in the same order, so the same losses and random draws."""
        rpn, feats = self.rpn, list(features.values())
        objectness, deltas = rpn.head(feats)
        anchors = rpn.anchor_generator(image_list, feats)
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        labels, matched_boxes = rpn.assign_targets_to_anchors(anchors, targets)
        regression_targets = rpn.box_coder.encode(matched_boxes, anchors)
        loss_objectness, loss_box = rpn.compute_loss(objectness, deltas, labels, regression_targets)
        return {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_box}

    @torch.no_grad()
    def propose(self, images: Sequence[Tensor], *, min_size: int, max_size: int, pre_nms_top_n: int = 1000,
                post_nms_top_n: int = 300, nms_thresh: float = 0.5,
                min_box_size: float = 0.0) -> list[tuple[Tensor, Tensor]]:
        """Proposals for images [3, H, W] float in 0..1 (any sizes): one (boxes [N, 4] float32 x1y1x2y2
        in the input image's pixels, objectness logits [N]) per image, ordered by objectness, N at
        most post_nms_top_n. docs/method.md §2: top 1000 per level before NMS 0.5, 300 after, min size 0."""
        was_training = self.training
        self.eval()
        saved = (self.transform.min_size, self.transform.max_size)
        self.transform.min_size, self.transform.max_size = (int(min_size),), int(max_size)
        try:
            images = [img.to(self._device()) for img in images]
            if not images:
                return []
            original_sizes = [tuple(img.shape[-2:]) for img in images]
            image_list, _ = self.transform(list(images))
            features = list(self._features(image_list.tensors).values())
            objectness, deltas = self.rpn.head(features)
            # Under a caller's autocast (bf16) only the network above runs in low precision: box decoding,
            # top-k, NMS and the resize back to original pixels run in fp32.
            with torch.autocast(image_list.tensors.device.type, enabled=False):
                objectness = [o.float() for o in objectness]
                deltas = [d.float() for d in deltas]
                # torchvision builds anchors in the feature maps' dtype: bf16 would round them by pixels
                anchors = self.rpn.anchor_generator(image_list, [f.float() for f in features])
                per_level = [o[0].numel() for o in objectness]
                objectness, deltas = concat_box_prediction_layers(objectness, deltas)
                proposals = self.rpn.box_coder.decode(deltas, [a.float() for a in anchors]).view(len(images), -1, 4)
                logits = objectness.view(len(images), -1)
                results = []
                for boxes, scores, resized, original in zip(proposals, logits, image_list.image_sizes,
                                                             original_sizes):
                    boxes, scores = _filter(boxes, scores, per_level, resized, pre_nms_top_n, post_nms_top_n,
                                            nms_thresh, min_box_size)
                    boxes = clip_boxes_to_image(resize_boxes(boxes, resized, original), original)
                    results.append((boxes.float().cpu(), scores.float().cpu()))
            return results
        finally:
            self.transform.min_size, self.transform.max_size = saved
            self.train(was_training)

    def _device(self) -> torch.device:
        return next(self.parameters()).device


def _filter(boxes: Tensor, logits: Tensor, per_level: list[int], image_size, pre_nms_top_n: int,
            post_nms_top_n: int, nms_thresh: float, min_box_size: float) -> tuple[Tensor, Tensor]:
    """torchvision's RPN.filter_proposals for one image, keeping logits: top-k per level, clip to the
    (resized) image, drop empty boxes, NMS per level, top post_nms_top_n by objectness."""
    keep_idx, levels, offset = [], [], 0
    for level, n in enumerate(per_level):
        k = min(pre_nms_top_n, n)
        idx = logits[offset:offset + n].topk(k).indices + offset
        keep_idx.append(idx)
        levels.append(torch.full((k,), level, dtype=torch.int64, device=logits.device))
        offset += n
    idx, levels = torch.cat(keep_idx), torch.cat(levels)
    boxes, logits = clip_boxes_to_image(boxes[idx], image_size), logits[idx]
    keep = remove_small_boxes(boxes, max(min_box_size, 1e-3))
    boxes, logits, levels = boxes[keep], logits[keep], levels[keep]
    keep = batched_nms(boxes, logits, levels, nms_thresh)[:post_nms_top_n]  # sorted by logit, descending
    return boxes[keep], logits[keep]


def build_rpn(config: RpnConfig, backbone_weights: Optional[PathLike] = None,
              trust_torchscript: bool = False) -> ProposalNetwork:
    """A class-agnostic RPN shaped by `config` (RpnConfig). `backbone_weights`: a local file (None: random
    init; a TorchScript CLIP file for clip_res4 only with `trust_torchscript`, see load_clip). The model's
    `config` is the RpnConfig with its defaults resolved, as a dict (what save_rpn_checkpoint records)."""
    c = config
    backbone, anchor_layout, fpn_norm = c.backbone, c.anchor_layout, c.fpn_norm
    if backbone not in BACKBONES:
        raise ValueError(f"unknown RPN backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if anchor_layout not in ANCHOR_LAYOUTS:
        raise ValueError(f"unknown anchor_layout {anchor_layout!r}; choose one of {', '.join(ANCHOR_LAYOUTS)}")
    frozen_bn = backbone_weights is not None if c.frozen_bn is None else bool(c.frozen_bn)
    fpn = backbone.endswith("_fpn")
    trainable_layers = c.trainable_layers
    if trainable_layers is None:
        trainable_layers = 3 if backbone_weights is not None else (5 if fpn else 4)
    if fpn:
        sizes = tuple(int(s) for s in (c.anchor_sizes or DEFAULT_FPN_ANCHORS))
        if len(sizes) != FPN_LEVELS:
            raise ValueError(f"{backbone}: anchor_sizes needs one size per FPN level ({FPN_LEVELS}), got "
                             f"{list(sizes)}")
        net = _resnet_fpn_backbone(backbone.split("_")[0], frozen_bn, trainable_layers, fpn_norm)
        level_sizes, strides = tuple((s,) for s in sizes), FPN_STRIDES
    else:
        if fpn_norm:
            raise ValueError(f"fpn_norm needs an FPN backbone, not {backbone}")
        if backbone == "clip_res4" and not c.clip_arch:
            raise ValueError("the clip_res4 backbone needs clip_arch (e.g. teacher.arch: RN50)")
        sizes = tuple(int(s) for s in (c.anchor_sizes or DEFAULT_C4_ANCHORS))
        if backbone == "clip_res4":
            net = _clip_backbone(c.clip_arch, backbone_weights, frozen_bn, trainable_layers, trust_torchscript)
        else:
            net = _resnet_c4_backbone(frozen_bn, trainable_layers)
        level_sizes, strides = (sizes,), (C4_STRIDE,)
    if c.stride_in_1x1:
        if backbone == "clip_res4":
            raise ValueError("stride_in_1x1 is a torchvision ResNet option; clip_res4 has its own blocks")
        _move_stride_to_1x1(net.body)
    ratios = (ASPECT_RATIOS,) * len(level_sizes)
    generator = (Detectron2AnchorGenerator(level_sizes, ratios, strides) if anchor_layout == "detectron2"
                 else AnchorGenerator(level_sizes, ratios))
    default_mean, default_std = (CLIP_MEAN, CLIP_STD) if backbone == "clip_res4" else (IMAGENET_MEAN, IMAGENET_STD)
    mean = tuple(float(v) for v in (c.pixel_mean or default_mean))
    std = tuple(float(v) for v in (c.pixel_std or default_std))
    head = RPNHead(net.out_channels, generator.num_anchors_per_location()[0], conv_depth=int(c.head_convs))
    rpn = RegionProposalNetwork(
        generator, head, fg_iou_thresh=c.fg_iou_thresh, bg_iou_thresh=c.bg_iou_thresh,
        batch_size_per_image=c.batch_size_per_image, positive_fraction=c.positive_fraction,
        # torchvision's own proposal filtering is never run: training computes only the losses
        # (ProposalNetwork.rpn_losses) and inference filters in propose(); these are its defaults.
        pre_nms_top_n={"training": 2000, "testing": 1000}, post_nms_top_n={"training": 2000, "testing": 1000},
        nms_thresh=0.7)
    transform = GeneralizedRCNNTransform(c.min_size, c.max_size, list(mean), list(std))
    resolved = replace(c, anchor_sizes=list(sizes), min_size=int(c.min_size), max_size=int(c.max_size),
                       frozen_bn=frozen_bn, trainable_layers=int(trainable_layers),
                       stride_in_1x1=bool(c.stride_in_1x1), pixel_mean=list(mean), pixel_std=list(std),
                       fpn_norm=bool(fpn_norm), head_convs=int(c.head_convs))
    model = ProposalNetwork(transform, net, rpn, asdict(resolved))
    if backbone_weights is not None and backbone != "clip_res4":
        model.weights_report = _load_resnet_weights(model, backbone_weights)
    return model


def rpn_from_reference(state_dict: dict[str, Tensor], *, source: str, min_size: int = 800,
                       max_size: int = 1333) -> ProposalNetwork:
    """A ProposalNetwork that computes what RegionCLIP's detectron2 RPN (R50-C4 or R50-FPN) computes,
    as the reference's test scripts run it (its offline RPN config, FrozenBN or, for the LSJ RPN, BN
    in eval mode: the same thing), from the file's state dict (reference_weights.py maps the keys).
    Frozen, in eval mode."""
    kind = require_kind(state_dict, source, ("rpn_c4", "rpn_fpn"), "an RPN")
    fpn = kind == "rpn_fpn"
    # The LSJ RPN (OFFLINE_RPN_LSJ_PRETRAINED) normalises its FPN convs and has two head convs.
    fpn_norm = fpn and any(k.startswith("backbone.fpn_lateral2.norm.") for k in state_dict)
    head_convs = len({m[1] for k in state_dict
                      if (m := re.match(r"proposal_generator\.rpn_head\.conv\.conv(\d+)\.", k))}) or 1
    model = build_rpn(RpnConfig("resnet50_fpn" if fpn else "resnet50_c4",
                                anchor_sizes=DEFAULT_FPN_ANCHORS if fpn else DEFAULT_C4_ANCHORS,
                                min_size=min_size, max_size=max_size, frozen_bn=True, trainable_layers=0,
                                stride_in_1x1=True, anchor_layout="detectron2", pixel_mean=DETECTRON2_PIXEL_MEAN,
                                pixel_std=DETECTRON2_PIXEL_STD, fpn_norm=fpn_norm, head_convs=head_convs))
    load_by_map(model, state_dict, rpn_key_map(fpn, head_convs), source=source,
                name=f"detectron2 R50-{'FPN' if fpn else 'C4'} RPN",
                transforms={"backbone.body.conv1.weight": lambda w: w.flip(1)},   # BGR -> RGB input
                advice="RegionCLIP's RPNs are detectron2 ResNet-50 C4 or FPN RPNs with 15 (C4) or 3 (FPN) "
                       "anchors per location.")
    model.config["source"] = REFERENCE_FORMAT
    model.requires_grad_(False)
    return model.eval()


# -- checkpoints -------------------------------------------------------------------------------------

def save_rpn_checkpoint(model: ProposalNetwork, path: PathLike, recall: Optional[dict] = None,
                        training_categories: Optional[Sequence[str]] = None, **config) -> Path:
    """Write {"state_dict", "config" (the build args, updated by `config`), "recall",
    "training_categories" (names of the categories whose boxes it trained on)} atomically.
    Values must be plain data: the file is read back with weights_only=True."""
    model = getattr(model, "module", model)
    cfg = {**model.config, **config}
    cfg.pop("backbone_weights", None)   # the weights are in the state dict; never re-read on load
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # a temporary file, fsync, then rename
        torch.save({"state_dict": state, "config": cfg, "recall": recall,
                    "training_categories": list(training_categories) if training_categories is not None else None},
                   tmp)
    return path


def load_rpn(path: PathLike, device: Union[str, torch.device] = "cpu") -> ProposalNetwork:
    """The RPN saved at `path` (save_rpn_checkpoint's file, or one of RegionCLIP's released detectron2
    RPNs), in eval mode. Refuses files that pickle code (weights_only=True)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise RpnCheckpointNotFoundError(
            f"{path}: no such RPN checkpoint. Train one with the train-rpn stage "
            "(train_rpn.enabled: true), or set proposals.checkpoint to a class-agnostic RPN checkpoint "
            "saved by trainer.models.rpn.save_rpn_checkpoint or released by RegionCLIP (rpn_*.pth).")
    obj = load_checkpoint_file(path)
    reference = reference_state_dict(obj)
    if reference is not None:      # RegionCLIP's released RPN: a detectron2 {"model": ...} file
        model = rpn_from_reference(reference, source=str(path))
        model.recall = None
        return model.to(device).eval()
    if not (isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict)
            and isinstance(obj.get("config"), dict)):
        raise CheckpointError(f"{path}: not an RPN checkpoint (expected 'state_dict' and 'config', or a "
                              "RegionCLIP/detectron2 file with 'model')")
    cfg = dict(obj["config"])
    model = build_rpn(RpnConfig.from_dict(cfg))
    try:
        model.load_state_dict(obj["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the weights do not fit the RPN its config describes ({err})") from None
    model.config.update(cfg)
    model.recall = obj.get("recall")
    model.training_categories = obj.get("training_categories")
    return model.to(device).eval()


# -- recall ---------------------------------------------------------------------------------------------

def _boxes_of(entry) -> Tensor:
    if isinstance(entry, (tuple, list)):
        entry = entry[0]
    return torch.as_tensor(entry, dtype=torch.float32).reshape(-1, 4)


def proposal_hits(proposals, gt_boxes, iou: float = 0.5, top_n: int = 300) -> list[Tensor]:
    """Per image, a bool per ground-truth box: covered by one of the first `top_n` proposals at IoU >= iou."""
    hits = []
    for props, gt in zip(proposals, gt_boxes):
        props, gt = _boxes_of(props)[:top_n], _boxes_of(gt)
        if len(gt) == 0:
            hits.append(torch.zeros(0, dtype=torch.bool))
        elif len(props) == 0:
            hits.append(torch.zeros(len(gt), dtype=torch.bool))
        else:
            hits.append(box_iou(gt, props).max(dim=1).values >= iou)
    return hits


def proposal_recall(proposals, gt_boxes, iou: float = 0.5, top_n: int = 300) -> float:
    """The share of ground-truth boxes (over all images) covered by one of the first `top_n` proposals of
    their image at IoU >= `iou`. `proposals`: per image boxes [N, 4] (or (boxes, scores)), ordered by
    objectness; `gt_boxes`: per image [M, 4]; both x1y1x2y2 in the same pixels. NaN without any gt."""
    hits = torch.cat(proposal_hits(proposals, gt_boxes, iou, top_n) or [torch.zeros(0, dtype=torch.bool)])
    return float(hits.float().mean()) if len(hits) else float("nan")
