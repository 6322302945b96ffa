"""The GPU stages' data path against the ideal: `proposals` and `label` as stages (Ray actors streaming
their shards through decode threads) against a plain loop running the same model on images decoded
before the clock starts, in one process with the same number of threads.

    python bench/precompute.py --quick      # paper proposals on a 200-photo shard, label on 24; tiny on 60 (~25 min)
    python bench/precompute.py              # paper models on two shards of 200 photos (hours on a 2-core CPU)
    python bench/precompute.py --only paper --stages proposals --paper-images 200 --paper-per-shard 200

Setting (bench/_photo_run.py): 1333x1000 camera-like JPEG photos; `paper`: the RN50 teacher (width 1024,
6790 concepts) at 800/1333 and an R50-FPN RPN keeping 300 boxes per image; `tiny`: RN50-tiny and its
res4 RPN at the same image scale (the decode then weighs far more against the model). Random weights:
throughput does not depend on them. fp32, label codec fp16 (no PQ training in the figure).

  - stage: wall time of `stages.proposals.run` / `stages.label.run` once Ray is up (one actor asking for
    every CPU: its decode thread + the model's threads; actor start-up, i.e. worker imports and model
    loading, included; Parquet and markers written);
  - streaming: the actor's own seconds over its shards (`NNNNN_stats.json`), i.e. the stage without the
    start-up, which a real run pays once per actor for thousands of shards;
  - ideal: the same model and batches in this process, images decoded and resized before timing,
    outputs kept in memory; model loading excluded. Half its batches run before the stage and half
    after, so that a host whose speed drifts (shared cores) weighs on both sides alike. This process
    runs under the malloc settings of the stage's CPU actors (it re-executes itself under them).
Goal on this CPU: stage >= 0.85 of ideal at paper settings. The outputs of both sides are compared
(they must be equal: the stage streams, the ideal does not).
Prints readable lines, then (last line) one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from bench._photo_run import PAPER, TINY, Models, prepare, with_the_actors_allocator  # noqa: E402
from pipeline.images import load_rgb  # noqa: E402
from pipeline.layout import RunLayout  # noqa: E402
from pipeline.sidecars import read_proposals, read_shard_images, sidecar_shards, written_keys  # noqa: E402
from trainer.data.images import image_tensor  # noqa: E402


def decoded_shards(layout: RunLayout, keys_of, resize=None) -> list[tuple[list, list, list]]:
    """Per shard: (keys, uint8 pixels [3, H, W] after `resize`, original (width, height)), all decoded."""
    out = []
    for s in sidecar_shards(layout.shards):
        keys = keys_of(s)
        blobs = read_shard_images(layout.shard_tar(s), keys)
        images = [load_rgb(blobs[k]) for k in keys]
        out.append((keys, [image_tensor(resize(i) if resize else i).contiguous() for i in images],
                    [i.size for i in images]))
    return out


class IdealProposals:
    """The RPN over pre-decoded images in this process: its batches can run in parts, around the stage."""

    def __init__(self, manifest, layout: RunLayout):
        from stages.proposals import proposal_job
        from stages.resolve import rpn_checkpoint_path
        from trainer.offline.proposals import Proposer

        self.layout, size = layout, manifest.proposals.batch_size
        self.proposer = Proposer(proposal_job(manifest, rpn_checkpoint_path(manifest, "proposals"), device="cpu"))
        self.batches = [(s, keys[i:i + size], pixels[i:i + size], sizes[i:i + size])
                        for s, (keys, pixels, sizes) in zip(
                            sidecar_shards(layout.shards),
                            decoded_shards(layout, lambda s: [r["key"] for r in written_keys(layout.shards, s)]))
                        for i in range(0, len(keys), size)]
        self.images = sum(len(b[1]) for b in self.batches)
        self.results: dict[int, list] = {}

    def run(self, which: range) -> float:
        started = time.perf_counter()
        for i in which:
            _, _, pixels, sizes = self.batches[i]
            self.results[i] = self.proposer.propose(pixels, sizes)
        return time.perf_counter() - started

    def same_as_stage(self) -> bool:
        stage = {s: read_proposals(self.layout.proposals, s) for s in sidecar_shards(self.layout.proposals)}
        return all(np.array_equal(boxes, stage[s][key].boxes)
                   for i, (s, keys, _, _) in enumerate(self.batches)
                   for key, (boxes, _) in zip(keys, self.results[i]))


class IdealLabel:
    """The teacher over pre-decoded, pre-resized images and the stage's proposals, in this process."""

    def __init__(self, manifest, layout: RunLayout):
        from stages.label import teacher_scale
        from stages.resolve import load_model_ref
        from trainer.offline.codecs import codec_from_settings
        from trainer.offline.labels import Teacher

        cfg, size = manifest.label, manifest.label.batch_size
        model, _ = load_model_ref(manifest.teacher, manifest)
        self.layout, self.store_flipped = layout, cfg.store_flipped
        self.teacher = Teacher(model, np.load(layout.concept_embeddings), **teacher_scale(manifest), device="cpu",
                               temperature=cfg.temperature, faiss_threshold=cfg.faiss_threshold,
                               precision=cfg.precision)
        proposals = {s: read_proposals(layout.proposals, s) for s in sidecar_shards(layout.proposals)}
        shards = decoded_shards(layout, lambda s: list(proposals[s]), resize=self.teacher.resize)
        self.batches = [(keys[i:i + size], pixels[i:i + size], sizes[i:i + size],
                         [proposals[s][k].boxes for k in keys[i:i + size]])
                        for s, (keys, pixels, sizes) in zip(sorted(proposals), shards)
                        for i in range(0, len(keys), size)]
        self.images = sum(len(b[0]) for b in self.batches)
        concepts = np.load(layout.concept_embeddings)
        # fp16 or top-k (no training): the same codec as the stage's; the pseudo-labels compared do not
        # depend on it anyway
        self.codec = codec_from_settings(cfg, concepts.shape[1], concept_embeddings=concepts, seed=manifest.seed)
        self.results: dict[int, list] = {}

    def run(self, which: range) -> float:
        from trainer.offline.labels import label_batch

        started = time.perf_counter()
        for i in which:
            _, pixels, sizes, boxes = self.batches[i]
            self.results[i] = label_batch(self.teacher, self.codec, pixels, sizes, boxes,
                                          self.store_flipped)["pseudo_label"]
        return time.perf_counter() - started

    def same_as_stage(self) -> bool:
        stage = [np.asarray(v) for s in sidecar_shards(self.layout.labels)
                 for v in pq.read_table(self.layout.labels.parquet(s), columns=["pseudo_label"]).column(0).to_pylist()]
        ideal = [np.asarray(v) for i in range(len(self.batches)) for v in self.results[i]]
        return len(stage) == len(ideal) and all(np.array_equal(a, b) for a, b in zip(stage, ideal))


