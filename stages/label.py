"""Stage `label`: the CLIP teacher's pseudo-labels and distillation targets for every proposal (docs/method.md §3).

1. Checks: proposals and embed are done; the teacher's width equals the concept embeddings'.
2. The codec (label.codec): `pq` trains a FAISS product quantizer once on a seeded sample of region
   embeddings from the first shards (a Ray task, on a GPU when there is one) and saves it; reruns
   and resumed runs reuse the saved codebook. The shards' markers carry its checksum, so a codebook
   trained anew (its files lost) redoes every shard coded with the old one.
3. Ray Data actor pool holding the teacher: per shard, region + whole-image embeddings, concept
   logits cos/T, pseudo-label and probability, codes (and the flipped image's with store_flipped)
   -> labels/NNNNN.parquet, then the shard's marker.
4. Optionally a FAISS index over all region embeddings (label.region_index) for search.
See docs/label.md.
"""
from __future__ import annotations

from pipeline.layout import RunLayout, UnsafeName, inside, shard_name
from pipeline.runner import Stage, StageRun
from pipeline.stage import fingerprint_of
from stages.resolve import teacher_from_train_teacher, teacher_scale


def reads(manifest) -> tuple[str, ...]:
    return ("proposals", "embed") + (("train-teacher",) if teacher_from_train_teacher(manifest) else ())


def teacher_and_codec(run: StageRun) -> dict:
    """The teacher (checked against the concept embeddings' width), its scale, and the codec's build
    settings. Loads the teacher once, before anything is written."""
    from pipeline.io import sha256_file
    from stages.resolve import actor_precision, load_model_ref
    from trainer.models.clip import check_embedding_dim, embedding_dim
    from trainer.offline.text_embed import load_concept_embeddings

    manifest, layout, cfg = run.manifest, run.layout, run.manifest.label
    concepts = run.memo["concepts"] = load_concept_embeddings(layout)
    model, _ = load_model_ref(manifest.teacher, manifest, fallback=layout.teacher_checkpoint)
    dim = run.memo["dim"] = embedding_dim(model)
    check_embedding_dim(dim, concepts.shape[1], "concept embeddings", manifest.teacher.arch)
    del model
    checkpoint = manifest.resolve(manifest.teacher.checkpoint) or layout.teacher_checkpoint
    teacher = {"arch": manifest.teacher.arch, "sha256": sha256_file(checkpoint)}
    scale = teacher_scale(manifest)
    # `precision` as the actors will run it (auto: bf16 on GPUs, fp32 on CPUs), in place of the setting.
    precision = run.memo["precision"] = actor_precision(manifest, "label")
    codec = {"codec": cfg.codec, "dim": dim, "seed": manifest.seed}
    if cfg.codec == "pq":
        codec.update(subquantizers=cfg.pq_subquantizers, bits=cfg.pq_bits, train_regions=cfg.pq_train_regions,
                     teacher=teacher, proposals=run.upstream["proposals"]["fingerprint"],
                     batch_size=cfg.batch_size, precision=precision, sample="images drawn across all shards",
                     **scale)
    elif cfg.codec == "topk":
        codec.update(k=cfg.topk, temperature=cfg.temperature,
                     concepts=sha256_file(layout.concept_embeddings))
    return {"teacher": teacher, "scale": scale, "codec": codec,
            "concept_embeddings": sha256_file(layout.concept_embeddings),
            "label": {**run.settings["label"], "precision": precision}}


def marker_fingerprint(run: StageRun, codec: dict) -> str:
    """What a shard's marker carries: the stage's fingerprint and the codebook its codes are in."""
    return fingerprint_of("label-shards", {"codec": codec["fingerprint"]}, {"label": run.fingerprint})


def shards_done(run: StageRun) -> bool:
    from trainer.offline.codecs import read_codec_description

    codec = read_codec_description(run.layout.labels.root)
    if not codec or codec.get("build_key") != _build_key(run):
        return False
    return not run.markers(fingerprint=marker_fingerprint(run, codec)).pending(run.shard_ids("proposals"))


def _build_key(run: StageRun) -> str:
    return fingerprint_of("label-codec", run.settings["codec"], {})


