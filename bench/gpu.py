"""GPU throughput of the three heavy models at paper settings, per GPU: the RPN of `proposals`, the CLIP
teacher of `label` and the student's pretraining step.

    python bench/gpu.py                       # CUDA: RN50 / R50-FPN at 800 px, 300 boxes, bf16
    python bench/gpu.py --device cpu --tiny   # the same code on tiny models (checks the script runs)

What each figure is (random weights; throughput does not depend on them):
  - proposals: R50-FPN RPN `propose` (short side 800, long side <= 1333, 1000 per level before NMS 0.5,
    300 after) on batches of 1333x1000 images already on the device;
  - label: the RN50 teacher (trainer/offline/labels.py `Teacher.embed_pixels`, RoIAlign on res4 ->
    res5 -> attention pool) on 300 boxes per image plus the whole image, then the concept logits
    against a 6790-concept pool (CC3M's) and the pseudo-labels;
  - pretrain: the student's model step alone: region + whole-image embeddings of 100 sampled boxes
    per image, the region-concept and image-caption losses and a KL term, backward and an SGD step.
Data loading is not included: these are the rates the data path must keep up with. Decoding
throughput on the CPU side is bench/label.py's and bench/shard.py's.
Without CUDA (and without --device cpu) it says so and exits 0 without a figure.
Prints readable lines, then (last line) one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

NUM_CONCEPTS = 6790        # the paper's CC3M concept pool
TEMPERATURE = 0.01


def timed(step, warmup: int, iters: int, device: torch.device) -> float:
    """Seconds per call of `step`, after `warmup` calls, with the device synchronised."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / iters


