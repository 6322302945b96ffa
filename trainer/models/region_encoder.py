"""The region encoder: CLIP's own ResNet turned into a region feature extractor (docs/method.md §3, §4, §6).

    res4 = stem -> layer1 -> layer2 -> layer3          (stride 16, computed once per image)
    region = RoIAlign(res4, box) -> layer4 -> attnpool (per box)

One implementation serves the teacher (frozen), the student (stem and res2 frozen, BatchNorms frozen)
and the C4 detector (features() is the backbone, pool_regions() the box head).

The RoIAlign output is twice the attention pool's native grid (14x14 for RN50 at 224, 18x18 for
RN50x4 at 288), so after layer4 (stride 2) every region arrives at the native grid: the positional
embedding is used as trained. A whole image at its native size gives CLIP's own image embedding
exactly (the whole-image box samples res4 at its pixel centres). Only `encode_image` on a full res5
map of another size interpolates the positional embedding (bicubic), as for a ViT at a new resolution.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d, roi_align

# ModifiedResNet's res4 (layer3) stride: stem 4 (stride-2 conv, 2x2 avgpool), layer2 x2, layer3 x2.
RES4_STRIDE = 16
_STEM = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")

Boxes = Union[Sequence[torch.Tensor], torch.Tensor]


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d inside `module` (in place) by torchvision's FrozenBatchNorm2d:
    statistics and affine terms become constant buffers, in train mode too. Returns `module`."""
    if isinstance(module, nn.BatchNorm2d):  # SyncBatchNorm is not a subclass; handled below too
        return _frozen_copy(module)
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            setattr(module, name, _frozen_copy(child))
        else:
            freeze_batch_norm(child)
    return module


def _frozen_copy(bn: nn.modules.batchnorm._BatchNorm) -> FrozenBatchNorm2d:
    frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    if bn.affine:
        frozen.weight.copy_(bn.weight.detach())
        frozen.bias.copy_(bn.bias.detach())
    frozen.running_mean.copy_(bn.running_mean)
    frozen.running_var.copy_(bn.running_var)
    return frozen.to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)


