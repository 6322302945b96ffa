"""RegionCLIP's released weights (microsoft/RegionCLIP's detectron2 checkpoints) on our models.

The reference saves detectron2 checkpoints, `torch.save({"model": state_dict, ...})`; they are read
with torch.load(weights_only=True). A file holds one of four kinds, told apart by its keys:

| kind | released files | the reference's modules (key prefixes) | ours |
|---|---|---|---|
| region_encoder | regionclip_pretrained-cc_{rn50,rn50x4}.pth | `backbone.` CLIP ModifiedResNet + attnpool, `lang_encoder.` CLIPLangEncoder | open_clip CLIP (load_clip) |
| detector | regionclip_finetuned-{coco,lvis}_{rn50,rn50x4}.pth | `backbone.` as above, `roi_heads.box_predictor.` | OpenVocabDetector |
| rpn_c4 | rpn_coco_48.pth (and _65, _80) | `backbone.stem/res2..res4` (detectron2 ResNet-50), `proposal_generator.rpn_head.` | ProposalNetwork, resnet50_c4 |
| rpn_fpn | rpn_lvis_866.pth, rpn_lvis_866_lsj.pth | `backbone.bottom_up.stem/res2..res5`, `backbone.fpn_lateral2..5`, `backbone.fpn_output2..5`, `proposal_generator.rpn_head.` | ProposalNetwork, resnet50_fpn |

(In microsoft/RegionCLIP: detectron2/modeling/backbone/clip_backbone.py for ModifiedResNet,
AttentionPool2d and CLIPLangEncoder; modeling/meta_arch/clip_rcnn.py for the module names of
CLIPFastRCNN and PretrainFastRCNN; modeling/roi_heads/clip_roi_heads.py and fast_rcnn.py for the box
predictor; modeling/backbone/resnet.py, fpn.py and proposal_generator/rpn.py for the RPNs.)

Each kind has one key map: for every tensor of our model, the reference's name for it (prefix renames
and per-layer patterns, below). A file must hold exactly those names, plus the reference modules that
the kind lists as having no part in our model (`ignored`, e.g. the pretraining teacher, the offline
RPN saved inside a detector, the LVIS mask head). Any other key is unexpected, any absent one is
missing, and either is a CheckpointError that lists them by the file's own names; so are other shapes.

What is transformed, not only renamed:
  - RPNs: detectron2's ResNet reads BGR images in 0..255 minus the ImageNet mean (in BGR order), with
    std 1. The stem conv's input channels are reversed and the ProposalNetwork normalises RGB 0..1
    images with the ImageNet mean and std 1/255: the same numbers. Its stages stride in the 1x1 conv
    (STRIDE_IN_1X1) and its anchors are detectron2's (build_rpn's detectron2 options).
  - detectors: `cls_bg_score` (the background embedding) must be all zero, as the reference freezes it
    (ours is a constant 0 logit); `cls_score` holds the training vocabulary's text embeddings and is
    checked but not kept (our classes come from the evaluation vocabulary's text embeddings).
  - region encoders: the reference does not save CLIP's logit_scale; open_clip's initial value stays
    (only train-teacher uses it). The text tower is OpenAI's (QuickGELU), kept frozen by the reference.

This module holds the key maps and tells the kinds apart; it imports no model. Each model builds
itself from a reference file beside its own loader: load_clip (clip.py) for a region encoder,
rpn_from_reference (rpn.py), detector_from_reference (detector.py); load_reference (released.py)
takes a file of any kind.

    model, tokenizer = load_clip("RN50", "regionclip_pretrained-cc_rn50.pth")   # dispatches here
    rpn = load_rpn("rpn_lvis_866.pth")                                        # dispatches here
    detector = build_detector("RN50", "regionclip_finetuned-coco_rn50.pth", class_embeddings)
    model = load_reference("rpn_coco_48.pth")        # any kind, told by the keys (or kind=...)
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from torch import Tensor, nn

from trainer.models.checkpoint import (CheckpointError, CheckpointNotFoundError, LoadReport, PathLike,
                                       load_checkpoint_file, reference_state_dict)

REFERENCE_FORMAT = "regionclip-detectron2"
KINDS = ("region_encoder", "detector", "rpn_c4", "rpn_fpn")

_BOOKKEEPING = "num_batches_tracked"      # BatchNorm's step counter: no weight, absent from FrozenBN

Rename = Union[str, Callable[[re.Match], str]]


# -- key maps ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KeyMap:
    """Our tensor names -> the reference's: the first rule whose regex matches our whole name renames it
    (a template with \\1 / \\g<name>, or a function of the match). `None` as a rename: a tensor the
    reference does not save (kept as built). `ignored`: prefixes of reference modules that our model
    has no part for. `checked`: reference tensors read by a check of the kind, not loaded."""
    kind: str
    rules: tuple[tuple[str, Optional[Rename]], ...]
    ignored: tuple[str, ...] = ()
    checked: tuple[str, ...] = ()

    def reference_name(self, ours: str) -> Optional[str]:
        for pattern, rename in self.rules:
            match = re.fullmatch(pattern, ours)
            if match:
                if rename is None:
                    return None
                return match.expand(rename) if isinstance(rename, str) else rename(match)
        raise KeyError(f"the {self.kind} key map has no rule for our tensor {ours}")


def _d2_resnet_rules(ours: str, reference: str) -> tuple:
    """torchvision ResNet names under `ours` -> detectron2 ResNet names under `reference`:
    conv1/bn1 = stem.conv1(.norm), layer{k} = res{k+1}, bn{n} = conv{n}.norm, downsample = shortcut."""
    p = re.escape(ours)

    def block(m: re.Match, rest: str) -> str:
        return f"{reference}res{int(m['layer']) + 1}.{m['block']}.{rest}"

    blk = r"layer(?P<layer>[1-4])\.(?P<block>\d+)\."
    return (
        (p + r"conv1\.weight", f"{reference}stem.conv1.weight"),
        (p + r"bn1\.(?P<t>\w+)", reference + r"stem.conv1.norm.\g<t>"),
        (p + blk + r"conv(?P<n>[123])\.weight", lambda m: block(m, f"conv{m['n']}.weight")),
        (p + blk + r"bn(?P<n>[123])\.(?P<t>\w+)", lambda m: block(m, f"conv{m['n']}.norm.{m['t']}")),
        (p + blk + r"downsample\.0\.weight", lambda m: block(m, "shortcut.weight")),
        (p + blk + r"downsample\.1\.(?P<t>\w+)", lambda m: block(m, f"shortcut.norm.{m['t']}")),
    )


def _rpn_head_rules(head_convs: int) -> tuple:
    """torchvision RPNHead -> detectron2 StandardRPNHead: conv (one) or conv.conv{k} (CONV_DIMS with
    several entries), cls_logits = objectness_logits, bbox_pred = anchor_deltas."""
    head = "proposal_generator.rpn_head."
    conv = ((r"rpn\.head\.conv\.0\.0\.(weight|bias)", head + r"conv.\1"),) if head_convs == 1 else \
        ((r"rpn\.head\.conv\.(\d+)\.0\.(weight|bias)", head + r"conv.conv\1.\2"),)
    return conv + ((r"rpn\.head\.cls_logits\.(weight|bias)", head + r"objectness_logits.\1"),
                   (r"rpn\.head\.bbox_pred\.(weight|bias)", head + r"anchor_deltas.\1"))


def _fpn_rules() -> tuple:
    """torchvision FeaturePyramidNetwork -> detectron2 FPN: inner_blocks.{i} = fpn_lateral{i+2},
    layer_blocks.{i} = fpn_output{i+2} (P2..P5); a conv's norm (fpn_norm) = .norm."""
    def fpn(kind: str) -> Callable[[re.Match], str]:
        def rename(m: re.Match) -> str:
            norm = "norm." if m["part"] == "1" else ""
            return f"backbone.fpn_{kind}{int(m['i']) + 2}.{norm}{m['t']}"
        return rename
    tail = r"\.(?P<i>[0-3])\.(?P<part>[01])\.(?P<t>\w+)"
    return ((r"backbone\.fpn\.inner_blocks" + tail, fpn("lateral")),
            (r"backbone\.fpn\.layer_blocks" + tail, fpn("output")))


