"""RegionCLIP's released weights (trainer/models/reference_weights.py) and open_clip's safetensors.

Each test writes a file in the reference's own layout: tensor names spelled as microsoft/RegionCLIP's
modules name them (clip_backbone.py's ModifiedResNet / AttentionPool2d / CLIPLangEncoder, clip_rcnn.py's
module names, fast_rcnn.py's box predictor, detectron2's ResNet, FPN and StandardRPNHead), random
values, tiny widths where our models allow it. Our model loaded from the file must compute what a
direct computation with the file's tensors computes (written here from the reference's forward
functions); a renamed or reshaped tensor must be refused by name.
"""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import batched_nms, clip_boxes_to_image, roi_align

from trainer.models.checkpoint import CheckpointError
from trainer.models.clip import create_clip, load_clip
from trainer.models.detector import build_detector, read_checkpoint_kind
from trainer.models.reference_weights import reference_kind
from trainer.models.released import load_reference
from trainer.models.region_encoder import RegionEncoder
from trainer.models.rpn import load_rpn

TINY = dict(layers=(1, 1, 1, 1), width=16, embed_dim=64, grid=2, heads=8,        # RN50-tiny
            text_width=64, text_heads=2, text_layers=2, context=32, vocab=49408)


def randn(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen) * scale


# -- the reference's layouts ----------------------------------------------------------------------------

def frozen_bn(sd, name, channels, gen):
    """detectron2's FrozenBatchNorm2d buffers (weight, bias, running_mean, running_var)."""
    sd[f"{name}.weight"] = 1 + randn(gen, channels, scale=0.1)
    sd[f"{name}.bias"] = randn(gen, channels, scale=0.1)
    sd[f"{name}.running_mean"] = randn(gen, channels, scale=0.1)
    sd[f"{name}.running_var"] = 1 + torch.rand(channels, generator=gen)


def conv(sd, name, cout, cin, k, gen):
    sd[f"{name}.weight"] = randn(gen, cout, cin, k, k, scale=(1.0 / (cin * k * k)) ** 0.5)


def linear(sd, name, cout, cin, gen):
    sd[f"{name}.weight"] = randn(gen, cout, cin, scale=cin ** -0.5)
    sd[f"{name}.bias"] = randn(gen, cout, scale=0.1)


