"""The proposals stage: the sidecar contract, equality with the RPN run by hand, box cleaning, resume."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.images import load_rgb
from pipeline.sidecars import PROPOSALS_SCHEMA, read_proposals, read_shard_images, written_keys
from stages import proposals
from tests.labelkit import manifest_body, prepare_run, read_rows, rpn_loader
from trainer.offline.proposals import clean_boxes, import_loader


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    from pipeline.config import load_manifest

    root = tmp_path_factory.mktemp("proposals")
    path = root / "m.yaml"
    path.write_text("name: t\noutput_dir: out\nray: {num_cpus: 2}\n" + manifest_body(num_images=9))
    manifest = load_manifest(path)
    layout = prepare_run(manifest)
    result = proposals.run(manifest, rpn_loader=rpn_loader())
    return manifest, layout, result


def test_rows_follow_the_sidecar_contract(run):
    manifest, layout, result = run
    cfg = manifest.proposals
    assert result["status"] == "done" and sorted(result["shards"]) == ["00000", "00001", "00002"]
    total = 0
    for shard_id in range(3):
        table = pq.read_table(layout.proposals.parquet(shard_id))
        assert table.schema.equals(PROPOSALS_SCHEMA)
        rows = table.to_pylist()
        written = written_keys(layout.shards, shard_id)
        assert [r["key"] for r in rows] == [w["key"] for w in written]  # one row per written key, in order
        for row, w in zip(rows, written):
            assert (row["width"], row["height"]) == (w["width"], w["height"])
            boxes = np.asarray(row["boxes"], np.float32).reshape(-1, 4)
            obj = np.asarray(row["objectness"], np.float32)
            assert row["num_boxes"] == len(boxes) == len(obj) <= cfg.post_nms_top_n
            assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= row["width"]).all()
            assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= row["height"]).all()
            assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
            assert (np.diff(obj) <= 0).all(), "ordered by objectness"
            total += len(boxes)
    assert total > 0 and result["counts"]["boxes"] == total and result["counts"]["images"] == 9


def test_rows_equal_the_rpn_run_by_hand(run):
    manifest, layout, _ = run
    cfg = manifest.proposals
    rpn = import_loader(rpn_loader())(layout.rpn_checkpoint, "cpu")
    for shard_id in range(3):
        stored = read_proposals(layout.proposals, shard_id)
        keys = list(stored)
        blobs = read_shard_images(layout.shard_tar(shard_id), keys)
        for start in range(0, len(keys), cfg.batch_size):   # the stage's batches: shard order, batch_size
            part = keys[start:start + cfg.batch_size]
            images = [torch.from_numpy(np.asarray(load_rgb(blobs[k])).copy()).permute(2, 0, 1).float() / 255
                      for k in part]
            out = rpn.propose(images, min_size=cfg.min_size, max_size=cfg.max_size, pre_nms_top_n=cfg.pre_nms_top_n,
                              post_nms_top_n=cfg.post_nms_top_n, nms_thresh=cfg.nms_thresh)
            for k, (boxes, logits) in zip(part, out):
                # boxes bit-equal; logits to float rounding (the test runs torch with other thread counts)
                np.testing.assert_array_equal(stored[k].boxes, boxes.numpy())
                np.testing.assert_allclose(stored[k].objectness, logits.numpy(), rtol=1e-5, atol=1e-7)


def test_streamed_worker_writes_exactly_the_unstreamed_proposals(run, tmp_path):
    """The streamed actor (tar read batch by batch, decode threads running ahead, one row group per
    batch) stores the same table as proposing for the whole decoded shard at once, whatever the thread
    count and prefetch depth (fp32)."""
    import dataclasses

    from pipeline.layout import RunLayout
    from pipeline.sidecars import Proposals, _proposals_table
    from trainer.data.images import image_tensor
    from trainer.offline.proposals import ProposalJob, Proposer

    manifest, layout, _ = run
    cfg = manifest.proposals
    job = ProposalJob(run_root=str(layout.root), checkpoint=str(layout.rpn_checkpoint), min_size=cfg.min_size,
                      max_size=cfg.max_size, pre_nms_top_n=cfg.pre_nms_top_n, post_nms_top_n=cfg.post_nms_top_n,
                      nms_thresh=cfg.nms_thresh, batch_size=cfg.batch_size, fingerprint="f",
                      rpn_loader=rpn_loader(), device="cpu", precision="fp32")
    proposer = Proposer(job)
    for shard_id in range(3):
        keys = [w["key"] for w in written_keys(layout.shards, shard_id)]
        blobs = read_shard_images(layout.shard_tar(shard_id), keys)
        rows = []
        for start in range(0, len(keys), cfg.batch_size):
            part = keys[start:start + cfg.batch_size]
            images = [load_rgb(blobs[k]) for k in part]
            found = proposer.propose([image_tensor(img) for img in images], [img.size for img in images])
            rows += [Proposals(k, img.width, img.height, b, s) for k, img, (b, s) in zip(part, images, found)]
        unstreamed = _proposals_table(rows)
        for threads, prefetch in ((1, 0), (3, 1)):
            root = tmp_path / f"s{shard_id}-{threads}"
            root.mkdir()
            (root / "shards").symlink_to(layout.shards.root, target_is_directory=True)
            proposer.job = dataclasses.replace(job, run_root=str(root), decode_threads=threads,
                                               prefetch_batches=prefetch)
            stats = proposer.shard(shard_id)
            streamed = pq.ParquetFile(RunLayout(root).proposals.parquet(shard_id))
            assert streamed.metadata.num_row_groups == -(-len(keys) // cfg.batch_size)
            assert streamed.read().to_pylist() == unstreamed.to_pylist()   # every value, bit for bit
            assert stats["images"] == len(keys) and stats["boxes"] == sum(len(r.boxes) for r in rows)


def test_bf16_keeps_boxes_in_fp32_and_close_to_fp32(run):
    """precision bf16 (CPU autocast here): the network runs in bf16, the boxes and logits come out fp32,
    and the top proposals overlap the fp32 ones."""
    from torchvision.ops import box_iou

    from trainer.data.images import image_tensor
    from trainer.offline.proposals import ProposalJob, Proposer

    manifest, layout, _ = run
    cfg = manifest.proposals
    keys = [w["key"] for w in written_keys(layout.shards, 0)]
    images = [load_rgb(b) for b in read_shard_images(layout.shard_tar(0), keys).values()]
    found = {}
    for precision in ("fp32", "bf16"):
        job = ProposalJob(run_root=str(layout.root), checkpoint=str(layout.rpn_checkpoint), min_size=cfg.min_size,
                          max_size=cfg.max_size, pre_nms_top_n=cfg.pre_nms_top_n,
                          post_nms_top_n=cfg.post_nms_top_n, nms_thresh=cfg.nms_thresh, batch_size=2,
                          fingerprint="f", rpn_loader=rpn_loader(), device="cpu", precision=precision)
        found[precision] = Proposer(job).propose([image_tensor(i) for i in images], [i.size for i in images])
    for (b32, s32), (b16, s16) in zip(found["fp32"], found["bf16"]):
        assert b16.dtype == np.float32 and s16.dtype == np.float32
        if len(b32) and len(b16):
            best = box_iou(torch.from_numpy(b32[:5]), torch.from_numpy(b16)).max(1).values
            assert float(best.mean()) > 0.5


def test_shard_batches_decode_a_bounded_number_ahead_and_refuse_unknown_keys(run):
    import threading

    from trainer.offline.streaming import shard_batches

    _, layout, _ = run
    items = written_keys(layout.shards, 0)
    decoded, lock = [], threading.Lock()

    def counting_resize(image):
        with lock:
            decoded.append(image.size)
        return image

    seen = []
    for i, batch in enumerate(shard_batches(layout.shard_tar(0), items, batch_size=1, threads=2, prefetch=1,
                                            resize=counting_resize)):
        assert len(decoded) <= (i + 2) * 1, "at most `prefetch` batches beyond the one handed out"
        assert [p.shape for p in batch.pixels] == [(3, h, w) for w, h in batch.sizes]
        assert all(p.dtype == torch.uint8 for p in batch.pixels)
        seen += [item["key"] for item in batch.items]
    assert seen == [item["key"] for item in items] and len(decoded) == len(items)
    with pytest.raises(FileNotFoundError, match="no image for key 000000099"):
        list(shard_batches(layout.shard_tar(0), items[:1] + [{"key": "000000099"}], batch_size=2))
    with pytest.raises(FileNotFoundError, match="out of shard order"):
        list(shard_batches(layout.shard_tar(0), [items[1], items[0]], batch_size=2))


def test_clean_boxes_clips_drops_degenerate_and_orders():
    boxes = np.array([[-5, 2, 10, 8], [3, 3, 3, 9], [0, 0, 50, 50], [4, 4, 6, 5], [20, 1, 30, 2]], np.float32)
    scores = np.array([0.5, 9.0, 1.5, 2.0, np.nan], np.float32)
    b, s = clean_boxes(boxes, scores, width=40, height=30, top_n=10)
    np.testing.assert_array_equal(s, [2.0, 1.5, 0.5])
    np.testing.assert_array_equal(b, [[4, 4, 6, 5], [0, 0, 40, 30], [0, 2, 10, 8]])
    b, s = clean_boxes(boxes, scores, 40, 30, top_n=1)
    assert len(b) == 1 and s[0] == 2.0
    b, s = clean_boxes(np.zeros((0, 4)), np.zeros(0), 40, 30, 5)
    assert b.shape == (0, 4) and s.shape == (0,)


def test_rerun_is_a_no_op_and_a_missing_marker_redoes_only_that_shard(run):
    manifest, layout, _ = run
    rows = read_rows(layout.proposals)
    before = {p.name: p.stat().st_mtime_ns for p in layout.proposals.root.glob("[0-9]*.parquet")}
    proposals.run(manifest, rpn_loader=rpn_loader())
    assert {p.name: p.stat().st_mtime_ns for p in layout.proposals.root.glob("[0-9]*.parquet")} == before
    layout.proposals.stats(2).unlink()
    proposals.run(manifest, rpn_loader=rpn_loader())
    after = {p.name: p.stat().st_mtime_ns for p in layout.proposals.root.glob("[0-9]*.parquet")}
    assert after["00002.parquet"] != before["00002.parquet"]
    assert after["00000.parquet"] == before["00000.parquet"] and after["00001.parquet"] == before["00001.parquet"]
    assert read_rows(layout.proposals) == rows


def test_auto_precision_on_cpus_is_the_same_run_as_fp32(run):
    """precision auto (the fixture's) on a Ray without GPUs means fp32, and is fingerprinted so: the stage
    records fp32, and the same run with precision fp32 is up to date (no shard redone)."""
    manifest, layout, result = run
    assert manifest.proposals.precision == "auto" and result["settings"]["proposals"]["precision"] == "fp32"
    before = {p.name: p.stat().st_mtime_ns for p in layout.proposals.root.glob("[0-9]*.parquet")}
    recorded = json.loads(layout.stage("proposals").manifest.read_text())["fingerprint"]
    manifest.proposals.precision = "fp32"
    try:
        again = proposals.run(manifest, rpn_loader=rpn_loader())
    finally:
        manifest.proposals.precision = "auto"
    assert again["fingerprint"] == recorded and again["work"] is proposals.STAGE.nothing_done
    assert {p.name: p.stat().st_mtime_ns for p in layout.proposals.root.glob("[0-9]*.parquet")} == before


def test_missing_checkpoint_is_a_clear_error(run):
    manifest, _, _ = run
    manifest.proposals.checkpoint = "nowhere/rpn.pt"
    try:
        with pytest.raises(FileNotFoundError, match="train-rpn"):
            proposals.run(manifest)
    finally:
        manifest.proposals.checkpoint = None


class _ActorEnvironment:
    """A Ray Data actor that reports the malloc settings its process started with."""

    def __call__(self, batch: dict) -> dict:
        import os

        from pipeline.ray_runtime import CPU_MODEL_ALLOCATOR_ENV

        return {"env": np.array([",".join(f"{k}={os.environ.get(k)}" for k in sorted(CPU_MODEL_ALLOCATOR_ENV))])}


def test_actors_of_a_cpu_model_start_with_the_caching_malloc_settings(ray_local):
    from pipeline.ray_runtime import (CPU_MODEL_ALLOCATOR_ENV, alive_nodes, map_with_actor_pool, model_process_env,
                                      plan_actors)

    # the test cluster has no GPU: a model-holding actor runs its model on the CPU
    plan = plan_actors("proposals", alive_nodes(), num_gpus_per_actor=1.0, cpus_per_actor=1)
    assert plan.num_gpus == 0
    rows = list(map_with_actor_pool(_ActorEnvironment, [{"shard": 0}], plan))
    assert [r["env"] for r in rows] == [",".join(f"{k}={v}" for k, v in sorted(CPU_MODEL_ALLOCATOR_ENV.items()))]
    assert model_process_env(1.0) == {}   # on a GPU the activations are the device allocator's
