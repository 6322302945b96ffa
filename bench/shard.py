"""Shard stage throughput against a plain one-process PIL decode-resize-encode loop on the same files.

    python bench/shard.py [--images 400] [--side 1600] [--max-side 640]

Prints readable lines, then (last line) one JSON object of figures.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_manifest  # noqa: E402
from pipeline.images import encode_jpeg, resize_max_side  # noqa: E402
from stages import shard  # noqa: E402


def make_corpus(folder: Path, n: int, side: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = (rng.random((side * 3 // 4, side, 3)) * 255).astype(np.uint8)
    paths = []
    for i in range(n):
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(np.roll(base, i * 7, axis=1)).save(path, quality=90)
        path.with_suffix(".txt").write_text(f"a photo of {i} apples")
        paths.append(path)
    return paths


def plain_loop(paths: list[Path], max_side: int) -> float:
    started = time.perf_counter()
    for path in paths:
        img = Image.open(io.BytesIO(path.read_bytes())).convert("RGB")
        encode_jpeg(resize_max_side(img, max_side), 95)
        path.with_suffix(".txt").read_text()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--side", type=int, default=1600, help="width of the synthetic input images")
    parser.add_argument("--max-side", type=int, default=640, help="shard.max_side (forces a resize)")
    parser.add_argument("--per-shard", type=int, default=50)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_corpus(tmp / "corpus", args.images, args.side)
        plain_s = plain_loop(paths, args.max_side)
        manifest = tmp / "bench.yaml"
        manifest.write_text(f"name: bench\noutput_dir: {tmp / 'out'}\n"
                            f"corpus: {{format: folder, path: {tmp / 'corpus'}}}\n"
                            f"shard: {{samples_per_shard: {args.per_shard}, max_side: {args.max_side}}}\n")
        import ray

        ray.init(include_dashboard=False, log_to_driver=False)  # started outside the timed region
        started = time.perf_counter()
        shard.run(load_manifest(manifest))
        stage_s = time.perf_counter() - started
        ray.shutdown()
    figures = {
        "images": args.images,
        "cpus": os.cpu_count(),
        "plain_loop_images_per_s": round(args.images / plain_s, 2),
        "shard_stage_images_per_s": round(args.images / stage_s, 2),
        "ratio_stage_vs_plain_loop": round(plain_s / stage_s, 3),
    }
    print(f"plain PIL loop, one process: {figures['plain_loop_images_per_s']} images/s")
    print(f"shard stage (Ray, {os.cpu_count()} CPUs, with checks, Parquet, tar): "
          f"{figures['shard_stage_images_per_s']} images/s")
    print(f"ratio stage / plain loop: {figures['ratio_stage_vs_plain_loop']}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
