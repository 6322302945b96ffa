"""Tiny stand-ins for the detector tests: a random CLIP, class embeddings from its text tower, a
stand-in RPN (boxes on a grid plus jittered copies of known boxes), a tiny synthetic world."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from trainer.models.clip import create_clip, save_clip_checkpoint


def tiny_clip(seed: int = 0, arch: str = "RN50-tiny"):
    torch.manual_seed(seed)
    model, tokenizer = create_clip(arch)
    return model.eval(), tokenizer


def text_embeddings(model, tokenizer, names) -> torch.Tensor:
    with torch.no_grad():
        return torch.nn.functional.normalize(model.encode_text(tokenizer([f"a photo of a {n}." for n in names])),
                                             dim=-1)


def save_tiny_clip(path: Path, seed: int = 0, arch: str = "RN50-tiny") -> Path:
    model, _ = tiny_clip(seed, arch)
    return save_clip_checkpoint(model, path, arch=arch)


def grid_boxes(height: int, width: int, sizes=(24, 40, 64), step: int = 16) -> torch.Tensor:
    boxes = []
    for s in sizes:
        for y in range(0, max(1, height - s + 1), step):
            for x in range(0, max(1, width - s + 1), step):
                boxes.append([x, y, min(width, x + s), min(height, y + s)])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


class StandInRPN:
    """`propose` like trainer/models/rpn.py's ProposalNetwork: grid boxes (and jittered known boxes, when
    `known` maps an image size to boxes) with deterministic objectness logits, best first."""

    def __init__(self, known: Optional[dict] = None, max_boxes: int = 64):
        self.known = known or {}
        self.max_boxes = max_boxes
        self.calls = []

    def propose(self, images, *, min_size, max_size, pre_nms_top_n=1000, post_nms_top_n=300, nms_thresh=0.5):
        self.calls.append({"min_size": min_size, "pre_nms_top_n": pre_nms_top_n, "post_nms_top_n": post_nms_top_n,
                           "nms_thresh": nms_thresh})
        out = []
        for image in images:
            h, w = image.shape[-2:]
            boxes = grid_boxes(h, w)
            g = torch.Generator().manual_seed(h * 1000 + w)
            logits = torch.randn(len(boxes), generator=g) - 1.0
            extra = self.known.get((h, w))
            if extra is not None:
                jitter = extra + torch.randn(extra.shape, generator=g) * 2
                boxes = torch.cat([jitter, boxes])
                logits = torch.cat([torch.full((len(extra),), 3.0), logits])
            order = logits.argsort(descending=True)[: min(post_nms_top_n, self.max_boxes)]
            out.append((boxes[order], logits[order]))
        return out