def label_job(manifest, decode_threads: int = 1, precision: str | None = None) -> "LabelJob":  # noqa: F821
    """What a label worker needs, from the manifest (the marker fingerprint is set once the codec is known;
    `precision`: the resolved one the stage fingerprinted, default the section's)."""
    from trainer.offline.labels import LabelJob

    layout, cfg, scale = RunLayout.of(manifest), manifest.label, teacher_scale(manifest)
    checkpoint = manifest.resolve(manifest.teacher.checkpoint) or layout.teacher_checkpoint
    return LabelJob(run_root=str(layout.root), teacher_arch=manifest.teacher.arch,
                    teacher_checkpoint=str(checkpoint), teacher_allow_partial=manifest.teacher.allow_partial,
                    teacher_trust_torchscript=manifest.teacher.trust_torchscript,
                    concept_embeddings=str(layout.concept_embeddings), codec_json=str(layout.labels_codec),
                    min_size=scale["min_size"], max_size=scale["max_size"], temperature=cfg.temperature,
                    faiss_threshold=cfg.faiss_threshold, batch_size=cfg.batch_size,
                    store_flipped=cfg.store_flipped, fingerprint="", precision=precision or cfg.precision,
                    decode_threads=decode_threads)


def label(run: StageRun) -> dict:
    from pipeline.ray_runtime import init_ray, map_with_actor_pool, plan_actor_pool
    from trainer.offline.labels import LabelShardWorker
    from trainer.offline.region_index import write_region_index

    manifest, layout, cfg = run.manifest, run.layout, run.manifest.label
    shard_ids = run.shard_ids("proposals")
    init_ray(manifest.ray)
    plan = plan_actor_pool("label", cfg, manifest.ray)
    job = label_job(manifest, decode_threads=plan.decode_threads, precision=run.memo["precision"])
    codec = ensure_codec(run, job, shard_ids, plan)
    markers = run.markers(fingerprint=marker_fingerprint(run, codec))
    job.fingerprint = markers.fingerprint
    pending, nodes = markers.start_pending(shard_ids), set()
    if pending:
        print(f"label: {len(shard_ids)} shards ({len(pending)} to do), teacher {manifest.teacher.arch}, "
              f"codec {codec['codec']} ({codec['code_size']} bytes/region)")
        for row in map_with_actor_pool(LabelShardWorker, [{"shard": s} for s in pending], plan,
                                       constructor_args=(job,), desc="label"):
            nodes.add(str(row["node"]))
    else:
        print(f"label: every shard done ({len(shard_ids)} shards)")
    if cfg.region_index:
        write_region_index(layout, shard_ids)
    return {**markers.summary(shard_ids), "codec": codec, "ray_nodes": sorted(nodes)}


def _files_inside(folder, names) -> bool:
    """Whether every file that codec.json names is in place inside the labels folder."""
    try:
        return all(inside(folder, name).is_file() for name in names)
    except UnsafeName:
        return False


def ensure_codec(run: StageRun, job, shard_ids: list[int], actors) -> dict:
    """The saved codec if it was built from the same settings, else a new one (PQ: trained on a sample by
    one task of the shape of a label actor, `actors`: plan_actor_pool)."""
    from pipeline.ray_runtime import model_process_env, on_assigned_device, run_tasks
    from trainer.offline.codecs import codec_from_settings, read_codec_description
    from trainer.offline.labels import plan_region_sample, sample_region_embeddings

    manifest, layout, cfg = run.manifest, run.layout, run.manifest.label
    params, build_key = run.settings["codec"], _build_key(run)
    saved = read_codec_description(layout.labels.root)
    if saved and saved.get("build_key") == build_key and _files_inside(layout.labels.root, saved.get("sha256", {})):
        return saved
    sample = None
    if cfg.codec == "pq":
        proposals = run.upstream["proposals"]["shards"]
        counts = {s: proposals[shard_name(s)]["counts"] for s in shard_ids}
        plan = plan_region_sample(counts, cfg.pq_train_regions, manifest.seed)
        print(f"label: training the PQ codebook ({cfg.pq_subquantizers}x{cfg.pq_bits} bits) on up to "
              f"{cfg.pq_train_regions} regions of {sum(map(len, plan.values()))} images drawn from "
              f"{len(plan)} shard(s)")
        sample = next(run_tasks(on_assigned_device(sample_region_embeddings, "label"),
                                [(job, plan, cfg.pq_train_regions, manifest.seed)],
                                num_cpus=actors.num_cpus, num_gpus=actors.num_gpus, desc="label: PQ sample",
                                ray_options=model_process_env(actors.num_gpus)))
    codec = codec_from_settings(cfg, run.memo["dim"], concept_embeddings=run.memo["concepts"], sample=sample,
                                seed=manifest.seed)
    return codec.save(layout.labels_codec, extra={"build_key": build_key, "build": params,
                                                  "train_regions": None if sample is None else len(sample)})


def label_files(layout: RunLayout, manifest) -> list:
    files = [layout.labels_codec]
    if manifest.label.region_index:
        files += [layout.labels_region_index, layout.labels_region_ids]
    return files


STAGE = Stage(
    name="label", help="teacher region embeddings -> pseudo-labels + compact distillation targets -> labels/",
    reads=reads, sections=("label",), identify=teacher_and_codec, outputs=label_files, current=shards_done,
    work=label)
run = STAGE.run
