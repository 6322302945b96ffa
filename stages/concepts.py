"""Stage `concepts`: the concept pool from the captions (no model).

1. Pass 1, one Ray task per shard: each written caption's object-noun lemmas (spaCy, batched
   `nlp.pipe`) -> `concepts/captions/NNNNN.parquet` (key, nouns). Redone only when the parser changes.
2. Counts over the corpus (captions naming each lemma) -> the pool: count >= concepts.min_count,
   non-object nouns dropped, at most max_concepts, the user vocabulary merged in
   -> `concepts/concepts.parquet` (concept_id, name, count, source).
3. Pass 2: each caption's pool concept ids added to its sidecar (concept_ids).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.concepts import (ConceptMatcher, assign_shard, build_pool, caption_counts, count_phrases,
                               extract_shard, load_parser, read_marker, read_vocabulary, stopword_set)
from pipeline.config import RunManifest
from pipeline.layout import RunLayout
from pipeline.ray_runtime import init_ray, run_tasks
from pipeline.sidecars import shard_captions, write_concept_pool
from pipeline.stage import StageState, fingerprint_of, read_stage_manifest, require_complete

STAGE = "concepts"


def shard_ids_of(shard_manifest: dict) -> list[int]:
    return sorted(int(s) for s in shard_manifest.get("shards", {}))


def run(manifest: RunManifest) -> dict:
    layout = RunLayout.of(manifest)
    cfg = manifest.concepts
    shards = require_complete("shard", layout.shards)
    shard_ids = shard_ids_of(shards)
    sidecars = layout.caption_concepts
    base = Path(manifest.source_path).parent if manifest.source_path else None
    vocab = read_vocabulary(cfg.vocabulary, base) if cfg.vocabulary else None

    parser = load_parser(cfg)
    extract = {"parser": parser.identity, "shards": shards["fingerprint"]}
    extract_fp = fingerprint_of("concepts-extract", extract, {})
    settings = {k: v for k, v in manifest.section_dict("concepts").items() if k != "batch_size"}
    settings.update(parser=parser.identity, vocabulary_names=vocab.names if vocab else [])
    state = StageState.open(STAGE, layout.stage(STAGE), settings, {"shard": shards["fingerprint"]})
    previous = read_stage_manifest(state.stage_dir)
    if (previous and previous.get("fingerprint") == state.fingerprint and previous.get("status") == "done"
            and layout.concepts_parquet.exists() and _pending(sidecars, shard_ids, state.fingerprint) == []):
        print(f"concepts: up to date ({previous['counts'].get('concepts')} concepts, {len(shard_ids)} shards)")
        return {**previous, "work": {"extracted": 0, "assigned": 0, "pool": False}}

    state.clean_temporaries()
    to_extract = [s for s in shard_ids if (read_marker(sidecars, s) or {}).get("extract_fingerprint") != extract_fp]
    print(f"concepts: parser {parser.kind}; {len(shard_ids)} shards ({len(to_extract)} to parse)")
    if to_extract:
        init_ray(manifest.ray)
        cfg_json = json.dumps(manifest.section_dict("concepts"), sort_keys=True)
        tasks = [(s, layout.shards, sidecars, cfg_json, extract_fp) for s in to_extract]
        for _ in run_tasks(extract_shard, tasks, desc="concepts: parse"):
            pass

    # The pool, from the counts over every shard.
    started = time.time()
    counts = caption_counts(sidecars, shard_ids)
    phrase_counts = (count_phrases(vocab.names, (c for s in shard_ids
                                                 for c in shard_captions(layout.shards, s)[1]))
                     if vocab else None)
    pool = build_pool(counts, cfg, vocab.names if vocab else (), phrase_counts)
    write_concept_pool(layout.concepts_parquet, pool)

    matcher = ConceptMatcher([r["name"] for r in pool])
    to_assign = _pending(sidecars, shard_ids, state.fingerprint)
    for s in to_assign:
        assign_shard(s, sidecars, matcher, state.fingerprint, extract_fp, layout.shards)
    per_shard = {s: read_marker(sidecars, s) for s in shard_ids}
    totals = {"captions": sum(m["counts"]["captions"] for m in per_shard.values()),
              "with_concepts": sum(m["counts"]["with_concepts"] for m in per_shard.values()),
              "distinct_nouns": len(counts), "concepts": len(pool),
              "from_vocabulary": sum(r["source"] == "vocabulary" for r in pool),
              "dropped_as_non_object": sum(1 for n in counts if n in stopword_set(cfg))}
    print(f"concepts: {totals['distinct_nouns']} distinct nouns -> {len(pool)} concepts "
          f"(min_count {cfg.min_count}); {totals['with_concepts']}/{totals['captions']} captions name one "
          f"({time.time() - started:.1f}s)")
    result = state.finish([], outputs=[layout.concepts_parquet], extra={
        "counts": totals, "parser": parser.identity, "extract_fingerprint": extract_fp,
        "shards": {f"{s:05d}": {"status": "done", "counts": m["counts"]} for s, m in per_shard.items()},
        "captions": str(sidecars.root)})
    return {**result, "work": {"extracted": len(to_extract), "assigned": len(to_assign), "pool": True}}


def _pending(sidecars, shard_ids: list[int], fingerprint: str) -> list[int]:
    return [s for s in shard_ids if (read_marker(sidecars, s) or {}).get("fingerprint") != fingerprint]


if __name__ == "__main__":
    from stages.cli import stage_main

    stage_main(STAGE)