def random_boxes(n: int, width: int, height: int, gen: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([width * 0.8, height * 0.8])
    wh = torch.rand(n, 2, generator=gen) * torch.tensor([width * 0.5, height * 0.5]) + 8
    return torch.cat([xy, (xy + wh).minimum(torch.tensor([float(width), float(height)]))], 1)


def bench_proposals(args, device, dtype) -> float:
    from trainer.models.rpn import build_rpn
    from trainer.offline.streaming import autocast

    backbone = "resnet18_fpn" if args.tiny else "resnet50_fpn"
    rpn = build_rpn(backbone, min_size=args.min_size, max_size=args.max_size).to(device).eval()
    images = [torch.rand(3, args.height, args.width, device=device) for _ in range(args.batch)]

    @torch.no_grad()
    def step():
        with autocast(device, dtype):
            rpn.propose(images, min_size=args.min_size, max_size=args.max_size, pre_nms_top_n=1000,
                        post_nms_top_n=args.boxes, nms_thresh=0.5)
    return args.batch / timed(step, args.warmup, args.iters, device)


def bench_label(args, device) -> float:
    from trainer.models.clip import create_clip, embedding_dim
    from trainer.models.geometry import resized_size
    from trainer.offline.labels import Teacher

    model, _ = create_clip(args.arch)
    dim = embedding_dim(model)
    concepts = np.random.default_rng(0).standard_normal((args.concepts, dim)).astype(np.float32)
    concepts /= np.linalg.norm(concepts, axis=1, keepdims=True)
    teacher = Teacher(model, concepts, min_size=args.min_size, max_size=args.max_size, temperature=TEMPERATURE,
                      faiss_threshold=10 ** 9, device=device, precision=args.precision)
    w, h = resized_size(args.width, args.height, args.min_size, args.max_size)
    gen = torch.Generator().manual_seed(0)
    pixels = [torch.randint(0, 255, (3, h, w), dtype=torch.uint8, generator=gen) for _ in range(args.batch)]
    if device.type == "cuda":
        pixels = [p.pin_memory() for p in pixels]
    boxes = [random_boxes(args.boxes, args.width, args.height, gen).numpy() for _ in range(args.batch)]
    sizes = [(args.width, args.height)] * args.batch

    def step():
        out = teacher.embed_pixels(pixels, sizes, boxes)
        teacher.score(torch.cat(out.regions))
    return args.batch / timed(step, args.warmup, args.iters, device)


def bench_pretrain(args, device, dtype) -> float:
    from trainer.losses import concept_logits, distillation_loss, image_caption_loss, region_concept_loss
    from trainer.models.clip import create_clip, embedding_dim
    from trainer.models.geometry import padded, resized_size
    from trainer.models.region_encoder import RegionEncoder
    from trainer.offline.streaming import autocast

    model, _ = create_clip(args.arch)
    dim = embedding_dim(model)
    student = RegionEncoder.from_clip(model).to(device).train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.002, momentum=0.9, weight_decay=1e-4)
    concepts = F.normalize(torch.randn(args.concepts, dim, device=device), dim=-1)
    w, h = resized_size(args.width, args.height, args.min_size, args.max_size)
    images = torch.randn(args.batch, 3, padded(h), padded(w), device=device)
    gen = torch.Generator().manual_seed(0)
    regions = args.pretrain_regions
    rois = torch.cat([torch.cat([torch.full((regions, 1), float(i)), random_boxes(regions, w, h, gen)], 1)
                      for i in range(args.batch)]
                     + [torch.tensor([[float(i), 0.0, 0.0, float(w), float(h)]]) for i in range(args.batch)]).to(device)
    labels = torch.randint(0, args.concepts, (args.batch * regions,), generator=gen).to(device)
    teacher_logits = torch.randn(args.batch * regions, args.concepts, generator=gen).to(device) / TEMPERATURE
    captions = F.normalize(torch.randn(args.batch, dim, device=device), dim=-1)

    def step():
        with autocast(device, dtype):
            emb = student(images, rois)
        emb = emb.float()
        region_emb, image_emb = emb[:-args.batch], emb[-args.batch:]
        s_logits = concept_logits(region_emb, concepts, TEMPERATURE)
        loss = (region_concept_loss(s_logits, labels) + distillation_loss(s_logits, teacher_logits)
                + image_caption_loss(image_emb, captions, TEMPERATURE))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return args.batch / timed(step, args.warmup, args.iters, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models and images (checks the script runs)")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--only", default="proposals,label,pretrain")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; it measures GPUs only (use --device cpu --tiny to check "
              "that the script runs). Nothing measured.")
        print(json.dumps({"cuda": False}))
        return
    tiny = args.tiny
    args.arch = "RN50-tiny" if tiny else "RN50"
    args.width, args.height = (160, 120) if tiny else (1333, 1000)
    args.min_size, args.max_size = (96, 160) if tiny else (800, 1333)
    args.boxes = 20 if tiny else 300
    args.pretrain_regions = 10 if tiny else 100
    args.concepts = 64 if tiny else NUM_CONCEPTS
    args.batch = 2 if tiny else 8
    args.warmup, args.iters = (1, 2) if tiny else (3, 10)
    if tiny:
        from trainer.models.clip import our_model_configs
        our_model_configs()     # registers the tiny configs with open_clip
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"bench/gpu.py on {name}: {args.arch}, {args.width}x{args.height} images at {args.min_size}/"
          f"{args.max_size}, {args.boxes} boxes, batch {args.batch}, {args.precision}")
    figures = {"device": name, "arch": args.arch, "precision": args.precision, "batch": args.batch,
               "boxes_per_image": args.boxes, "tiny": tiny}
    runs = {"proposals": lambda: bench_proposals(args, device, dtype),
            "label": lambda: bench_label(args, device),
            "pretrain": lambda: bench_pretrain(args, device, dtype)}
    for name in args.only.split(","):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rate = runs[name]()
        figures[f"{name}_images_per_s"] = round(rate, 2)
        line = f"{name}: {rate:.1f} images/s"
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
            figures[f"{name}_peak_gpu_memory_gib"] = round(peak, 2)
            line += f", peak GPU memory {peak:.1f} GiB"
            torch.cuda.empty_cache()
        print(line, flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
