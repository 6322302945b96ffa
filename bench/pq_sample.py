"""Time to build the PQ codebook against shard size: the same photos in shards 10x larger.

    python bench/pq_sample.py --quick        # 100 photos: 10 shards of 10, then 1 shard of 100
    python bench/pq_sample.py --images 2000 --small-shard 100

The codebook is trained on a seeded sample of images drawn across all shards (trainer/offline/labels.py
plan_region_sample): only the chosen images are decoded and run through the teacher, so the time should
not depend on how many images a shard holds. Measured here, in one process: the sample's plan, the
teacher over the chosen images, and FAISS training (label.pq_train_regions regions), on runs made by
bench/_photo_run.py (1333x1000 photos, the tiny teacher at 256/384, 100 boxes per image).
A ratio large/small near 1.0 means the cost does not grow with the shard (goal <= 1.15).
Prints readable lines, then (last line) one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._photo_run import TINY, prepare, write_photos  # noqa: E402


def codebook_seconds(manifest) -> tuple[float, int, int]:
    """Seconds to plan the sample, embed it and train the PQ; images decoded; regions trained on."""
    from pipeline.layout import RunLayout
    from pipeline.stage import read_stage_manifest
    from stages.label import label_job
    from trainer.offline.codecs import codec_from_settings
    from trainer.offline.labels import plan_region_sample, sample_region_embeddings

    cfg, layout = manifest.label, RunLayout.of(manifest)
    shards = read_stage_manifest(layout.proposals)["shards"]
    started = time.perf_counter()
    counts = {int(name): entry["counts"] for name, entry in shards.items()}
    plan = plan_region_sample(counts, cfg.pq_train_regions, manifest.seed)
    sample = sample_region_embeddings(label_job(manifest, decode_threads=os.cpu_count()), plan,
                                      cfg.pq_train_regions, manifest.seed)
    codec_from_settings(cfg, sample.shape[1], sample=sample, seed=manifest.seed)
    return time.perf_counter() - started, sum(map(len, plan.values())), len(sample)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 photos, shards of 10 against 100")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--small-shard", type=int, default=20)
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=2, help="builds per shard size (the best is kept)")
    parser.add_argument("--train-regions", type=int, default=4096, help="label.pq_train_regions")
    args = parser.parse_args()
    if args.quick:
        args.images, args.small_shard = 100, 10
    from stages import proposals

    models = dataclasses.replace(TINY, min_size=256, max_size=384, boxes=100, batch_size=4)
    extra = f"label: {{codec: pq, pq_subquantizers: 16, pq_bits: 8, pq_train_regions: {args.train_regions}}}"
    load_start = os.getloadavg()
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in load_start)} ({os.cpu_count()} CPUs)", flush=True)
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-pq-") as tmp:
        photos = Path(tmp) / "photos"
        write_photos(photos, args.images, (1333, 1000))
        for name, per_shard in (("small", args.small_shard), ("large", args.small_shard * args.factor)):
            manifest = prepare(Path(tmp) / name, images=args.images, per_shard=per_shard, size=(1333, 1000),
                               models=models, photos=photos, extra=extra)
            proposals.run(manifest)
            # the best of `--repeat` builds: the first pays for loading the teacher from disk cold
            seconds, images, regions = min(codebook_seconds(manifest) for _ in range(args.repeat))
            figures[name] = {"images_per_shard": per_shard, "seconds": round(seconds, 2), "images_decoded": images,
                             "regions": regions}
            print(f"{name:5s} ({per_shard:5d} images per shard): codebook in {seconds:6.1f} s "
                  f"({images} images decoded, {regions} regions)", flush=True)
    ratio = figures["large"]["seconds"] / figures["small"]["seconds"]
    print(f"ratio large/small: {ratio:.3f} (goal <= 1.15)")
    load_end = os.getloadavg()
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in load_end)}")
    figures.update({f"ratio_{args.factor}x_shards": round(ratio, 3), "images": args.images,
                    "load_average_start": round(load_start[0], 2), "load_average_end": round(load_end[0], 2)})
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