def modified_resnet(prefix, gen, layers, width, embed_dim, grid, **_):
    """clip_backbone.py's ModifiedResNet (3-conv stem, Bottleneck with avgpool and a '-1','0','1'
    downsample, FrozenBN) and its AttentionPool2d."""
    sd = {}
    conv(sd, prefix + "conv1", width // 2, 3, 3, gen)
    frozen_bn(sd, prefix + "bn1", width // 2, gen)
    conv(sd, prefix + "conv2", width // 2, width // 2, 3, gen)
    frozen_bn(sd, prefix + "bn2", width // 2, gen)
    conv(sd, prefix + "conv3", width, width // 2, 3, gen)
    frozen_bn(sd, prefix + "bn3", width, gen)
    inplanes = width
    for index, blocks in enumerate(layers, start=1):
        planes, stride = width * 2 ** (index - 1), 1 if index == 1 else 2
        for b in range(blocks):
            name = f"{prefix}layer{index}.{b}"
            conv(sd, f"{name}.conv1", planes, inplanes, 1, gen)
            frozen_bn(sd, f"{name}.bn1", planes, gen)
            conv(sd, f"{name}.conv2", planes, planes, 3, gen)
            frozen_bn(sd, f"{name}.bn2", planes, gen)
            conv(sd, f"{name}.conv3", planes * 4, planes, 1, gen)
            frozen_bn(sd, f"{name}.bn3", planes * 4, gen)
            if b == 0 and (stride > 1 or inplanes != planes * 4):
                conv(sd, f"{name}.downsample.0", planes * 4, inplanes, 1, gen)
                frozen_bn(sd, f"{name}.downsample.1", planes * 4, gen)
            inplanes = planes * 4
    channels = width * 32
    sd[prefix + "attnpool.positional_embedding"] = randn(gen, grid ** 2 + 1, channels, scale=channels ** -0.5)
    for proj in ("k_proj", "q_proj", "v_proj"):
        linear(sd, f"{prefix}attnpool.{proj}", channels, channels, gen)
    linear(sd, prefix + "attnpool.c_proj", embed_dim, channels, gen)
    return sd


def lang_encoder(gen, embed_dim, text_width, text_layers, context, vocab, **_):
    """clip_backbone.py's CLIPLangEncoder under clip_rcnn.py's `lang_encoder` (no logit_scale)."""
    w, sd = text_width, {}
    for i in range(text_layers):
        b = f"lang_encoder.transformer.resblocks.{i}"
        sd[f"{b}.attn.in_proj_weight"] = randn(gen, 3 * w, w, scale=w ** -0.5)
        sd[f"{b}.attn.in_proj_bias"] = randn(gen, 3 * w, scale=0.1)
        linear(sd, f"{b}.attn.out_proj", w, w, gen)
        for ln in ("ln_1", "ln_2"):
            sd[f"{b}.{ln}.weight"] = 1 + randn(gen, w, scale=0.1)
            sd[f"{b}.{ln}.bias"] = randn(gen, w, scale=0.1)
        linear(sd, f"{b}.mlp.c_fc", 4 * w, w, gen)
        linear(sd, f"{b}.mlp.c_proj", w, 4 * w, gen)
    sd["lang_encoder.token_embedding.weight"] = randn(gen, vocab, w, scale=0.02)
    sd["lang_encoder.positional_embedding"] = randn(gen, context, w, scale=0.01)
    sd["lang_encoder.ln_final.weight"] = 1 + randn(gen, w, scale=0.1)
    sd["lang_encoder.ln_final.bias"] = randn(gen, w, scale=0.1)
    sd["lang_encoder.text_projection"] = randn(gen, w, embed_dim, scale=w ** -0.5)
    return sd


def pretrained_region_encoder(seed=0):
    """PretrainFastRCNN's state dict: student backbone, lang_encoder, frozen teacher, offline RPN."""
    gen = torch.Generator().manual_seed(seed)
    sd = modified_resnet("backbone.", gen, **TINY)
    sd.update(lang_encoder(gen, **TINY))
    sd.update(modified_resnet("teacher_backbone.", gen, **TINY))
    sd["offline_proposal_generator.rpn_head.conv.weight"] = torch.zeros(8, 8, 3, 3)
    sd["offline_backbone.bottom_up.stem.conv1.weight"] = torch.zeros(8, 3, 7, 7)
    return sd


def transferred_detector(num_classes=5, seed=0):
    """CLIPFastRCNN + CLIPRes5ROIHeads: backbone, box predictor (text-embedding classifier without bias,
    zero background embedding, class-agnostic box regression), the offline RPN and the mask head."""
    gen = torch.Generator().manual_seed(seed)
    sd = modified_resnet("backbone.", gen, **TINY)
    d = TINY["embed_dim"]
    sd["roi_heads.box_predictor.cls_score.weight"] = randn(gen, num_classes, d)
    sd["roi_heads.box_predictor.cls_bg_score.weight"] = torch.zeros(1, d)
    linear(sd, "roi_heads.box_predictor.bbox_pred", 4, d, gen)
    sd["roi_heads.mask_head.predictor.weight"] = torch.zeros(1, 8, 1, 1)
    sd["offline_proposal_generator.rpn_head.objectness_logits.weight"] = torch.zeros(3, 8, 1, 1)
    return sd


def d2_resnet50(prefix, gen, stages, norm_bookkeeping=False):
    """detectron2's ResNet-50 (BasicStem, BottleneckBlock with shortcut; conv names carry their norm)."""
    sd = {}

    def conv_norm(name, cout, cin, k):
        conv(sd, name, cout, cin, k, gen)
        frozen_bn(sd, f"{name}.norm", cout, gen)
        sd[f"{name}.norm.weight"] *= 0.5          # keep activations moderate through 16 blocks
        if norm_bookkeeping:                      # SyncBN (the LSJ RPN) counts its steps
            sd[f"{name}.norm.num_batches_tracked"] = torch.tensor(1000)

    conv_norm(prefix + "stem.conv1", 64, 3, 7)
    in_channels = 64
    for index, stage in enumerate(stages):
        bottleneck, out = 64 * 2 ** index, 256 * 2 ** index
        for b in range((3, 4, 6, 3)[index]):
            name = f"{prefix}{stage}.{b}"
            if b == 0:
                conv_norm(f"{name}.shortcut", out, in_channels, 1)
            conv_norm(f"{name}.conv1", bottleneck, in_channels, 1)
            conv_norm(f"{name}.conv2", bottleneck, bottleneck, 3)
            conv_norm(f"{name}.conv3", out, bottleneck, 1)
            in_channels = out
    return sd


def rpn_head(sd, gen, channels, anchors, convs=1):
    head = "proposal_generator.rpn_head."
    names = ["conv"] if convs == 1 else [f"conv.conv{k}" for k in range(convs)]
    for name in names:
        conv(sd, head + name, channels, channels, 3, gen)
        sd[f"{head}{name}.bias"] = randn(gen, channels, scale=0.1)
    conv(sd, head + "objectness_logits", anchors, channels, 1, gen)
    sd[head + "objectness_logits.bias"] = randn(gen, anchors, scale=0.1)
    conv(sd, head + "anchor_deltas", 4 * anchors, channels, 1, gen)
    sd[head + "anchor_deltas.weight"] *= 0.02     # boxes near their anchors, as a trained RPN's
    sd[head + "anchor_deltas.bias"] = randn(gen, 4 * anchors, scale=0.1)


def c4_rpn(seed=0):
    """rpn_coco_48's layout: GeneralizedRCNN R50-C4 (backbone res2..res4, RPN on res4, 15 anchors) with
    its Res5ROIHeads (res5, box predictor, mask head)."""
    gen = torch.Generator().manual_seed(seed)
    sd = d2_resnet50("backbone.", gen, ("res2", "res3", "res4"))
    rpn_head(sd, gen, 1024, 15)
    sd["roi_heads.res5.0.conv1.weight"] = torch.zeros(512, 1024, 1, 1)
    sd["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(49, 2048)
    return sd


def fpn_rpn(seed=0, lsj=False):
    """rpn_lvis_866's layout: GeneralizedRCNN R50-FPN (backbone.bottom_up res2..res5, fpn_lateral2..5,
    fpn_output2..5, RPN on P2..P6 with 3 anchors). lsj: rpn_lvis_866_lsj's (SyncBN everywhere, FPN
    convs normalised and without bias, two head convs)."""
    gen = torch.Generator().manual_seed(seed)
    sd = d2_resnet50("backbone.bottom_up.", gen, ("res2", "res3", "res4", "res5"), norm_bookkeeping=lsj)
    for stage, channels in zip((2, 3, 4, 5), (256, 512, 1024, 2048)):
        for kind, cin, k in (("lateral", channels, 1), ("output", 256, 3)):
            name = f"backbone.fpn_{kind}{stage}"
            conv(sd, name, 256, cin, k, gen)
            if lsj:
                frozen_bn(sd, f"{name}.norm", 256, gen)
                sd[f"{name}.norm.num_batches_tracked"] = torch.tensor(1000)
            else:
                sd[f"{name}.bias"] = randn(gen, 256, scale=0.1)
    rpn_head(sd, gen, 256, 3, convs=2 if lsj else 1)
    sd["roi_heads.box_head.fc1.weight"] = torch.zeros(1024, 12544)
    return sd


def save_reference(path, state_dict):
    torch.save({"model": state_dict, "iteration": 90000}, path)   # detectron2's Checkpointer layout
    return path


# -- direct computations with the file's tensors (the reference's forward functions) ----------------------

def bn(x, sd, name, eps=1e-5):
    scale = sd[f"{name}.weight"] * (sd[f"{name}.running_var"] + eps).rsqrt()
    shift = sd[f"{name}.bias"] - sd[f"{name}.running_mean"] * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def clip_res4(x, sd, p):
    """ModifiedResNet.forward up to res4 (its stem, then Bottlenecks: avgpool after conv2)."""
    for i in (1, 2, 3):
        x = F.relu(bn(F.conv2d(x, sd[f"{p}conv{i}.weight"], stride=2 if i == 1 else 1, padding=1), sd, f"{p}bn{i}"))
    x = F.avg_pool2d(x, 2)
    for layer in ("layer1", "layer2", "layer3"):
        x = clip_layer(x, sd, p + layer)
    return x


def clip_layer(x, sd, name):
    b = 0
    while f"{name}.{b}.conv1.weight" in sd:
        blk, stride = f"{name}.{b}", (2 if b == 0 and not name.endswith("layer1") else 1)
        out = F.relu(bn(F.conv2d(x, sd[f"{blk}.conv1.weight"]), sd, f"{blk}.bn1"))
        out = F.relu(bn(F.conv2d(out, sd[f"{blk}.conv2.weight"], padding=1), sd, f"{blk}.bn2"))
        out = F.avg_pool2d(out, stride) if stride > 1 else out
        out = bn(F.conv2d(out, sd[f"{blk}.conv3.weight"]), sd, f"{blk}.bn3")
        identity = x
        if f"{blk}.downsample.0.weight" in sd:
            identity = F.avg_pool2d(x, stride) if stride > 1 else x
            identity = bn(F.conv2d(identity, sd[f"{blk}.downsample.0.weight"]), sd, f"{blk}.downsample.1")
        x, b = F.relu(out + identity), b + 1
    return x


def attnpool(x, sd, p, heads):
    """AttentionPool2d.forward: every token queries (the mean token's output is taken)."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h * w).permute(2, 0, 1)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + sd[p + "positional_embedding"][:, None, :]
    a = p
    out, _ = F.multi_head_attention_forward(
        x, x, x, c, heads, None, torch.cat([sd[a + "q_proj.bias"], sd[a + "k_proj.bias"], sd[a + "v_proj.bias"]]),
        None, None, False, 0.0, sd[a + "c_proj.weight"], sd[a + "c_proj.bias"], training=False,
        need_weights=False, use_separate_proj_weight=True, q_proj_weight=sd[a + "q_proj.weight"],
        k_proj_weight=sd[a + "k_proj.weight"], v_proj_weight=sd[a + "v_proj.weight"])
    return out[0]


def region_features(images, boxes, sd, heads, pooler):
    """CLIPRes5ROIHeads: ROIAlignV2 (aligned, adaptive sampling) on res4 at 1/16, backbone.layer4,
    backbone.attnpool."""
    res4 = clip_res4(images, sd, "backbone.")
    pooled = roi_align(res4, boxes, output_size=pooler, spatial_scale=1 / 16, sampling_ratio=0, aligned=True)
    return attnpool(clip_layer(pooled, sd, "backbone.layer4"), sd, "backbone.attnpool.", heads)


def encode_text(tokens, sd, heads):
    """CLIPLangEncoder.encode_text: QuickGELU blocks under a causal mask, the EOT token projected."""
    p = "lang_encoder."
    x = sd[p + "token_embedding.weight"][tokens] + sd[p + "positional_embedding"]
    x = x.permute(1, 0, 2)
    length, width = x.shape[0], x.shape[2]
    mask = torch.full((length, length), float("-inf"), dtype=x.dtype).triu_(1)
    i = 0
    while f"{p}transformer.resblocks.{i}.ln_1.weight" in sd:
        b = f"{p}transformer.resblocks.{i}."
        y = F.layer_norm(x, (width,), sd[b + "ln_1.weight"], sd[b + "ln_1.bias"])
        y, _ = F.multi_head_attention_forward(y, y, y, width, heads, sd[b + "attn.in_proj_weight"],
                                              sd[b + "attn.in_proj_bias"], None, None, False, 0.0,
                                              sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"],
                                              training=False, need_weights=False, attn_mask=mask)
        x = x + y
        y = F.linear(F.layer_norm(x, (width,), sd[b + "ln_2.weight"], sd[b + "ln_2.bias"]),
                     sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"])
        x = x + F.linear(y * torch.sigmoid(1.702 * y), sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"])
        i += 1
    x = F.layer_norm(x.permute(1, 0, 2), (width,), sd[p + "ln_final.weight"], sd[p + "ln_final.bias"])
    return x[torch.arange(len(x)), tokens.argmax(dim=-1)] @ sd[p + "text_projection"]


def d2_backbone(image01, sd, prefix, stages):
    """detectron2's ResNet on a BGR 0..255 image minus PIXEL_MEAN (std 1): BasicStem (7x7, max pool),
    BottleneckBlocks with STRIDE_IN_1X1; returns {res2..}."""
    x = image01.flip(0)[None] * 255 - torch.tensor([103.530, 116.280, 123.675], dtype=image01.dtype)[:, None, None]
    x = F.relu(bn(F.conv2d(x, sd[prefix + "stem.conv1.weight"], stride=2, padding=3), sd, prefix + "stem.conv1.norm"))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    features = {}
    for index, stage in enumerate(stages):
        b = 0
        while f"{prefix}{stage}.{b}.conv1.weight" in sd:
            blk, stride = f"{prefix}{stage}.{b}", (2 if b == 0 and index > 0 else 1)
            out = F.relu(bn(F.conv2d(x, sd[f"{blk}.conv1.weight"], stride=stride), sd, f"{blk}.conv1.norm"))
            out = F.relu(bn(F.conv2d(out, sd[f"{blk}.conv2.weight"], padding=1), sd, f"{blk}.conv2.norm"))
            out = bn(F.conv2d(out, sd[f"{blk}.conv3.weight"]), sd, f"{blk}.conv3.norm")
            shortcut = x
            if f"{blk}.shortcut.weight" in sd:
                shortcut = bn(F.conv2d(x, sd[f"{blk}.shortcut.weight"], stride=stride), sd, f"{blk}.shortcut.norm")
            x, b = F.relu(out + shortcut), b + 1
        features[stage] = x
    return features


def d2_fpn(features, sd):
    """detectron2's FPN (sum fusion, nearest x2 top-down) + LastLevelMaxPool: [P2..P6]."""
    def conv_maybe_norm(x, name, padding):
        y = F.conv2d(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"), padding=padding)
        return bn(y, sd, f"{name}.norm") if f"{name}.norm.weight" in sd else y
    prev = conv_maybe_norm(features["res5"], "backbone.fpn_lateral5", 0)
    outs = [conv_maybe_norm(prev, "backbone.fpn_output5", 1)]
    for stage in (4, 3, 2):
        prev = conv_maybe_norm(features[f"res{stage}"], f"backbone.fpn_lateral{stage}", 0) + \
            F.interpolate(prev, scale_factor=2.0, mode="nearest")
        outs.insert(0, conv_maybe_norm(prev, f"backbone.fpn_output{stage}", 1))
    return outs + [F.max_pool2d(outs[-1], kernel_size=1, stride=2, padding=0)]


def d2_rpn_outputs(levels, sd, sizes_per_level, strides):
    """StandardRPNHead + DefaultAnchorGenerator + Box2BoxTransform(1, 1, 1, 1): per anchor, in
    detectron2's order (level, y, x, anchor), the objectness logit and the decoded box."""
    head = "proposal_generator.rpn_head."
    logits, boxes, per_level = [], [], []
    for feature, sizes, stride in zip(levels, sizes_per_level, strides):
        t = feature
        for name in sorted({k[len(head):].rsplit(".", 1)[0] for k in sd if k.startswith(head + "conv")}):
            t = F.relu(F.conv2d(t, sd[f"{head}{name}.weight"], sd[f"{head}{name}.bias"], padding=1))
        obj = F.conv2d(t, sd[head + "objectness_logits.weight"], sd[head + "objectness_logits.bias"])[0]
        deltas = F.conv2d(t, sd[head + "anchor_deltas.weight"], sd[head + "anchor_deltas.bias"])[0]
        a, h, w = obj.shape
        # generate_cell_anchors (size-major, w = sqrt(s^2 / r), h = r w) and _grid_anchors, in float32
        # as there (the deltas' exp() magnifies an anchor's rounding)
        cell = torch.tensor([[-math.sqrt(s * s / r) / 2, -r * math.sqrt(s * s / r) / 2,
                              math.sqrt(s * s / r) / 2, r * math.sqrt(s * s / r) / 2]
                             for s in sizes for r in (0.5, 1.0, 2.0)])
        ys, xs = torch.meshgrid(torch.arange(h) * stride, torch.arange(w) * stride, indexing="ij")
        shifts = torch.stack([xs, ys, xs, ys], dim=-1).reshape(-1, 1, 4).float()
        anchors = (shifts + cell[None]).reshape(-1, 4).double()
        d = deltas.reshape(a, 4, h, w).permute(2, 3, 0, 1).reshape(-1, 4)
        widths, heights = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
        cx, cy = anchors[:, 0] + 0.5 * widths, anchors[:, 1] + 0.5 * heights
        dw, dh = d[:, 2].clamp(max=math.log(1000.0 / 16)), d[:, 3].clamp(max=math.log(1000.0 / 16))
        px, py = d[:, 0] * widths + cx, d[:, 1] * heights + cy
        pw, ph = torch.exp(dw) * widths, torch.exp(dh) * heights
        boxes.append(torch.stack([px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph], dim=1))
        logits.append(obj.permute(1, 2, 0).reshape(-1))
        per_level.append(len(logits[-1]))
    return torch.cat(logits), torch.cat(boxes), per_level


def our_rpn_outputs(model, image):
    """Our ProposalNetwork's objectness logits and decoded boxes for every anchor (propose() without
    the filtering), at the image's own size."""
    model.transform.min_size, model.transform.max_size = (min(image.shape[-2:]),), 1333
    image_list, _ = model.transform([image])
    features = list(model._features(image_list.tensors).values())
    objectness, deltas = model.rpn.head(features)
    anchors = model.rpn.anchor_generator(image_list, features)
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    return objectness.reshape(-1), model.rpn.box_coder.decode(deltas, anchors).reshape(-1, 4)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b.to(a.dtype), rtol=tol, atol=tol)


# -- region encoder ----------------------------------------------------------------------------------------

def test_pretrained_region_encoder_computes_the_references_regions_and_text(tmp_path):
    sd = pretrained_region_encoder()
    path = save_reference(tmp_path / "regionclip_pretrained-cc_tiny.pth", sd)
    assert reference_kind(sd) == "region_encoder" and read_checkpoint_kind(path) == "clip"
    model, tokenizer = load_clip("RN50-tiny", path)
    assert model.regionclip_load_report.complete
    encoder = RegionEncoder.from_clip(model.double()).eval()
    sd64 = {k: v.double() for k, v in sd.items()}

    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    boxes = [torch.tensor([[0.0, 0.0, 128.0, 96.0], [10.5, 20.0, 70.0, 90.0]], dtype=torch.float64),
             torch.tensor([[30.0, 5.0, 120.0, 60.0]], dtype=torch.float64)]
    with torch.no_grad():
        ours = encoder(images, boxes)
        rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i), dtype=b.dtype), b], 1)
                          for i, b in enumerate(boxes)])
        direct = region_features(images, rois, sd64, TINY["heads"], pooler=2 * TINY["grid"])
        close(ours, direct)
        # The whole image at CLIP's input size: the reference's image embedding.
        native = images[:, :, :64, :64]
        close(encoder.encode_image(native), attnpool(clip_layer(clip_res4(native, sd64, "backbone."), sd64,
                                                                "backbone.layer4"), sd64, "backbone.attnpool.",
                                                     TINY["heads"]))
        tokens = tokenizer(["a photo of a kite.", "two cups"])
        close(model.encode_text(tokens), encode_text(tokens, sd64, TINY["text_heads"]))
    assert ours.abs().mean() > 0.01          # not a vacuous comparison of zeros


