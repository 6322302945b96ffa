"""A test-only stand-in for trainer/models/rpn.py's contract, built from torchvision parts (random weights).

    load_rpn(path, device) -> object with .propose(images: list[Tensor[3,H,W] in 0..1], *, min_size,
        max_size, pre_nms_top_n, post_nms_top_n, nms_thresh) -> list[(boxes[N,4] original pixels, logits[N])]
The weights are seeded (the file at `path` only has to exist), so every process builds the same net.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes  # noqa: F401
from torchvision.models.detection._utils import BoxCoder


class StandInRPN(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=4, padding=1), nn.ReLU())
        self.anchors = AnchorGenerator(sizes=((32, 64, 128),), aspect_ratios=((0.5, 1.0, 2.0),))
        self.head = RPNHead(16, 9)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self.coder = BoxCoder((1.0, 1.0, 1.0, 1.0))

    @torch.no_grad()
    def propose(self, images, *, min_size, max_size, pre_nms_top_n, post_nms_top_n, nms_thresh):
        transform = GeneralizedRCNNTransform(min_size, max_size, [0.0] * 3, [1.0] * 3)
        transform.eval()
        batch, _ = transform(list(images))
        feats = self.backbone(batch.tensors)
        obj, deltas = self.head([feats])
        anchors = self.anchors(batch, [feats])
        out = []
        for i, (img, (h, w)) in enumerate(zip(images, batch.image_sizes)):
            logits = obj[0][i].permute(1, 2, 0).reshape(-1)
            d = deltas[0][i].reshape(9, 4, *deltas[0].shape[-2:]).permute(2, 3, 0, 1).reshape(-1, 4)
            boxes = self.coder.decode_single(d, anchors[i])
            top = logits.topk(min(pre_nms_top_n, len(logits))).indices
            boxes, logits = clip_boxes_to_image(boxes[top], (h, w)), logits[top]
            keep = remove_small_boxes(boxes, 1e-3)
            boxes, logits = boxes[keep], logits[keep]
            keep = batched_nms(boxes, logits, torch.zeros_like(logits, dtype=torch.long), nms_thresh)
            keep = keep[:post_nms_top_n]
            sy, sx = img.shape[1] / h, img.shape[2] / w
            out.append((boxes[keep] * torch.tensor([sx, sy, sx, sy]), logits[keep]))
        return out


def load_rpn(path, device="cpu"):
    return StandInRPN().to(device).eval()