REGION_ENCODER_MAP = KeyMap(
    kind="region_encoder",
    rules=((r"logit_scale", None),                       # not saved by the reference
           (r"visual\.(.+)", r"backbone.\1"),            # ModifiedResNet: the same names as OpenAI's
           (r"(.+)", r"lang_encoder.\1")),               # the text tower: CLIP's names
    # PretrainFastRCNN's other modules: the frozen teacher and the offline RPN of pretraining.
    ignored=("teacher_backbone.", "offline_backbone.", "offline_proposal_generator."),
)

DETECTOR_MAP = KeyMap(
    kind="detector",
    rules=((r"encoder\.visual\.(.+)", r"backbone.\1"),
           (r"bbox_pred\.(weight|bias)", r"roi_heads.box_predictor.bbox_pred.\1")),
    # CLIPFastRCNN's modules outside the C4 head: the offline RPN (loaded from its own file), the text
    # encoder (class embeddings come from the teacher's), the LVIS mask head (box AP only), the test
    # vocabulary's embeddings (ours come from the evaluation vocabulary).
    ignored=("offline_backbone.", "offline_proposal_generator.", "lang_encoder.", "roi_heads.mask_head.",
             "roi_heads.box_predictor.test_cls_score."),
    checked=("roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_bg_score.weight"),
)

# A Mask R-CNN's RPN: its box and mask heads (and, for C4, their res5) are not part of an RPN.
_RPN_IGNORED = ("roi_heads.",)


def rpn_key_map(fpn: bool, head_convs: int = 1) -> KeyMap:
    if fpn:
        rules = _d2_resnet_rules("backbone.body.", "backbone.bottom_up.") + _fpn_rules()
    else:
        rules = _d2_resnet_rules("backbone.body.", "backbone.")
    return KeyMap(kind="rpn_fpn" if fpn else "rpn_c4", rules=rules + _rpn_head_rules(head_convs),
                  ignored=_RPN_IGNORED)