class RegionEncoder(nn.Module):
    """Region embeddings from an open_clip ModifiedResNet (`clip_model.visual`).

    The visual tower is shared, not copied: freezing options change it in place, so the CLIP model
    that owns it sees the same (frozen) modules and saves the same weights.

    Args:
        visual: open_clip's ModifiedResNet (RN50, RN50x4, our tiny configs).
        freeze_stem_res2: no gradient for the stem and layer1 (detectron2's res2); their BatchNorms
            are frozen too, as detectron2 does for frozen stages.
        freeze_bn: every BatchNorm frozen (running statistics used, never updated, no gradient).
        sampling_ratio: RoIAlign samples per bin side; 0 is adaptive (detectron2's default), which
            takes one sample at each bin centre when a bin is one res4 pixel, so a whole image at
            native size reproduces CLIP exactly; larger boxes average more samples.
    """

    def __init__(self, visual: nn.Module, freeze_stem_res2: bool = False, freeze_bn: bool = False,
                 sampling_ratio: int = 0):
        super().__init__()
        if not all(hasattr(visual, a) for a in ("attnpool", "layer3", "layer4", "stem")):
            raise TypeError(f"the region encoder needs a CLIP ResNet image tower (RN50, RN50x4, ...); "
                            f"got {type(visual).__name__}")
        self.visual = visual
        positions = visual.attnpool.positional_embedding.shape[0] - 1  # grid cells, without the mean token
        self.native_grid = math.isqrt(positions)
        if self.native_grid ** 2 != positions:
            raise ValueError(f"attention pool positional embedding has {positions + 1} rows; expected a "
                             "square grid plus one")
        # layer4 halves the pooled map, which must then be the attention pool's native grid.
        self.pooler_size = 2 * self.native_grid
        self.sampling_ratio = sampling_ratio
        self.output_dim = visual.attnpool.c_proj.out_features

        if freeze_bn:
            freeze_batch_norm(visual)
        if freeze_stem_res2:
            for name in _STEM + ("layer1",):
                part = getattr(visual, name)
                if isinstance(part, (nn.BatchNorm2d, nn.SyncBatchNorm)):
                    setattr(visual, name, _frozen_copy(part))
                else:
                    freeze_batch_norm(part)
                getattr(visual, name).requires_grad_(False)

    @classmethod
    def from_clip(cls, clip_model: nn.Module, **kwargs) -> "RegionEncoder":
        return cls(getattr(clip_model, "module", clip_model).visual, **kwargs)

    # -- the two halves ---------------------------------------------------------------------------

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The res4 map [B, C4, H/16, W/16] of CLIP-normalised images [B, 3, H, W]."""
        x = self.visual.stem(images)
        x = self.visual.layer1(x)
        x = self.visual.layer2(x)
        return self.visual.layer3(x)

    def pool_regions(self, res4: torch.Tensor, boxes: Boxes) -> torch.Tensor:
        """Region embeddings [sum N_i, D] (not normalised) for boxes in input-image pixels (x1, y1, x2, y2):
        a list with one [N_i, 4] tensor per image, or one [K, 5] tensor whose first column is the image."""
        # Float32 boxes and sampling: in float16 a coordinate near 1000 px is off by up to half a pixel.
        if isinstance(boxes, torch.Tensor):
            rois = boxes.to(device=res4.device, dtype=torch.float32)
        else:
            rois = [b.to(device=res4.device, dtype=torch.float32).reshape(-1, 4) for b in boxes]
        if len(rois) == 0 or sum(len(r) for r in rois) == 0:
            return res4.new_zeros((0, self.output_dim))
        pooled = roi_align(res4.float(), rois, output_size=self.pooler_size, spatial_scale=1.0 / RES4_STRIDE,
                           sampling_ratio=self.sampling_ratio, aligned=True)
        return self.attention_pool(self.visual.layer4(pooled.to(res4.dtype)))

    def forward(self, images: torch.Tensor, boxes: Boxes) -> torch.Tensor:
        return self.pool_regions(self.features(images), boxes)

    # -- whole images --------------------------------------------------------------------------------

    def image_embedding(self, images: torch.Tensor,
                        image_sizes: Optional[Sequence[tuple[int, int]]] = None) -> torch.Tensor:
        """One embedding per image [B, D]: the whole-image box through the region head (docs/method.md §4).

        `image_sizes`: (height, width) of each image inside a padded batch; None uses the padded
        size. At the native input size (224 for RN50) this equals CLIP's encode_image.
        """
        height, width = images.shape[-2:]
        sizes = image_sizes if image_sizes is not None else [(height, width)] * images.shape[0]
        boxes = [torch.tensor([[0.0, 0.0, float(w), float(h)]], device=images.device) for h, w in sizes]
        return self(images, boxes)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's own image embedding: the full res5 map through the attention pool, at any input size
        (the positional embedding is interpolated when the res5 grid is not the native one)."""
        return self.attention_pool(self.visual.layer4(self.features(images)))

    # -- the attention pool --------------------------------------------------------------------------

    def positional_embedding(self, height: int, width: int) -> torch.Tensor:
        """The attention pool's positional embedding for a height x width res5 grid (+1 mean token):
        as trained at the native grid, bicubic-interpolated otherwise."""
        table = self.visual.attnpool.positional_embedding
        if (height, width) == (self.native_grid, self.native_grid):
            return table
        grid = table[1:].reshape(1, self.native_grid, self.native_grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(height, width), mode="bicubic", align_corners=False,
                             antialias=True).to(table.dtype)
        return torch.cat([table[:1], grid.permute(0, 2, 3, 1).reshape(height * width, -1)])

    def attention_pool(self, res5: torch.Tensor) -> torch.Tensor:
        """open_clip's AttentionPool2d.forward, with a positional embedding that fits the grid."""
        pool = self.visual.attnpool
        n, c, h, w = res5.shape
        x = res5.reshape(n, c, h * w).permute(2, 0, 1)  # NCHW -> (HW)NC
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # (HW+1)NC: the mean token queries
        x = x + self.positional_embedding(h, w)[:, None, :].to(x.dtype)
        x, _ = F.multi_head_attention_forward(
            query=x[:1], key=x, value=x,  # only the mean token's output is used
            embed_dim_to_check=c,
            num_heads=pool.num_heads,
            q_proj_weight=pool.q_proj.weight,
            k_proj_weight=pool.k_proj.weight,
            v_proj_weight=pool.v_proj.weight,
            in_proj_weight=None,
            in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None,
            bias_v=None,
            add_zero_attn=False,
            dropout_p=0.0,
            out_proj_weight=pool.c_proj.weight,
            out_proj_bias=pool.c_proj.bias,
            use_separate_proj_weight=True,
            training=self.training,
            need_weights=False,
        )
        return x[0]