def test_region_encoder_refuses_a_renamed_or_reshaped_tensor_by_its_name(tmp_path):
    sd = pretrained_region_encoder()
    renamed = dict(sd)
    renamed["backbone.layer2.0.conv_2.weight"] = renamed.pop("backbone.layer2.0.conv2.weight")
    with pytest.raises(CheckpointError) as err:
        load_clip("RN50-tiny", save_reference(tmp_path / "renamed.pth", renamed))
    assert "backbone.layer2.0.conv_2.weight" in str(err.value)          # unexpected
    assert "backbone.layer2.0.conv2.weight" in str(err.value)           # missing

    reshaped = dict(sd)
    reshaped["lang_encoder.text_projection"] = torch.zeros(64, 32)
    with pytest.raises(CheckpointError, match=r"lang_encoder\.text_projection \[64, 32\] vs \[64, 64\]"):
        load_clip("RN50-tiny", save_reference(tmp_path / "reshaped.pth", reshaped))

    stray = dict(sd, **{"roi_heads.extra.weight": torch.zeros(1)})   # a module of no known kind's
    with pytest.raises(CheckpointError, match=r"roi_heads\.extra\.weight"):
        load_clip("RN50-tiny", save_reference(tmp_path / "stray.pth", stray))
    with pytest.raises(CheckpointError, match="architecture RN50-small"):   # widths of another model
        load_clip("RN50-small", save_reference(tmp_path / "tiny.pth", sd))


