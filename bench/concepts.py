"""Concept extraction throughput: one process vs Ray over shards, on the same captions; and the
quality of the offline (lookups) pool on the demo world's captions.

    python bench/concepts.py [--repeat 200] [--shards 8] [--num-cpus 2] [--world DIR]

The demo world (manifests/demo.yaml's synth section: 600 captions) is generated into --world if it
is not there. Throughput runs on the captions repeated --repeat times (the same text, so the figures
measure the parser, not the generator), split into --shards shard Parquet files: single = the stage's
per-shard function called in this process on each shard in turn; parallel = the same function as
Ray tasks (the stage's own path: `run_tasks(extract_shard, ...)`), including task scheduling and
each worker loading the parser once. Prints readable lines, then (last line) one JSON object.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pipeline.concepts as pc  # noqa: E402
from pipeline.config import ConceptsConfig, RayConfig, load_manifest  # noqa: E402
from pipeline.layout import StageDir, sample_key  # noqa: E402
from pipeline.ray_runtime import init_ray, run_tasks  # noqa: E402
from pipeline.sidecars import SUCCESS, read_caption_nouns, write_shard_rows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def demo_captions(world: Path) -> list[str]:
    from pipeline.synth import generate_world

    manifest = load_manifest(REPO / "manifests" / "demo.yaml")
    if not (world / "captions.tsv").exists():
        generate_world(manifest.synth, world, progress=False)
    with open(world / "captions.tsv", newline="", encoding="utf-8") as f:
        return [r["caption"] for r in csv.DictReader(f, delimiter="\t")]


def quality(captions: list[str], min_count: int) -> dict:
    from pipeline.synth import CATEGORIES, PLURALS

    parser = pc.load_parser(ConceptsConfig(parser="lookups"))
    counts, mentions, found = Counter(), 0, 0
    for caption, nouns in zip(captions, parser.extract_nouns(captions)):
        counts.update(set(nouns))
        words = set(re.findall(r"[a-z]+", caption.lower()))
        for c in CATEGORIES:
            if c in words or PLURALS[c] in words:
                mentions += 1
                found += c in nouns
    cats = set(CATEGORIES)
    pool = {r["name"] for r in pc.build_pool(counts, ConceptsConfig(min_count=min_count))}
    saved = pc.NON_OBJECT_NOUNS
    try:
        pc.NON_OBJECT_NOUNS = frozenset()
        raw = {r["name"] for r in pc.build_pool(counts, ConceptsConfig(min_count=min_count))}
    finally:
        pc.NON_OBJECT_NOUNS = saved
    print(f"quality (lookups parser, {len(captions)} demo captions, min_count {min_count}):")
    print(f"  category mentions found: {found}/{mentions}")
    print(f"  pool: {len(pool)} concepts, {len(pool & cats)}/{len(cats)} categories; "
          f"not categories: {sorted(pool - cats)}")
    print(f"  without the non-object list: {len(raw)} concepts, {len(raw & cats)} categories")
    return {"pool_precision": round(len(pool & cats) / len(pool), 4),
            "pool_recall": round(len(pool & cats) / len(cats), 4),
            "mention_recall": round(found / mentions, 4),
            "pool_precision_without_non_object_list": round(len(raw & cats) / len(raw), 4),
            "pool_size": len(pool), "min_count": min_count}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--world", type=Path, default=Path(tempfile.gettempdir()) / "regionclip-bench-world")
    args = ap.parse_args()

    captions = demo_captions(args.world)
    figures = quality(captions, load_manifest(REPO / "manifests" / "demo.yaml").concepts.min_count)

    corpus = captions * args.repeat
    per_shard = -(-len(corpus) // args.shards)
    cfg_json = json.dumps(ConceptsConfig(parser="lookups").model_dump(mode="json"), sort_keys=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = StageDir(tmp / "shards")
        for s in range(args.shards):
            chunk = corpus[s * per_shard:(s + 1) * per_shard]
            write_shard_rows(shards, s, [{"key": sample_key(s, i, 6), "caption": caption, "status": SUCCESS}
                                         for i, caption in enumerate(chunk)])
        pc._cached_parser(cfg_json)                         # parser load is not part of the loop
        started = time.perf_counter()
        for s in range(args.shards):
            pc.extract_shard(s, shards, StageDir(tmp / "single"), cfg_json, "bench")
        single = len(corpus) / (time.perf_counter() - started)

        init_ray(RayConfig(num_cpus=args.num_cpus))
        rates = []
        for run in ("cold", "warm"):    # cold: Ray starts workers, each loads the parser; warm: reused
            started = time.perf_counter()
            tasks = [(s, shards, StageDir(tmp / "parallel"), cfg_json, "bench")
                     for s in range(args.shards)]
            for _ in run_tasks(pc.extract_shard, tasks, desc=f"parallel ({run})"):
                pass
            rates.append(len(corpus) / (time.perf_counter() - started))
        parallel_cold, parallel = rates
        same = all(read_caption_nouns(StageDir(tmp / "single"), s) == read_caption_nouns(StageDir(tmp / "parallel"), s)
                   for s in range(args.shards))

    print(f"throughput on {len(corpus)} captions ({args.shards} shards, {args.num_cpus} CPUs for Ray, "
          f"{os.cpu_count()} on the machine):")
    print(f"  single process:  {single:,.0f} captions/s")
    print(f"  Ray over shards: {parallel:,.0f} captions/s (x{parallel / single:.2f}) with workers warm; "
          f"{parallel_cold:,.0f} captions/s (x{parallel_cold / single:.2f}) from a cold start")
    figures.update({"captions": len(corpus), "shards": args.shards, "ray_cpus": args.num_cpus,
                    "captions_per_s_single": round(single, 1), "captions_per_s_parallel": round(parallel, 1),
                    "captions_per_s_parallel_cold": round(parallel_cold, 1),
                    "ratio_parallel_vs_single": round(parallel / single, 3),
                    "ratio_parallel_cold_vs_single": round(parallel_cold / single, 3)})
    figures["same_output"] = same
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
