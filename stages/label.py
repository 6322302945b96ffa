"""Stage `label`: the CLIP teacher's pseudo-labels and distillation targets for every proposal (REFERENCE §3).

1. Checks: proposals and embed are done; the teacher's width equals the concept embeddings'.
2. The codec (label.codec): `pq` trains a FAISS product quantizer once on a seeded sample of region
   embeddings from the first shards (a Ray task, on a GPU when there is one) and saves it; reruns
   and resumed runs reuse the saved codebook, whose checksum is part of the stage's fingerprint.
3. Ray Data actor pool holding the teacher: per shard, region + whole-image embeddings, concept
   logits cos/T, pseudo-label and probability, codes (and the flipped image's with store_flipped)
   -> labels/NNNNN.parquet, then the shard's marker.
4. Optionally a FAISS index over all region embeddings (label.region_index) for search.
See docs/label.md.
"""
from __future__ import annotations


from pipeline.config import RunManifest
from pipeline.io import file_record
from pipeline.layout import RunLayout
from pipeline.ray_runtime import actor_cpus, cluster_gpus, init_ray, map_with_actor_pool, run_tasks
from pipeline.stage import StageState, fingerprint_of, require_complete
from stages.resolve import load_model_ref
from trainer.models.clip import check_embedding_dim, embedding_dim
from trainer.offline.codecs import codec_from_settings, read_codec_description
from trainer.offline.region_index import write_region_index
from trainer.offline.labels import LabelJob, LabelShardWorker, plan_region_sample, sample_region_embeddings
from trainer.offline.text_embed import load_concept_embeddings

STAGE = "label"
RUNTIME_ONLY = ("num_gpus_per_actor", "num_actors", "region_index", "keep_threshold", "cpus_per_actor")


def run(manifest: RunManifest) -> dict:
    layout = RunLayout.of(manifest)
    cfg = manifest.label
    proposals = require_complete("proposals", layout.proposals)
    embed = require_complete("embed", layout.stage("embed"))
    shard_ids = sorted(int(s) for s in proposals["shards"])
    concepts = load_concept_embeddings(layout)
    model, _ = load_model_ref(manifest.teacher, manifest, fallback=layout.teacher_checkpoint)
    dim = embedding_dim(model)
    check_embedding_dim(dim, concepts.shape[1], "concept embeddings", manifest.teacher.arch)
    del model
    checkpoint = manifest.resolve(manifest.teacher.checkpoint) or layout.teacher_checkpoint
    teacher = {"arch": manifest.teacher.arch, "sha256": file_record(checkpoint)["sha256"]}
    scale = teacher_scale(manifest)
    job = LabelJob(run_root=str(layout.root), teacher_arch=manifest.teacher.arch, teacher_checkpoint=str(checkpoint),
                   teacher_allow_partial=manifest.teacher.allow_partial,
                   concept_embeddings=str(layout.concept_embeddings), codec_json=str(layout.labels_codec),
                   min_size=scale["min_size"], max_size=scale["max_size"], temperature=cfg.temperature,
                   faiss_threshold=cfg.faiss_threshold, batch_size=cfg.batch_size, store_flipped=cfg.store_flipped,
                   fingerprint="", precision=cfg.precision)
    init_ray(manifest.ray)
    job.decode_threads = actor_cpus(cfg.cpus_per_actor)
    codec = ensure_codec(manifest, layout, job, dim, concepts, teacher, proposals, shard_ids)

    settings = {k: v for k, v in manifest.section_dict(STAGE).items() if k not in RUNTIME_ONLY}
    settings.update(teacher=teacher, scale=scale, codec=codec["fingerprint"],
                    concept_embeddings=file_record(layout.concept_embeddings)["sha256"])
    state = StageState.open(STAGE, layout.labels, settings,
                            {"proposals": proposals["fingerprint"], "embed": embed["fingerprint"]})
    job.fingerprint = state.fingerprint
    pending, nodes = state.start_pending(shard_ids), set()
    if pending:
        state.clean_temporaries()
        print(f"label: {len(shard_ids)} shards ({len(pending)} to do), teacher {teacher['arch']}, "
              f"codec {codec['codec']} ({codec['code_size']} bytes/region)")
        for row in map_with_actor_pool(LabelShardWorker, [{"shard": s} for s in pending], constructor_args=(job,),
                                     num_gpus_per_actor=cfg.num_gpus_per_actor, num_actors=cfg.num_actors,
                                     cpus_per_actor=job.decode_threads, desc="label"):
            nodes.add(str(row["node"]))
    else:
        print(f"label: up to date ({len(shard_ids)} shards)")
    outputs = [layout.labels_codec]
    if cfg.region_index:
        outputs += write_region_index(layout, shard_ids)
    return state.finish(shard_ids, outputs=outputs, extra={"codec": codec, "ray_nodes": sorted(nodes)})


def ensure_codec(manifest, layout, job, dim, concepts, teacher, proposals, shard_ids) -> dict:
    """The saved codec if it was built from the same inputs, else a new one (PQ: trained on a sample)."""
    cfg = manifest.label
    params = {"codec": cfg.codec, "dim": dim, "seed": manifest.seed}
    if cfg.codec == "pq":
        params.update(subquantizers=cfg.pq_subquantizers, bits=cfg.pq_bits, train_regions=cfg.pq_train_regions,
                      teacher=teacher, proposals=proposals["fingerprint"], batch_size=cfg.batch_size,
                      min_size=job.min_size, max_size=job.max_size, precision=cfg.precision,
                      sample="images drawn across all shards")
    elif cfg.codec == "topk":
        params.update(k=cfg.topk, temperature=cfg.temperature,
                      concepts=file_record(layout.concept_embeddings)["sha256"])
    build_key = fingerprint_of("label-codec", params, {})
    saved = read_codec_description(layout.labels.root)
    if saved and saved.get("build_key") == build_key and all(
            (layout.labels.root / name).is_file() for name in saved.get("sha256", {})):
        return saved
    sample = None
    if cfg.codec == "pq":
        counts = {s: proposals["shards"][f"{s:05d}"]["counts"] for s in shard_ids}
        plan = plan_region_sample(counts, cfg.pq_train_regions, manifest.seed)
        print(f"label: training the PQ codebook ({cfg.pq_subquantizers}x{cfg.pq_bits} bits) on up to "
              f"{cfg.pq_train_regions} regions of {sum(map(len, plan.values()))} images drawn from "
              f"{len(plan)} shard(s)")
        gpus = cfg.num_gpus_per_actor if cluster_gpus() > 0 else 0
        sample = next(run_tasks(sample_region_embeddings, [(job, plan, cfg.pq_train_regions, manifest.seed)],
                                num_cpus=job.decode_threads, num_gpus=gpus, desc="label: PQ sample"))
    codec = codec_from_settings(cfg, dim, concept_embeddings=concepts, sample=sample, seed=manifest.seed)
    return codec.save(layout.labels_codec, extra={"build_key": build_key, "build": params,
                                                  "train_regions": None if sample is None else len(sample)})


def teacher_scale(manifest: RunManifest) -> dict:
    """The teacher's input scale: label.min_size / max_size, each defaulting to the proposals' scale."""
    return {"min_size": manifest.label.min_size or manifest.proposals.min_size,
            "max_size": manifest.label.max_size or manifest.proposals.max_size}


if __name__ == "__main__":
    from stages.cli import stage_main

    stage_main(STAGE)