# -- detector -----------------------------------------------------------------------------------------------

def test_transferred_detector_computes_the_references_scores_and_deltas(tmp_path):
    sd = transferred_detector()
    path = save_reference(tmp_path / "regionclip_finetuned-coco_tiny.pth", sd)
    assert read_checkpoint_kind(path) == "detector"
    vocabulary = sd["roi_heads.box_predictor.cls_score.weight"]          # the file's own classes
    detector = build_detector("RN50-tiny", path, vocabulary).eval()

    images = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(2))
    rois = torch.tensor([[4.0, 8.0, 60.0, 90.0], [50.0, 10.0, 127.0, 70.0], [0.0, 0.0, 128.0, 96.0]])
    with torch.no_grad():
        logits, deltas = detector.head(detector.encoder.features(images), [rois])
        x = region_features(images, torch.cat([torch.zeros(3, 1), rois], 1), sd, TINY["heads"],
                            pooler=2 * TINY["grid"])
    # FastRCNNOutputLayers.forward with USE_TEXT_EMB_CLASSIFIER: cosine to each class embedding and to
    # the (zero) background embedding, over CLSS_TEMP 0.01; box deltas from the unnormalised feature.
    p = "roi_heads.box_predictor."
    x_norm = F.normalize(x, dim=1)
    scores = torch.cat([x_norm @ F.normalize(sd[p + "cls_score.weight"], dim=1).t(),
                        x_norm @ sd[p + "cls_bg_score.weight"].t()], dim=1) / 0.01
    close(logits, scores)
    close(deltas, F.linear(x, sd[p + "bbox_pred.weight"], sd[p + "bbox_pred.bias"]))
    assert deltas.abs().mean() > 0.01