def measure(name: str, models: Models, images: int, per_shard: int, tmp: Path, photos: Path | None,
            stages: tuple[str, ...] = ("proposals", "label")) -> dict:
    """The stages (proposals, then label), stage vs ideal, on one prepared run."""
    from pipeline.ray_runtime import init_ray
    from stages import label, proposals

    root = tmp / name
    manifest = prepare(root, images=images, per_shard=per_shard, size=(1333, 1000), models=models,
                       photos=photos)
    layout = RunLayout.of(manifest)
    init_ray(manifest.ray)
    figures = {"teacher": models.teacher_arch, "rpn": models.rpn_backbone, "boxes": models.boxes,
               "scale": f"{models.min_size}/{models.max_size}"}
    for stage, ideal_cls in (("proposals", IdealProposals), ("label", IdealLabel)):
        if stage not in stages:
            if stage == "proposals" and "label" in stages:
                proposals.run(manifest)   # label's input
            continue
        folder = layout.proposals if stage == "proposals" else layout.labels
        module = proposals if stage == "proposals" else label
        ideal = ideal_cls(manifest, layout)
        half = len(ideal.batches) // 2
        # The ideal's first half before the stage and its second half after it: a host whose speed drifts
        # during the run (shared cores) then weighs on both sides alike.
        ideal_s = ideal.run(range(half))
        started = time.perf_counter()
        module.run(manifest)
        stage_s = time.perf_counter() - started
        ideal_s += ideal.run(range(half, len(ideal.batches)))
        streaming_s = sum(json.loads(folder.stats(s).read_text())["seconds"] for s in sidecar_shards(folder))
        n, same = ideal.images, ideal.same_as_stage()
        del ideal
        figures[stage] = {"images": n, "images_per_shard": per_shard, "stage_images_per_s": round(n / stage_s, 3), "ideal_images_per_s": round(n / ideal_s, 3),
                          "ratio_stage_vs_ideal": round(ideal_s / stage_s, 3),
                          "ratio_streaming_vs_ideal": round(ideal_s / streaming_s, 3),
                          "startup_seconds": round(stage_s - streaming_s, 1), "same_outputs": same}
        print(f"{name:5s} {stage:9s}: stage {n / stage_s:7.3f} images/s, ideal {n / ideal_s:7.3f} images/s, "
              f"ratio {ideal_s / stage_s:.3f} (goal >= 0.85; {ideal_s / streaming_s:.3f} without the "
              f"{stage_s - streaming_s:.1f} s start-up), same outputs: {same}", flush=True)
    return figures


