"""Stage `shard`: a caption corpus -> img2dataset-style WebDataset tars with a Parquet per shard.

Reads the corpus (CC3M TSV/Parquet, an img2dataset folder, COCO captions, a folder of images with
.txt captions, or the synthetic world), splits the rows into shards in input order, and writes each
shard as a Ray task. Shards already done under the same settings are skipped.
"""
from __future__ import annotations

import math

from pipeline.config import RunManifest
from pipeline.io import write_json
from pipeline.layout import RunLayout
from pipeline.ray_runtime import init_ray, run_tasks
from pipeline.readers import corpus_fingerprint, read_corpus
from pipeline.shard_writer import ShardOptions, write_shard
from pipeline.stage import StageState

STAGE = "shard"


def run(manifest: RunManifest) -> dict:
    layout = RunLayout.of(manifest)
    cfg = manifest.shard
    rows = read_corpus(manifest)
    per_shard = cfg.samples_per_shard
    shard_ids = list(range(math.ceil(rows.num_rows / per_shard)))
    settings = {"shard": manifest.section_dict("shard"), "format": manifest.corpus.format}
    # The synthetic world is generated inside the run folder: fingerprint its paths relative to it.
    world = (manifest.resolve(manifest.corpus.path) or layout.synth) if manifest.corpus.format == "synthetic" else None
    state = StageState.open(STAGE, layout.shards, settings, {"corpus": corpus_fingerprint(rows, world)})
    state.clean_temporaries()      # a killed run's half-written files, even when its shards were all done
    if state.is_done(shard_ids):
        print(f"shard: up to date ({len(shard_ids)} shards)")
        return state.finish(shard_ids, extra=_extra(layout))

    options = ShardOptions(max_side=cfg.max_side, max_pixels=cfg.max_pixels, min_side=cfg.min_side,
                           jpeg_quality=cfg.jpeg_quality, max_caption_chars=cfg.max_caption_chars,
                           key_digits=max(4, len(str(per_shard - 1))))
    pending = state.start_pending(shard_ids)
    print(f"shard: {rows.num_rows} rows -> {len(shard_ids)} shards ({len(pending)} to write)")
    init_ray(manifest.ray)
    tasks = [(sid, rows.slice(sid * per_shard, per_shard), options, layout.shards,
              layout.shard_tar(sid), state.fingerprint) for sid in pending]
    for _stats in run_tasks(write_shard, tasks, desc="shard"):
        pass
    sizes = {layout.shard_tar(s).name: state.shard_stats(s)["counts"]["written"] for s in shard_ids}
    write_json(layout.sizes_json, sizes)
    return state.finish(shard_ids, outputs=[layout.sizes_json], extra=_extra(layout))


def _extra(layout: RunLayout) -> dict:
    return {"sizes": str(layout.sizes_json)}


if __name__ == "__main__":
    from stages.cli import stage_main

    stage_main(STAGE)