def test_detector_with_a_learned_background_or_renamed_tensor_is_refused(tmp_path):
    sd = transferred_detector()
    vocabulary = sd["roi_heads.box_predictor.cls_score.weight"]
    learned = dict(sd, **{"roi_heads.box_predictor.cls_bg_score.weight": torch.ones(1, 64)})
    with pytest.raises(CheckpointError, match="cls_bg_score.weight is not zero"):
        build_detector("RN50-tiny", save_reference(tmp_path / "bg.pth", learned), vocabulary)
    renamed = dict(sd)
    renamed["roi_heads.box_predictor.box_pred.weight"] = renamed.pop("roi_heads.box_predictor.bbox_pred.weight")
    with pytest.raises(CheckpointError) as err:
        build_detector("RN50-tiny", save_reference(tmp_path / "renamed.pth", renamed), vocabulary)
    assert "roi_heads.box_predictor.box_pred.weight" in str(err.value)
    assert "roi_heads.box_predictor.bbox_pred.weight" in str(err.value)
    with pytest.raises(CheckpointError, match="not a pretrained region encoder"):
        load_clip("RN50-tiny", save_reference(tmp_path / "det.pth", sd))


# -- RPNs -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def c4_state():
    return c4_rpn()     # 18M random tensors: made once for the two tests that read them