# -- reading files -----------------------------------------------------------------------------------

def read_reference_checkpoint(path: PathLike) -> dict[str, Tensor]:
    """The state dict of a RegionCLIP/detectron2 file; refuses pickled code and other layouts."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: no such checkpoint file (RegionCLIP's weights are on its "
                                      "model zoo page, docs/MODEL_ZOO.md in microsoft/RegionCLIP)")
    state = reference_state_dict(load_checkpoint_file(path))
    if state is None:
        raise CheckpointError(f"{path}: not a detectron2 checkpoint (expected {{'model': state dict}})")
    return state


def reference_kind(state_dict: dict) -> str:
    """Which of KINDS a reference state dict holds, told by its modules (a renamed tensor leaves the
    kind alone and is reported by the load)."""
    modules = {k.split(".")[0] for k in state_dict}
    if "proposal_generator" in modules:
        fpn = any(k.startswith(("backbone.bottom_up.", "backbone.fpn_")) for k in state_dict)
        return "rpn_fpn" if fpn else "rpn_c4"
    if "backbone" in modules:
        return "detector" if any(k.startswith("roi_heads.box_predictor.") for k in state_dict) \
            else "region_encoder"
    raise CheckpointError(f"not a RegionCLIP checkpoint of a known kind ({', '.join(KINDS)}): its top-level "
                          f"modules are {sorted(modules)}")


def require_kind(state_dict: dict, source: str, kinds: tuple[str, ...], what: str) -> str:
    """The kind of a reference state dict, which must be one of `kinds` (`what` a loader wants, e.g. "an
    RPN"); any other is a CheckpointError saying where that file goes instead."""
    kind = reference_kind(state_dict)
    if kind not in kinds:
        raise CheckpointError(f"{source}: a RegionCLIP {kind} file, not {what}; " + _where_it_goes(kind))
    return kind


# -- loading by a key map -----------------------------------------------------------------------------

def load_by_map(model: nn.Module, state_dict: dict[str, Tensor], key_map: KeyMap, *, source: str,
                name: str, allow_partial: bool = False, advice: str = "",
                transforms: Optional[dict[str, Callable[[Tensor], Tensor]]] = None) -> LoadReport:
    """Load the reference tensors into `model` by `key_map`. Every tensor of the model must be in the
    file under its reference name and every tensor of the file must be used (or in an ignored module),
    with the same shapes; otherwise a CheckpointError listing the file's names (with allow_partial: a
    warning, and only what fits is loaded). `transforms`: our name -> a function of the file's tensor."""
    transforms = transforms or {}
    ours = model.state_dict()
    wanted = {}                                              # our name -> the reference's
    report = LoadReport(source=source, format=f"{REFERENCE_FORMAT} {key_map.kind}")
    for key in ours:
        reference = key_map.reference_name(key)
        if reference is None:
            continue
        if reference in state_dict:
            wanted[key] = reference
        elif not key.endswith(_BOOKKEEPING):
            report.missing.append(reference)
    used = set(wanted.values()) | set(key_map.checked)
    report.unexpected = [k for k in state_dict if k not in used and not k.startswith(key_map.ignored)
                         and not k.endswith(_BOOKKEEPING)]
    report.missing += [k for k in key_map.checked if k not in state_dict]
    report.mismatched = [(ref, tuple(state_dict[ref].shape), tuple(ours[key].shape))
                         for key, ref in wanted.items() if state_dict[ref].shape != ours[key].shape]
    if not report.complete:
        message = report.describe(name)
        if not allow_partial:
            raise CheckpointError(f"{message}\n{advice}".rstrip())
        warnings.warn("partial load (allow_partial): " + message, stacklevel=3)
    skipped = {ref for ref, _, _ in report.mismatched}
    loaded = {key: transforms.get(key, lambda t: t)(state_dict[ref]) for key, ref in wanted.items()
              if ref not in skipped}
    model.load_state_dict(loaded, strict=False)
    return report


# -- the region encoder (the other kinds: rpn.py and detector.py) -------------------------------------

def load_region_encoder_weights(clip_model: nn.Module, state_dict: dict[str, Tensor], *, source: str,
                                arch: str, allow_partial: bool = False) -> LoadReport:
    """A pretrained RegionCLIP file into an open_clip CLIP of the same architecture (load_clip calls
    this for detectron2 files): backbone -> visual, lang_encoder -> the text tower."""
    require_kind(state_dict, source, ("region_encoder",), "a pretrained region encoder")
    return load_by_map(clip_model, state_dict, REGION_ENCODER_MAP, source=source, name=arch,
                       allow_partial=allow_partial,
                       advice="Check that the architecture (e.g. teacher.arch: RN50 or RN50x4) is the one "
                              "of the RegionCLIP file.")


def _where_it_goes(kind: str) -> str:
    return {"region_encoder": "use it as a CLIP checkpoint (teacher.checkpoint)",
            "detector": "evaluate it with evaluate.detectors",
            "rpn_c4": "use it as the RPN (proposals.checkpoint)",
            "rpn_fpn": "use it as the RPN (proposals.checkpoint)"}[kind] + "."
