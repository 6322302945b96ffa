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

from pipeline.layout import RunLayout, shard_name
from pipeline.runner import Stage, StageRun
from pipeline.stage import fingerprint_of
from stages.resolve import teacher_from_train_teacher


def reads(manifest) -> tuple[str, ...]:
    return ("concepts", "shard") + (("train-teacher",) if teacher_from_train_teacher(manifest) else ())


def teacher_identity(run: StageRun) -> dict:
    from stages.resolve import teacher_checkpoint_path
    from trainer.offline.text_embed import TEMPLATES, checkpoint_identity

    manifest = run.manifest
    run.memo["teacher"] = {"arch": manifest.teacher.arch, "allow_partial": manifest.teacher.allow_partial,
                           **checkpoint_identity(teacher_checkpoint_path(manifest))}
    return {"teacher": run.memo["teacher"], "templates": list(TEMPLATES)}


def _parts(run: StageRun) -> tuple[str, str]:
    """(concept part fingerprint, caption part fingerprint)."""
    teacher = run.memo["teacher"]
    concept_fp = fingerprint_of("embed-concepts", {"ensemble": run.manifest.embed.ensemble,
                                                   "templates": run.settings["templates"], "teacher": teacher},
                                {"concepts": run.upstream["concepts"]["fingerprint"]})
    caption_fp = fingerprint_of("embed-captions", {"teacher": teacher}, {"shard": run.upstream["shard"]["fingerprint"]})
    return concept_fp, caption_fp


def _todo(run: StageRun) -> tuple[bool, list[int]]:
    """(concept part to do, caption shards to do)."""
    from pipeline.concepts import read_marker

    concept_fp, caption_fp = _parts(run)
    layout = run.layout
    concepts_todo = not ((run.previous or {}).get("concept_fingerprint") == concept_fp
                         and layout.concept_embeddings.exists() and layout.concepts_faiss.exists())
    captions_todo = [s for s in run.shard_ids()
                     if (read_marker(layout.caption_embeddings, s) or {}).get("fingerprint") != caption_fp]
    return concepts_todo, captions_todo


def parts_done(run: StageRun) -> bool:
    concepts_todo, captions_todo = _todo(run)
    return not concepts_todo and not captions_todo


def embed_texts(run: StageRun) -> dict:
    from pipeline.concepts import read_marker
    from pipeline.sidecars import read_concept_names, shard_captions, write_caption_embeddings
    from pipeline.stage import forget_marker, write_shard_stats
    from stages.resolve import load_teacher_clip
    from trainer.engine.device import resolve_device
    from trainer.offline.text_embed import (build_faiss_index, embed_captions,
                                            embed_names, embedding_width, write_faiss_index, write_npy)

    layout, cfg = run.layout, run.manifest.embed
    shard_ids, sidecars = run.shard_ids(), layout.caption_embeddings
    concept_fp, caption_fp = _parts(run)
    concepts_todo, captions_todo = _todo(run)
    device = resolve_device(cfg.device)
    model, tokenizer = load_teacher_clip(run.manifest, device=device)
    dim = embedding_width(model)
    print(f"embed: teacher {run.manifest.teacher.arch} (dim {dim}) on {device}; concepts "
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
    per_shard = {shard_name(s): {"status": "done", "counts": read_marker(sidecars, s)["counts"]}
                 for s in shard_ids}
    run.report = {"concepts": concepts_todo, "caption_shards": len(captions_todo)}
    return {"concept_fingerprint": concept_fp, "caption_fingerprint": caption_fp, "dim": dim,
            "num_concepts": num_concepts, "device": str(device), "shards": per_shard,
            "counts": {"concepts": num_concepts,
                       "captions": sum(v["counts"]["captions"] for v in per_shard.values())}}


def embedding_files(layout: RunLayout, manifest) -> list:
    return [layout.concept_embeddings, layout.concepts_faiss]


STAGE = Stage(
    name="embed", help="teacher text embeddings of the concepts (81 templates, FAISS index) and captions",
    reads=reads, sections=("embed",), identify=teacher_identity, outputs=embedding_files, current=parts_done,
    work=embed_texts, nothing_done={"concepts": False, "caption_shards": 0})
run = STAGE.run
