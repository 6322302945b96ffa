"""Stage `embed`: the teacher's text encoder over the concept pool and the captions.

- every concept through the 81 prompt templates, ensembled (`embed.ensemble`), L2-normalized
  -> `concepts/concept_embeddings.npy` (float32 [num_concepts, D]) and `concepts/concepts.faiss`;
- every written caption's end-of-text embedding -> `concepts/caption_embeddings/NNNNN.parquet`
  (key, embedding: fp16, L2-normalized), one file per shard.
The two parts have their own fingerprints: the concept part depends on the pool, the teacher and the
ensemble mode; the caption part on the shards and the teacher only.
"""
from __future__ import annotations

import time

from pipeline.concepts import read_marker
from pipeline.config import RunManifest
from pipeline.layout import RunLayout
from pipeline.sidecars import read_concept_names, shard_captions, write_caption_embeddings
from pipeline.stage import (StageState, fingerprint_of, forget_marker, read_stage_manifest,
                            require_complete, write_shard_stats)
from stages.resolve import load_teacher_clip, teacher_checkpoint_path
from trainer.engine.device import resolve_device
from trainer.offline.text_embed import (TEMPLATES, build_faiss_index, checkpoint_identity,
                                        embed_captions, embed_names, embedding_width, write_faiss_index, write_npy)

STAGE = "embed"


def run(manifest: RunManifest) -> dict:
    layout = RunLayout.of(manifest)
    cfg = manifest.embed
    concepts = require_complete("concepts", layout.stage("concepts"))
    shards = require_complete("shard", layout.shards)
    shard_ids = sorted(int(s) for s in shards.get("shards", {}))
    checkpoint = teacher_checkpoint_path(manifest)
    teacher = {"arch": manifest.teacher.arch, "allow_partial": manifest.teacher.allow_partial,
               **checkpoint_identity(checkpoint)}
    concept_fp = fingerprint_of("embed-concepts", {"ensemble": cfg.ensemble, "templates": list(TEMPLATES),
                                                   "teacher": teacher}, {"concepts": concepts["fingerprint"]})
    caption_fp = fingerprint_of("embed-captions", {"teacher": teacher}, {"shard": shards["fingerprint"]})
    state = StageState.open(STAGE, layout.stage(STAGE), {"ensemble": cfg.ensemble, "teacher": teacher},
                            {"concepts": concepts["fingerprint"], "shard": shards["fingerprint"]})
    sidecars = layout.caption_embeddings
    previous = read_stage_manifest(state.stage_dir) or {}
    concepts_todo = not (previous.get("concept_fingerprint") == concept_fp
                         and layout.concept_embeddings.exists() and layout.concepts_faiss.exists())
    captions_todo = [s for s in shard_ids if (read_marker(sidecars, s) or {}).get("fingerprint") != caption_fp]
    if not concepts_todo and not captions_todo and previous.get("fingerprint") == state.fingerprint:
        print(f"embed: up to date ({previous.get('num_concepts')} concepts, {len(shard_ids)} shards)")
        return {**previous, "work": {"concepts": False, "caption_shards": 0}}

    state.clean_temporaries()
    device = resolve_device(cfg.device)
    model, tokenizer = load_teacher_clip(manifest, device=device)
    dim = embedding_width(model)
    print(f"embed: teacher {manifest.teacher.arch} (dim {dim}) on {device}; concepts "
          f"{'to embed' if concepts_todo else 'up to date'}, {len(captions_todo)}/{len(shard_ids)} caption shards")
    if concepts_todo:
        names = read_concept_names(layout.concepts_parquet)
        emb = embed_names(model, tokenizer, names, cfg.ensemble, batch_size=cfg.batch_size, device=device)
        write_npy(layout.concept_embeddings, emb)
        write_faiss_index(build_faiss_index(emb), layout.concepts_faiss)
    for s in captions_todo:
        started = time.time()
        keys, captions = shard_captions(layout.shards, s)
        emb = embed_captions(model, tokenizer, captions, batch_size=cfg.batch_size, device=device,
                             progress=True)
        forget_marker(sidecars, s)
        path = write_caption_embeddings(sidecars, s, keys, emb.reshape(len(keys), dim))
        write_shard_stats(sidecars, s, caption_fp, {"captions": len(keys)}, [path],
                          seconds=round(time.time() - started, 3))
    num_concepts = len(read_concept_names(layout.concepts_parquet))
    per_shard = {f"{s:05d}": {"status": "done", "counts": read_marker(sidecars, s)["counts"]}
                 for s in shard_ids}
    result = state.finish([], outputs=[layout.concept_embeddings, layout.concepts_faiss], extra={
        "concept_fingerprint": concept_fp, "caption_fingerprint": caption_fp, "dim": dim,
        "num_concepts": num_concepts, "device": str(device), "shards": per_shard,
        "counts": {"concepts": num_concepts,
                   "captions": sum(v["counts"]["captions"] for v in per_shard.values())}})
    return {**result, "work": {"concepts": concepts_todo, "caption_shards": len(captions_todo)}}


if __name__ == "__main__":
    from stages.cli import stage_main

    stage_main(STAGE)