def test_c4_rpn_computes_detectron2s_objectness_and_boxes(tmp_path, c4_state):
    sd = c4_state
    path = save_reference(tmp_path / "rpn_coco_48.pth", sd)
    assert reference_kind(sd) == "rpn_c4"
    model = load_rpn(path).double()
    assert model.config["backbone"] == "resnet50_c4" and not any(p.requires_grad for p in model.parameters())
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sd64 = {k: v.double() for k, v in sd.items()}
    with torch.no_grad():
        logits, boxes = our_rpn_outputs(model, image)
        res4 = d2_backbone(image, sd64, "backbone.", ("res2", "res3", "res4"))["res4"]
        d2_logits, d2_boxes, _ = d2_rpn_outputs([res4], sd64, [(32, 64, 128, 256, 512)], [16])
    assert len(logits) == 4 * 6 * 15
    close(logits, d2_logits)
    close(boxes, d2_boxes)
    assert logits.std() > 0.01


@pytest.mark.parametrize("lsj", [False, True], ids=["rpn_lvis_866", "rpn_lvis_866_lsj"])
def test_fpn_rpn_computes_detectron2s_objectness_boxes_and_proposals(tmp_path, lsj):
    sd = fpn_rpn(lsj=lsj)
    path = save_reference(tmp_path / "rpn_lvis_866.pth", sd)
    assert reference_kind(sd) == "rpn_fpn"
    model = load_rpn(path).double()
    assert model.config["fpn_norm"] == lsj and model.config["head_convs"] == (2 if lsj else 1)
    # 64 x 96: P6 is 1 x 2, where torchvision's own anchor generator would take stride 96 // 2 = 48.
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sd64 = {k: v.double() for k, v in sd.items()}
    with torch.no_grad():
        logits, boxes = our_rpn_outputs(model, image)
        levels = d2_fpn(d2_backbone(image, sd64, "backbone.bottom_up.", ("res2", "res3", "res4", "res5")), sd64)
        d2_logits, d2_boxes, per_level = d2_rpn_outputs(levels, sd64, [(32,), (64,), (128,), (256,), (512,)],
                                                        [4, 8, 16, 32, 64])
        close(logits, d2_logits)
        close(boxes, d2_boxes)

        # find_top_rpn_proposals: top-k per level by logit, clip, non-empty, NMS per level, top-n.
        keep, level_ids, start = [], [], 0
        for level, n in enumerate(per_level):
            top = d2_logits[start:start + n].topk(min(50, n)).indices + start
            keep.append(top)
            level_ids.append(torch.full((len(top),), level))
            start += n
        keep, level_ids = torch.cat(keep), torch.cat(level_ids)
        expected = clip_boxes_to_image(d2_boxes[keep], (64, 96))
        nonempty = (expected[:, 2] > expected[:, 0]) & (expected[:, 3] > expected[:, 1])
        kept = batched_nms(expected[nonempty], d2_logits[keep][nonempty], level_ids[nonempty], 0.7)[:20]
        ((found, scores),) = model.propose([image], min_size=64, max_size=1333, pre_nms_top_n=50,
                                           post_nms_top_n=20, nms_thresh=0.7)
    close(found, expected[nonempty][kept].float())
    close(scores, d2_logits[keep][nonempty][kept].float())


