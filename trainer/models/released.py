"""RegionCLIP's released files as our models, whatever their kind (reference_weights.py tells the kind
by the keys; each model builds itself from its kind).

    model, tokenizer = load_reference("regionclip_pretrained-cc_rn50.pth", arch="RN50")
    detector = load_reference("regionclip_finetuned-coco_rn50.pth", arch="RN50", class_embeddings=e)
    rpn = load_reference("rpn_coco_48.pth")
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from trainer.models.checkpoint import PathLike
from trainer.models.clip import create_clip
from trainer.models.detector import detector_from_reference
from trainer.models.reference_weights import (KINDS, load_region_encoder_weights, read_reference_checkpoint,
                                              reference_kind)
from trainer.models.rpn import rpn_from_reference


def load_reference(path: PathLike, kind: Optional[str] = None, *, arch: Optional[str] = None,
                   class_embeddings=None, device: Union[str, torch.device] = "cpu"):
    """The model a RegionCLIP file holds, in eval mode: (open_clip model, tokenizer) for a region
    encoder (needs `arch`), an OpenVocabDetector (needs `arch` and `class_embeddings`) or a
    ProposalNetwork. `kind`: one of KINDS, or None to tell it by the file's keys."""
    state = read_reference_checkpoint(path)
    kind = kind or reference_kind(state)
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind in ("region_encoder", "detector") and not arch:
        raise ValueError(f"a RegionCLIP {kind} needs arch (RN50 or RN50x4)")
    if kind == "region_encoder":
        model, tokenizer = create_clip(arch, quick_gelu=True)
        model.regionclip_load_report = load_region_encoder_weights(model, state, source=str(path), arch=arch)
        return model.to(device).eval(), tokenizer
    if kind == "detector":
        if class_embeddings is None:
            raise ValueError("a detector needs class_embeddings (the vocabulary's text embeddings)")
        return detector_from_reference(state, source=str(path), arch=arch,
                                       class_embeddings=class_embeddings).to(device).eval()
    return rpn_from_reference(state, source=str(path)).to(device)
