"""Label-stage throughput: the stage (Ray Data actor pool) against a plain loop running the same
model on the same images in one process.

    python bench/label.py [MANIFEST] [--set section.key=value ...] [--max-shards N]

Needs the run's proposals, concept embeddings and teacher. Both sides run into a scratch copy of
the run (inputs linked, labels/ fresh), after the codec is built once (so neither side pays for
PQ training):
  - stage: `stages.label.run` on the scratch run: Ray start-up is excluded (Ray is started first),
    actor start-up (each actor loads the teacher) is included;
  - plain: one process, the teacher loaded once, every shard's images read, labelled
    (trainer/offline/labels.label_images: embeddings, scores, codes) and written, in turn, under the
    malloc settings of the stage's CPU actors.
Prints readable lines, then (last line) one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench._photo_run import with_the_actors_allocator  # noqa: E402
from pipeline.config import load_manifest  # noqa: E402
from pipeline.images import load_rgb  # noqa: E402
from pipeline.layout import RunLayout  # noqa: E402
from pipeline.ray_runtime import cluster_resources, init_ray  # noqa: E402
from pipeline.sidecars import read_proposals, read_shard_images, sidecar_shards, write_labels  # noqa: E402
from pipeline.io import write_json  # noqa: E402
from pipeline.stage import read_stage_manifest  # noqa: E402
from stages.label import teacher_scale  # noqa: E402
from trainer.offline.codecs import load_codec  # noqa: E402
from trainer.offline.labels import Teacher, label_images  # noqa: E402
from stages.resolve import load_model_ref  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def scratch_run(layout: RunLayout, root: Path, shards: list[int]) -> RunLayout:
    """A run folder whose inputs link to `layout`'s, limited to `shards`, with an empty labels/."""
    new = RunLayout(root)
    root.mkdir(parents=True)
    for d in ("synth", "shards", "concepts", "checkpoints"):   # the stages label reads, all the way up
        if (layout.root / d).exists():
            (root / d).symlink_to(layout.root / d)
    new.proposals.root.mkdir(parents=True)
    for s in shards:
        for f in (layout.proposals.parquet(s), layout.proposals.stats(s)):
            (new.proposals.root / f.name).symlink_to(f)
    m = read_stage_manifest(layout.proposals)
    m["shards"] = {k: v for k, v in m["shards"].items() if int(k) in shards}
    write_json(new.proposals.manifest, m)
    return new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", nargs="?", default=str(REPO / "manifests" / "demo.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--max-shards", type=int, default=None)
    args = parser.parse_args()
    with_the_actors_allocator()
    manifest = load_manifest(args.manifest, args.overrides)
    layout = RunLayout.of(manifest)
    shards = sidecar_shards(layout.proposals)[:args.max_shards]
    from stages import label

    with tempfile.TemporaryDirectory(prefix="bench-label-") as tmp:
        scratch = scratch_run(layout, Path(tmp) / "run", shards)
        m = manifest.model_copy(deep=True)
        m.output_dir = str(scratch.root)
        init_ray(m.ray)
        print(f"label bench: {len(shards)} shards, teacher {m.teacher.arch}, codec {m.label.codec}, "
              f"Ray CPUs {cluster_resources().get('CPU')}, GPUs {cluster_resources().get('GPU', 0)}")
        label.run(m)                                       # builds the codec (PQ training) once
        images = sum(v["counts"]["images"] for v in read_stage_manifest(scratch.labels)["shards"].values())
        for s in shards:
            scratch.labels.stats(s).unlink()
        t = time.time()
        label.run(m)
        stage_s = time.time() - t
        columns = ["key", "num_regions", "pseudo_label"]
        stage_rows = {s: pq.read_table(scratch.labels.parquet(s), columns=columns) for s in shards}

        # the plain loop: same model, same images, one process
        t = time.time()
        model, _ = load_model_ref(m.teacher, m, fallback=scratch.teacher_checkpoint)
        teacher = Teacher(model, np.load(scratch.concept_embeddings), **teacher_scale(m),
                          temperature=m.label.temperature,
                          faiss_threshold=m.label.faiss_threshold)
        codec = load_codec(scratch.labels.root)
        differing = total = 0
        for s in shards:
            props = read_proposals(scratch.proposals, s)
            keys = list(props)
            blobs = read_shard_images(scratch.shard_tar(s), keys)
            cols = label_images(teacher, codec, [load_rgb(blobs[k]) for k in keys], [props[k].boxes for k in keys],
                                m.label.batch_size, m.label.store_flipped)
            write_labels(scratch.labels, s, {"key": keys, **cols}, m.label.store_flipped)
            for mine, theirs in zip(cols["pseudo_label"], stage_rows[s].column("pseudo_label").to_pylist()):
                total += len(theirs)
                differing += len(theirs) if len(mine) != len(theirs) else int((np.asarray(mine) != theirs).sum())
        plain_s = time.time() - t
        shutil.rmtree(scratch.labels.root, ignore_errors=True)
    stage_ips, plain_ips = images / stage_s, images / plain_s
    print(f"stage (Ray actor pool): {images} images in {stage_s:.1f}s = {stage_ips:.1f} images/s")
    print(f"plain loop, one process: {images} images in {plain_s:.1f}s = {plain_ips:.1f} images/s")
    # The actors run the teacher in 1 thread each here, the plain loop in every thread: fp32 sums in another
    # order can flip a near-tie, so a handful of differing labels is expected; at equal threads none differ.
    print(f"ratio stage / plain: {stage_ips / plain_ips:.2f}; pseudo-labels differing: {differing} of {total}")
    print(json.dumps({"images": images, "shards": len(shards), "stage_images_per_s": round(stage_ips, 2),
                      "plain_images_per_s": round(plain_ips, 2), "ratio_stage_vs_plain": round(stage_ips / plain_ips, 3),
                      "stage_seconds": round(stage_s, 2), "plain_seconds": round(plain_s, 2),
                      "pseudo_labels_differing": differing, "pseudo_labels": total, "ray_cpus": cluster_resources().get("CPU"),
                      "ray_gpus": cluster_resources().get("GPU", 0)}))


if __name__ == "__main__":
    main()