def test_rpn_with_a_renamed_or_reshaped_tensor_is_refused_by_its_name(tmp_path, c4_state):
    sd = c4_state
    renamed = dict(sd)
    renamed["backbone.res3.0.conv2.norm.running_variance"] = renamed.pop("backbone.res3.0.conv2.norm.running_var")
    with pytest.raises(CheckpointError) as err:
        load_rpn(save_reference(tmp_path / "renamed.pth", renamed))
    assert re.search(r"unexpected in the checkpoint \(1\): backbone\.res3\.0\.conv2\.norm\.running_variance$",
                     str(err.value), re.M)
    assert re.search(r"missing from the checkpoint \(1\): backbone\.res3\.0\.conv2\.norm\.running_var$",
                     str(err.value), re.M)
    nine_anchors = dict(sd)
    nine_anchors["proposal_generator.rpn_head.objectness_logits.weight"] = torch.zeros(9, 1024, 1, 1)
    with pytest.raises(CheckpointError, match=r"objectness_logits\.weight \[9, 1024, 1, 1\] vs \[15, 1024, 1, 1\]"):
        load_rpn(save_reference(tmp_path / "nine.pth", nine_anchors))


def test_load_reference_tells_the_kind_or_takes_it(tmp_path):
    path = save_reference(tmp_path / "pretrained.pth", pretrained_region_encoder())
    model, _ = load_reference(path, arch="RN50-tiny")
    assert hasattr(model, "encode_text")
    with pytest.raises(CheckpointError, match="not a transferred detector"):
        load_reference(path, "detector", arch="RN50-tiny", class_embeddings=torch.randn(3, 64))
    with pytest.raises(CheckpointError, match="not a detectron2 checkpoint"):
        torch.save({"state_dict": {"x": torch.zeros(1)}}, tmp_path / "other.pt")
        load_reference(tmp_path / "other.pt")


