"""Stage `concepts`: the concept pool from the captions (no model).

1. Pass 1, one Ray task per shard: each written caption's object-noun lemmas (spaCy, batched
   `nlp.pipe`) -> `concepts/captions/NNNNN.parquet` (key, nouns). Redone only when the parser changes.
2. Counts over the corpus (captions naming each lemma) -> the pool: count >= concepts.min_count,
   non-object nouns dropped, at most max_concepts (or the names of concepts.pool_file, in order),
   the user vocabulary merged in -> `concepts/concepts.parquet` (concept_id, name, count, source).
3. Pass 2: each caption's pool concept ids added to its sidecar (concept_ids).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.layout import RunLayout, shard_name
from pipeline.ray_runtime import init_ray, run_tasks
from pipeline.runner import Stage, StageRun
from pipeline.stage import fingerprint_of


def parser_and_vocabulary(run: StageRun) -> dict:
    from pipeline.concepts import load_parser, read_pool_file, read_vocabulary

    cfg = run.manifest.concepts
    base = Path(run.manifest.source_path).parent if run.manifest.source_path else None
    vocab = run.memo["vocabulary"] = read_vocabulary(cfg.vocabulary, base) if cfg.vocabulary else None
    pool = run.memo["pool"] = read_pool_file(run.manifest.resolve(cfg.pool_file)) if cfg.pool_file else None
    parser = run.memo["parser"] = load_parser(cfg)
    identity = {"parser": parser.identity, "vocabulary_names": vocab.names if vocab else []}
    if pool is not None:       # the file's names, not its path: editing it rebuilds the pool
        identity["pool_names"] = pool
    return identity


def sidecars_done(run: StageRun) -> bool:
    return _to_assign(run) == []


def _to_assign(run: StageRun) -> list[int]:
    from pipeline.concepts import read_marker

    sidecars = run.layout.caption_concepts
    return [s for s in run.shard_ids() if (read_marker(sidecars, s) or {}).get("fingerprint") != run.fingerprint]


def build_concepts(run: StageRun) -> dict:
    from pipeline.concepts import (ConceptMatcher, assign_shard, build_pool, caption_counts, count_phrases,
                                   extract_shard, normalize_concept, read_marker, stopword_set)
    from pipeline.sidecars import shard_captions, write_concept_pool

    layout, cfg = run.layout, run.manifest.concepts
    shard_ids, sidecars = run.shard_ids(), layout.caption_concepts
    parser, vocab, given_pool = run.memo["parser"], run.memo["vocabulary"], run.memo["pool"]
    extract_fp = fingerprint_of("concepts-extract", {"parser": parser.identity,
                                                     "shards": run.upstream["shard"]["fingerprint"]}, {})
    to_extract = [s for s in shard_ids if (read_marker(sidecars, s) or {}).get("extract_fingerprint") != extract_fp]
    print(f"concepts: parser {parser.kind}; {len(shard_ids)} shards ({len(to_extract)} to parse)")
    if to_extract:
        init_ray(run.manifest.ray)
        cfg_json = json.dumps(run.manifest.section_dict("concepts"), sort_keys=True)
        tasks = [(s, layout.shards, sidecars, cfg_json, extract_fp) for s in to_extract]
        for _ in run_tasks(extract_shard, tasks, desc="concepts: parse"):
            pass

    # The pool, from the counts over every shard.
    started = time.time()
    counts = caption_counts(sidecars, shard_ids)
    named = [*(given_pool or ()), *(vocab.names if vocab else ())]     # names that may have several words
    phrase_counts = (count_phrases(named, (c for s in shard_ids for c in shard_captions(layout.shards, s)[1]))
                     if any(" " in normalize_concept(n) for n in named) else None)
    pool = build_pool(counts, cfg, vocab.names if vocab else (), phrase_counts, pool=given_pool)
    write_concept_pool(layout.concepts_parquet, pool)

    matcher = ConceptMatcher([r["name"] for r in pool])
    to_assign = _to_assign(run)
    for s in to_assign:
        assign_shard(s, sidecars, matcher, run.fingerprint, extract_fp, layout.shards)
    per_shard = {s: read_marker(sidecars, s) for s in shard_ids}
    totals = {"captions": sum(m["counts"]["captions"] for m in per_shard.values()),
              "with_concepts": sum(m["counts"]["with_concepts"] for m in per_shard.values()),
              "distinct_nouns": len(counts), "concepts": len(pool),
              "from_vocabulary": sum(r["source"] == "vocabulary" for r in pool),
              "dropped_as_non_object": sum(1 for n in counts if n in stopword_set(cfg))}
    origin = f"from {cfg.pool_file}" if given_pool is not None else f"min_count {cfg.min_count}"
    print(f"concepts: {totals['distinct_nouns']} distinct nouns -> {len(pool)} concepts "
          f"({origin}); {totals['with_concepts']}/{totals['captions']} captions name one "
          f"({time.time() - started:.1f}s)")
    run.report = {"extracted": len(to_extract), "assigned": len(to_assign), "pool": True}
    return {"counts": totals, "parser": parser.identity, "extract_fingerprint": extract_fp,
            "shards": {shard_name(s): {"status": "done", "counts": m["counts"]} for s, m in per_shard.items()},
            "captions": str(sidecars.root)}


def pool_file(layout: RunLayout, manifest) -> list:
    return [layout.concepts_parquet]


STAGE = Stage(
    name="concepts", help="concept pool (object nouns of the captions) + each caption's concept ids",
    reads=("shard",), sections=("concepts",), identify=parser_and_vocabulary, outputs=pool_file,
    current=sidecars_done, work=build_concepts, nothing_done={"extracted": 0, "assigned": 0, "pool": False})
run = STAGE.run
