"""Stage `shard`: a caption corpus -> img2dataset-style WebDataset tars with a Parquet per shard.

Reads the corpus (CC3M TSV/Parquet, an img2dataset folder, COCO captions, a folder of images with
.txt captions, or the synthetic world), splits the rows into shards in input order, and writes each
shard as a Ray task. Shards already done under the same settings are skipped.
"""
from __future__ import annotations

import math

from pipeline.layout import RunLayout, synthetic_world
from pipeline.ray_runtime import init_ray, run_tasks
from pipeline.runner import Stage, StageRun


def reads(manifest) -> tuple[str, ...]:
    return ("synth",) if manifest.corpus.format == "synthetic" else ()


def corpus_identity(run: StageRun) -> dict:
    """The input rows (read once here, kept for the work) and their fingerprint."""
    from pipeline.readers import corpus_fingerprint, read_corpus

    manifest = run.manifest
    rows = read_corpus(manifest)
    run.memo["rows"] = rows
    run.memo["shard_ids"] = list(range(math.ceil(rows.num_rows / manifest.shard.samples_per_shard)))
    # The synthetic world is usually inside the run folder: fingerprint its paths relative to it.
    world = synthetic_world(manifest) if manifest.corpus.format == "synthetic" else None
    return {"format": manifest.corpus.format, "corpus": corpus_fingerprint(rows, world)}


def shards_done(run: StageRun) -> bool:
    return not run.markers().pending(run.memo["shard_ids"])


def write_shards(run: StageRun) -> dict:
    from pipeline.io import write_json
    from pipeline.shard_writer import ShardOptions, write_shard

    layout, cfg = run.layout, run.manifest.shard
    rows, shard_ids = run.memo["rows"], run.memo["shard_ids"]
    per_shard = cfg.samples_per_shard
    options = ShardOptions(max_side=cfg.max_side, max_pixels=cfg.max_pixels, min_side=cfg.min_side,
                           jpeg_quality=cfg.jpeg_quality, max_caption_chars=cfg.max_caption_chars,
                           key_digits=max(4, len(str(per_shard - 1))))
    markers = run.markers()
    pending = markers.start_pending(shard_ids)
    print(f"shard: {rows.num_rows} rows -> {len(shard_ids)} shards ({len(pending)} to write)")
    if pending:
        init_ray(run.manifest.ray)
    tasks = [(sid, rows.slice(sid * per_shard, per_shard), options, layout.shards,
              layout.shard_tar(sid), run.fingerprint) for sid in pending]
    for _stats in run_tasks(write_shard, tasks, desc="shard"):
        pass
    sizes = {layout.shard_tar(s).name: markers.shard_stats(s)["counts"]["written"] for s in shard_ids}
    write_json(layout.sizes_json, sizes)
    return {**markers.summary(shard_ids), "sizes": str(layout.sizes_json)}


def sizes_file(layout: RunLayout, manifest) -> list:
    return [layout.sizes_json]


STAGE = Stage(
    name="shard", help="corpus -> img2dataset-style WebDataset tars + a Parquet per shard",
    reads=reads, sections=("shard",), identify=corpus_identity, outputs=sizes_file, current=shards_done,
    work=write_shards)
run = STAGE.run


if __name__ == "__main__":
    from stages.cli import stage_main

    stage_main(STAGE.name)