def plan(args) -> list[tuple[str, Models, int, int, tuple[str, ...]]]:
    """(name, models, images, images per shard, stages) of each measured run."""
    stages = tuple(args.stages.split(","))
    if args.quick and args.paper_images is None:
        # proposals at a realistic shard size (its start-up and warm-up weigh little there); label, 3.5x
        # slower per image, on a shard of 24 so that the whole script stays within ~25 minutes
        runs = [("paper", PAPER, 200, 200, tuple(s for s in stages if s == "proposals")),
                ("paper", PAPER, 24, 24, tuple(s for s in stages if s == "label"))]
    else:
        images = args.paper_images or 400
        runs = [("paper", PAPER, images, args.paper_per_shard or min(images, 200), stages)]
    tiny_images = args.tiny_images or (60 if args.quick else 200)
    runs.append(("tiny", TINY, tiny_images, tiny_images, stages))
    wanted = args.only.split(",")
    return [run for run in runs if run[0] in wanted and run[4]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="paper proposals on one 200-photo shard, paper label on one of 24; tiny models on one of 60")
    parser.add_argument("--paper-images", type=int, default=None, help="photos for the paper models")
    parser.add_argument("--paper-per-shard", type=int, default=None)
    parser.add_argument("--tiny-images", type=int, default=None, help="photos for the tiny models (one shard)")
    parser.add_argument("--only", default="paper,tiny")
    parser.add_argument("--stages", default="proposals,label", help="which stages to measure")
    args = parser.parse_args()
    with_the_actors_allocator()
    torch.set_num_threads(os.cpu_count())
    load_start = os.getloadavg()
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in load_start)} ({os.cpu_count()} CPUs)", flush=True)
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-precompute-") as tmp:
        for i, (name, models, images, per_shard, stages) in enumerate(plan(args)):
            measured = measure(name, models, images, per_shard, Path(tmp) / str(i), None, stages)
            figures.setdefault(name, {}).update(measured)
    load_end = os.getloadavg()
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in load_end)}")
    figures.update(cpus=os.cpu_count(), load_average_start=round(load_start[0], 2),
                   load_average_end=round(load_end[0], 2))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