# -- open_clip safetensors ------------------------------------------------------------------------------------

def test_open_clip_safetensors_loads_and_computes_the_same(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(5)
    original, tokenizer = create_clip("RN50-tiny")
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(path))
    loaded, _ = load_clip("RN50-tiny", path)
    assert loaded.regionclip_load_report.format == "open_clip-safetensors"
    images = torch.randn(2, 3, 64, 64)
    tokens = tokenizer(["a kite", "a cup"])
    with torch.no_grad():
        close(loaded.encode_image(images), original.eval().encode_image(images), tol=0)
        close(loaded.encode_text(tokens), original.encode_text(tokens), tol=0)

    state = original.state_dict()
    state["visual.attnpool.cproj.weight"] = state.pop("visual.attnpool.c_proj.weight")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_clip("RN50-tiny", tmp_path / "renamed.safetensors")
    assert "visual.attnpool.cproj.weight" in str(err.value) and "visual.attnpool.c_proj.weight" in str(err.value)


# -- the evaluate stage ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_evaluate_scores_a_reference_detector_as_the_same_weights_in_our_format(write_manifest, monkeypatch,
                                                                               tmp_path):
    """evaluate.detectors: a RegionCLIP-format file and our save_detector file holding the same weights
    give the same detections and AP, beside no transfer at all."""
    import stages.resolve
    from pipeline.config import ManifestError, load_manifest
    from pipeline.layout import RunLayout
    from stages import evaluate, synth
    from tests.detection_helpers import StandInRPN, save_tiny_clip, text_embeddings, tiny_clip
    from trainer.models.detector import OpenVocabDetector, save_detector
    from trainer.models.reference_weights import DETECTOR_MAP

    manifest = write_manifest("""
synth: {num_images: 4, num_val_images: 3, min_side: 64, max_side: 96, max_objects: 3}
teacher: {arch: RN50-tiny, checkpoint: teacher.pt}
transfer: {init: []}
evaluate: {min_size: 96, max_size: 128, proposals_per_image: 48, zero_shot: [], score_threshold: 0.000001,
           detections_per_image: 10,
           detectors: {ours: ours.pt, regionclip: regionclip_finetuned-tiny.pth}}
""")
    synth.run(manifest)
    save_tiny_clip(manifest.resolve("teacher.pt"), seed=0)
    model, tokenizer = tiny_clip(seed=3)
    detector = OpenVocabDetector(model.visual, text_embeddings(model, tokenizer, ["a", "b"]), arch="RN50-tiny")
    torch.nn.init.normal_(detector.bbox_pred.weight, std=0.05)
    save_detector(detector, manifest.resolve("ours.pt"))
    reference = {DETECTOR_MAP.reference_name(k): v for k, v in detector.state_dict().items()}
    reference["roi_heads.box_predictor.cls_score.weight"] = torch.randn(48, 64)
    reference["roi_heads.box_predictor.cls_bg_score.weight"] = torch.zeros(1, 64)
    save_reference(manifest.resolve("regionclip_finetuned-tiny.pth"), reference)
    monkeypatch.setattr(stages.resolve, "load_frozen_rpn", lambda m, purpose, device="cpu": StandInRPN())

    summary = evaluate.run(manifest)["results"]
    assert set(summary["detector"]) == {"ours", "regionclip"}
    assert summary["detector"]["regionclip"] == summary["detector"]["ours"]
    layout = RunLayout.of(manifest)
    detections = [json.loads(layout.eval_detections(f"detector_{n}").read_text()) for n in ("ours", "regionclip")]
    assert detections[0] == detections[1] and len(detections[0]) > 0

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\noutput_dir: out\nevaluate: {detectors: {teacher: a.pth}}\n")
    with pytest.raises(ManifestError, match="evaluate.detectors"):
        load_manifest(bad)
