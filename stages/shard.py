"""Stage `shard`: a caption corpus -> img2dataset-style WebDataset tars with a Parquet per shard.

Reads the corpus (CC3M TSV/Parquet, an img2dataset folder, COCO captions, a folder of images with
.txt captions, or the synthetic world), splits the rows into shards in input order, and writes each
shard as a Ray task. Shards already done under the same settings are skipped.
"""
from __future__ import annotations

import logging
import math
from collections import Counter

from pipeline.layout import RunLayout, synthetic_world
from pipeline.ray_runtime import init_ray, run_tasks
from pipeline.runner import Stage, StageRun

log = logging.getLogger(__name__)

# A written image that pretraining would enlarge more than this many times to reach its scale
# (pretrain.min_size / max_size) is far below that scale: img2dataset's default 256 px under 800 is 3.1x.
FAR_BELOW_SCALE = 2.0


def reads(manifest) -> tuple[str, ...]:
    return ("synth",) if manifest.corpus.format == "synthetic" else ()


def corpus_identity(run: StageRun) -> dict:
    """The input rows (read once here, kept for the work) and their fingerprint."""
    from pipeline.readers import corpus_fingerprint, read_corpus

    manifest = run.manifest
    rows = read_corpus(manifest)  # CorpusError here, before any work, when nothing could be sharded
    run.memo["rows"] = rows
    run.memo["shard_ids"] = list(range(math.ceil(rows.num_rows / manifest.shard.samples_per_shard)))
    # The synthetic world is usually inside the run folder: fingerprint its paths relative to it.
    world = synthetic_world(manifest) if manifest.corpus.format == "synthetic" else None
    corpus = manifest.corpus
    return {"format": corpus.format, "corpus": corpus_fingerprint(rows, world),
            "files": {"allow_outside_root": corpus.allow_outside_root, "max_file_bytes": corpus.max_file_bytes}}


def shard_options(manifest):
    """How each shard is written: the shard section's settings and where image files may be read from."""
    from pipeline.readers import corpus_files
    from pipeline.shard_writer import ShardOptions

    cfg = manifest.shard
    return ShardOptions(max_side=cfg.max_side, max_pixels=cfg.max_pixels, min_side=cfg.min_side,
                        jpeg_quality=cfg.jpeg_quality, max_caption_chars=cfg.max_caption_chars,
                        key_digits=max(4, len(str(cfg.samples_per_shard - 1))), files=corpus_files(manifest),
                        image_formats=tuple(cfg.image_formats))


def shards_done(run: StageRun) -> bool:
    return not run.markers().pending(run.memo["shard_ids"])


def write_shards(run: StageRun) -> dict:
    from pipeline.io import write_json
    from pipeline.readers import CorpusError
    from pipeline.shard_writer import write_shard

    layout = run.layout
    rows, shard_ids = run.memo["rows"], run.memo["shard_ids"]
    per_shard = run.manifest.shard.samples_per_shard
    options = shard_options(run.manifest)
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
    summary = markers.summary(shard_ids)
    if not any(sizes.values()):
        # Every row rejected: the shards' Parquet files say why; the stage is not done, so no later stage
        # starts on empty shards.
        reasons = sum((Counter(markers.shard_stats(s).get("status_dict", {})) for s in shard_ids), Counter())
        reasons.pop("success", None)
        raise CorpusError(f"corpus.path: {run.manifest.corpus.path!r}: none of its {rows.num_rows} rows was "
                          f"written ({', '.join(f'{r} {n}' for r, n in reasons.most_common())}); see the "
                          f"reason column of {layout.shards.root}/*.parquet")
    return {**summary, "sizes": str(layout.sizes_json), "image_scale": check_image_scale(run, shard_ids)}


def check_image_scale(run: StageRun, shard_ids: list[int]) -> dict:
    """Counts of the written images that pretraining would enlarge more than FAR_BELOW_SCALE times and
    of those that look letterboxed (pipeline.shard_writer.looks_letterboxed), with one warning when
    either is most of them: a corpus downloaded with img2dataset's defaults (256 px, white borders)
    would be trained on blown-up, padded images (docs/formats.md gives the download command)."""
    from pipeline.sidecars import written_keys
    from trainer.models.geometry import resize_scale

    p, markers = run.manifest.pretrain, run.markers()
    images = small = letterboxed = 0
    for s in shard_ids:       # one shard's sizes at a time
        for row in written_keys(run.layout.shards, s):
            images += 1
            small += resize_scale(row["width"], row["height"], p.min_size, p.max_size) > FAR_BELOW_SCALE
        letterboxed += (markers.shard_stats(s) or {}).get("letterboxed", 0)
    counts = {"images": images, "far_below_scale": small, "letterboxed": letterboxed}
    if images and max(small, letterboxed) * 2 > images:
        log.warning("shard: %d of %d images are far below the training scale (enlarged more than %gx to a "
                    "short side of %d, long side at most %d: pretrain.min_size / max_size) and %d look "
                    "letterboxed (uniform bands on two opposite sides). Regions of blown-up, padded images "
                    "are not what the paper trained on: download the corpus at full size, e.g. img2dataset "
                    "--resize_mode keep_ratio --image_size 800 --resize_only_if_bigger True (docs/formats.md, "
                    "\"Downloading CC3M\")", small, images, FAR_BELOW_SCALE, p.min_size, p.max_size, letterboxed)
    return counts


def sizes_file(layout: RunLayout, manifest) -> list:
    return [layout.sizes_json]


STAGE = Stage(
    name="shard", help="corpus -> img2dataset-style WebDataset tars + a Parquet per shard",
    reads=reads, sections=("shard",), identify=corpus_identity, outputs=sizes_file, current=shards_done,
    work=write_shards)
run = STAGE.run
