"""The label stage: equality with a direct region-encoder computation, codecs, flipped targets, resume."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.images import load_rgb
from pipeline.sidecars import read_labels, read_proposals, read_shard_images
from stages import label, proposals
from stages.resolve import teacher_scale
from tests.labelkit import concepts_from_regions, manifest_body, prepare_run, read_rows, rpn_loader
from trainer.models.clip import load_clip
from trainer.models.constants import CLIP_MEAN, CLIP_STD
from trainer.offline.codecs import FP16Codec, PQCodec, TopKCodec, load_codec
from trainer.models.region_encoder import RegionEncoder
from trainer.offline.labels import Teacher


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    from pipeline.config import load_manifest

    root = tmp_path_factory.mktemp("label")
    path = root / "m.yaml"
    path.write_text("name: t\noutput_dir: out\nray: {num_cpus: 2}\n"
                    + manifest_body(codec="pq", extra="") .replace("topk: 8,", "topk: 8, store_flipped: true,"))
    manifest = load_manifest(path)
    layout = prepare_run(manifest)
    proposals.run(manifest, rpn_loader=rpn_loader())
    concepts = concepts_from_regions(layout)
    result = label.run(manifest)
    return manifest, layout, concepts, result


def direct(layout, concepts, shard_id, flip=False, batch_size=2, scale=(128, 192)):
    """The teacher by hand: canonical resize (bicubic; short side scale[0], long side at most
    scale[1]), CLIP normalisation, zero padding to /32 per batch of 2 in shard order, RoIAlign on
    res4 -> res5 -> attention pool, cos / 0.01."""
    min_size, max_size = scale
    model, _ = load_clip("RN50-tiny", layout.teacher_checkpoint)
    enc = RegionEncoder.from_clip(model).eval()
    props = read_proposals(layout.proposals, shard_id)
    keys = list(props)
    blobs = read_shard_images(layout.shard_tar(shard_id), keys)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    out = []
    for start in range(0, len(keys), batch_size):
        part = keys[start:start + batch_size]
        tensors, boxes, sizes = [], [], []
        for k in part:
            img = load_rgb(blobs[k])
            w, h = img.size
            s = min_size / min(w, h)
            if max(w, h) * s > max_size:
                s = max_size / max(w, h)
            nw, nh = int(w * s + 0.5), int(h * s + 0.5)
            b = props[k].boxes * np.array([nw / w, nh / h, nw / w, nh / h], np.float32)
            if flip:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
                pb = props[k].boxes
                b = np.stack([w - pb[:, 2], pb[:, 1], w - pb[:, 0], pb[:, 3]], 1) * np.array(
                    [nw / w, nh / h, nw / w, nh / h], np.float32)
            img = img.resize((nw, nh), Image.BICUBIC)
            t = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
            tensors.append((t - mean) / std)
            boxes.append(torch.from_numpy(np.concatenate([b, [[0, 0, nw, nh]]]).astype(np.float32)))
            sizes.append(len(b))
        H = math.ceil(max(t.shape[1] for t in tensors) / 32) * 32
        W = math.ceil(max(t.shape[2] for t in tensors) / 32) * 32
        batch = torch.zeros(len(tensors), 3, H, W)
        for i, t in enumerate(tensors):
            batch[i, :, :t.shape[1], :t.shape[2]] = t
        with torch.no_grad():
            emb = F.normalize(enc.pool_regions(enc.features(batch), boxes), dim=-1)
        at = 0
        for k, n in zip(part, sizes):
            e = emb[at:at + n + 1]
            logits = e @ torch.from_numpy(concepts).t() / 0.01
            out.append({"key": k, "regions": e[:n], "image": e[n], "logits": logits[:n], "image_logits": logits[n]})
            at += n + 1
    return out


def test_label_rows_equal_direct_computation(run):
    manifest, layout, concepts, result = run
    codec = load_codec(layout.labels.root)
    assert codec.kind == "pq" and codec.code_size == 12  # 16 sub-quantizers x 6 bits
    total_regions, labels_seen = 0, set()
    for shard_id in (0, 2):
        rows = read_labels(layout.labels, shard_id).to_pylist()
        expected = direct(layout, concepts, shard_id)
        props = read_proposals(layout.proposals, shard_id)
        assert [r["key"] for r in rows] == [e["key"] for e in expected] == list(props)
        for row, exp in zip(rows, expected):
            n = row["num_regions"]
            assert n == props[row["key"]].boxes.shape[0] == len(exp["regions"])
            probs = torch.softmax(exp["logits"], -1)
            assert row["pseudo_label"] == probs.argmax(-1).tolist()
            np.testing.assert_allclose(row["pseudo_prob"], probs.max(-1).values.numpy(), atol=1e-4)
            assert row["image_pseudo_label"] == int(exp["image_logits"].argmax())
            codes = np.frombuffer(row["region_codes"], np.uint8).reshape(n, codec.code_size)
            # the stored codes are the codec's encoding of the direct embeddings
            direct_codes = codec.encode(exp["regions"].numpy())
            assert (codes == direct_codes).mean() > 0.99
            assert row["image_code"] == codec.encode(exp["image"][None].numpy()).tobytes()
            total_regions += n
            labels_seen.update(row["pseudo_label"])
    assert total_regions > 20 and len(labels_seen) > 2, "pseudo-labels should vary across regions"
    assert result["counts"]["regions"] == sum(r["num_regions"] for r in read_rows(layout.labels))


def mirror_run(layout, tmp_path):
    """A run folder that shares the shards and proposals of `layout` and has its own labels folder."""
    from pipeline.layout import RunLayout

    tmp_path.mkdir(parents=True)
    for name in ("shards", "proposals"):
        (tmp_path / name).symlink_to(getattr(layout, name).root, target_is_directory=True)
    return RunLayout(tmp_path)


def test_streamed_worker_writes_exactly_the_unstreamed_labels(run, tmp_path):
    """At fp32 the streamed actor (tar and proposals read batch by batch, decode threads running ahead,
    one Parquet row group per batch) stores the same bytes per row as labelling the whole decoded shard
    at once, whatever the thread count and prefetch depth."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.sidecars import labels_schema
    from trainer.offline.labels import LabelJob, label_images, label_shard, load_teacher

    manifest, layout, _, _ = run
    codec = load_codec(layout.labels.root)
    job = LabelJob(run_root="", teacher_arch="RN50-tiny", teacher_checkpoint=str(layout.teacher_checkpoint),
                   teacher_allow_partial=False, concept_embeddings=str(layout.concept_embeddings),
                   codec_json=str(layout.labels_codec), min_size=128, max_size=192, temperature=0.01,
                   faiss_threshold=100_000, batch_size=2, store_flipped=True, fingerprint="f", precision="fp32")
    teacher = load_teacher(job, "cpu")
    for shard_id in (0, 2):
        props = read_proposals(layout.proposals, shard_id)
        keys = list(props)
        blobs = read_shard_images(layout.shard_tar(shard_id), keys)
        cols = label_images(teacher, codec, [load_rgb(blobs[k]) for k in keys], [props[k].boxes for k in keys],
                            batch_size=2, store_flipped=True)
        unstreamed = pa.table({"key": keys, **cols}, schema=labels_schema(True))
        for threads, prefetch in ((1, 0), (3, 1)):
            mirror = mirror_run(layout, tmp_path / f"s{shard_id}-{threads}")
            job.run_root, job.decode_threads, job.prefetch_batches = str(mirror.root), threads, prefetch
            stats = label_shard(job, teacher, codec, shard_id)
            streamed = pq.ParquetFile(mirror.labels.parquet(shard_id))
            assert streamed.metadata.num_row_groups == math.ceil(len(keys) / 2)   # one per batch
            assert streamed.read().to_pylist() == unstreamed.to_pylist()   # every value, bit for bit
            assert stats["images"] == len(keys) and stats["regions"] == sum(cols["num_regions"])


def test_pq_sample_is_drawn_across_all_shards_seeded_and_sized():
    from trainer.offline.labels import plan_region_sample

    counts = {s: {"images": 100, "boxes": 900} for s in range(40)}     # 10 regions per image
    plan = plan_region_sample(counts, max_regions=2000, seed=3)
    assert plan == plan_region_sample(counts, max_regions=2000, seed=3)
    assert plan != plan_region_sample(counts, max_regions=2000, seed=4)
    assert sum(map(len, plan.values())) == 250                         # 1.25 x 2000 / 10
    assert len(plan) > 30, "images come from (nearly) every shard, not the first ones"
    assert all(p == sorted(set(p)) and 0 <= p[0] and p[-1] < 100 for p in plan.values())
    # Ten times larger shards, the same images: the same number of images to decode.
    big = {s: {"images": 1000, "boxes": 9000} for s in range(4)}
    assert sum(map(len, plan_region_sample(big, 2000, 3).values())) == 250
    few = {0: {"images": 3, "boxes": 6}, 1: {"images": 0, "boxes": 0}}
    assert plan_region_sample(few, 2000, 0) == {0: [0, 1, 2]}


def test_flipped_targets_are_the_teacher_on_the_mirrored_image(run):
    _, layout, concepts, _ = run
    codec = load_codec(layout.labels.root)
    rows = read_labels(layout.labels, 1).to_pylist()
    expected = direct(layout, concepts, 1, flip=True)
    agree = []
    for row, exp in zip(rows, expected):
        n = row["num_regions"]
        codes = np.frombuffer(row["flipped_region_codes"], np.uint8).reshape(n, codec.code_size)
        agree.append((codes == codec.encode(exp["regions"].numpy())).mean())
        decoded = codec.decode_logits(torch.from_numpy(codes.copy()), torch.from_numpy(concepts))
        assert (decoded.argmax(-1) == exp["logits"].argmax(-1)).float().mean() > 0.8
        assert row["flipped_image_code"] == codec.encode(exp["image"][None].numpy()).tobytes()
        assert row["flipped_region_codes"] != row["region_codes"] or n == 0
    assert np.mean(agree) > 0.99


def test_codec_round_trips(run):
    _, layout, concepts, _ = run
    emb = torch.cat([d["regions"] for d in direct(layout, concepts, 0)]).numpy()
    c = torch.from_numpy(concepts)
    full = torch.from_numpy(emb) @ c.t() / 0.01

    def kl(decoded):
        return (torch.softmax(full, -1) * (torch.log_softmax(full, -1) - torch.log_softmax(decoded, -1))).sum(-1).mean()

    fp16 = FP16Codec(64)
    dec = fp16.decode_logits(torch.from_numpy(fp16.encode(emb)), c)
    torch.testing.assert_close(dec, full, atol=0.05, rtol=0)
    assert fp16.code_size == 128 and kl(dec) < 1e-4

    topk = TopKCodec(4, concepts, 0.01)
    codes = topk.encode(emb)
    assert codes.shape == (len(emb), 4 * 4)
    dec = topk.decode_logits(torch.from_numpy(codes), c)
    torch.testing.assert_close(torch.softmax(dec, -1).sum(-1), torch.ones(len(emb)))
    assert (dec.argmax(-1) == full.argmax(-1)).float().mean() > 0.95  # fp16 ties aside
    top4 = torch.log_softmax(full, -1).topk(4).values
    torch.testing.assert_close(dec.topk(4).values, top4, atol=2e-2, rtol=1e-2)

    pq = load_codec(layout.labels.root)
    assert isinstance(pq, PQCodec)
    dec = pq.decode_logits(torch.from_numpy(pq.encode(emb)), c)
    ref = torch.from_numpy(pq.pq.decode(pq.encode(emb)))
    torch.testing.assert_close(pq.decode_embeddings(torch.from_numpy(pq.encode(emb))), F.normalize(ref, dim=-1))
    assert (dec.argmax(-1) == full.argmax(-1)).float().mean() > 0.8


def test_pq_codebook_is_the_same_on_any_thread_count_and_leaves_torch_threads_alone():
    # The codebook trains on all cores; it must not depend on how many there are (a rerun on another
    # machine must give the same labels), and it must not change the threads of the rest of the process
    # (torch shares the OpenMP runtime; an earlier version left pretrain/transfer/evaluate on one thread).
    import faiss

    before, faiss_before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(2)
    try:
        sample = np.random.default_rng(0).standard_t(3, size=(3000, 32)).astype(np.float32)
        codebooks = []
        for threads in (1, 2):
            faiss.omp_set_num_threads(threads)          # the same OpenMP runtime as torch's
            torch_threads = torch.get_num_threads()
            codebooks.append(PQCodec.train(sample, 8, 6, seed=1))
            assert (faiss.omp_get_max_threads(), torch.get_num_threads()) == (threads, torch_threads)
        np.testing.assert_array_equal(codebooks[0]._centroids_np, codebooks[1]._centroids_np)
        np.testing.assert_array_equal(codebooks[0].encode(sample), codebooks[1].encode(sample))
    finally:
        torch.set_num_threads(before)
        faiss.omp_set_num_threads(faiss_before)


def test_faiss_scoring_matches_the_matrix_product(run):
    _, layout, concepts, _ = run
    model, _ = load_clip("RN50-tiny", layout.teacher_checkpoint)
    emb = torch.cat([d["regions"] for d in direct(layout, concepts, 2)])
    dense = Teacher(model, concepts, device="cpu")
    search = Teacher(model, concepts, faiss_threshold=1, device="cpu")
    assert search.uses_faiss and not dense.uses_faiss
    (l1, p1), (l2, p2) = dense.score(emb), search.score(emb)
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_allclose(p1, p2, atol=1e-4)


def test_resume_redoes_only_a_missing_shard_and_writes_a_region_index(run):
    import faiss

    manifest, layout, concepts, _ = run
    before = {p.name: p.stat().st_mtime_ns for p in layout.labels.root.glob("[0-9]*.parquet")}
    rows_before = read_rows(layout.labels)
    codec_before = json.loads(layout.labels_codec.read_text())
    layout.labels.stats(1).unlink()
    manifest.label.region_index = True
    label.run(manifest)
    after = {p.name: p.stat().st_mtime_ns for p in layout.labels.root.glob("[0-9]*.parquet")}
    assert after["00001.parquet"] != before["00001.parquet"]
    assert {k: v for k, v in after.items() if k != "00001.parquet"} == \
        {k: v for k, v in before.items() if k != "00001.parquet"}
    assert read_rows(layout.labels) == rows_before
    assert json.loads(layout.labels_codec.read_text()) == codec_before  # the codebook is reused
    index = faiss.read_index(str(layout.labels_region_index))
    assert index.ntotal == sum(r["num_regions"] for r in rows_before)
    codec = load_codec(layout.labels.root)
    first = rows_before[0]
    q = codec.decode_embeddings(torch.from_numpy(
        np.frombuffer(first["region_codes"], np.uint8).reshape(-1, codec.code_size)[:1].copy())).numpy()
    recon = index.reconstruct(0)  # row 0 = region 0 of the first key, with the stored code
    np.testing.assert_allclose(recon / np.linalg.norm(recon), q[0], atol=1e-5)
    sims, found = index.search(q, 3)
    assert found.shape == (1, 3) and (found >= 0).all()


def test_auto_precision_on_cpus_is_the_same_run_as_fp32(run):
    """precision auto (the fixture's) on a Ray without GPUs means fp32, and is fingerprinted so (the stage
    and the PQ codebook's build both record fp32): the same run with precision fp32 is up to date."""
    manifest, layout, _, _ = run
    recorded = json.loads(layout.stage("label").manifest.read_text())
    assert manifest.label.precision == "auto" and recorded["settings"]["label"]["precision"] == "fp32"
    assert recorded["settings"]["codec"]["precision"] == "fp32"
    before = {p.name: p.stat().st_mtime_ns for p in layout.labels.root.glob("*") if p.is_file()}
    manifest.label.precision = "fp32"
    try:
        again = label.run(manifest)
    finally:
        manifest.label.precision = "auto"
    assert again["fingerprint"] == recorded["fingerprint"] and again["work"] is label.STAGE.nothing_done
    assert {p.name: p.stat().st_mtime_ns for p in layout.labels.root.glob("*") if p.is_file()} == before


def test_dimension_mismatch_is_refused_before_any_work(run, tmp_path):
    manifest, layout, _, _ = run
    good = np.load(layout.concept_embeddings)
    try:
        np.save(layout.concept_embeddings, np.zeros((3, 32), np.float32))
        with pytest.raises(ValueError, match="dim 32"):
            label.run(manifest)
    finally:
        np.save(layout.concept_embeddings, good)


def test_show_draws_proposals_and_pseudo_labels(run, tmp_path):
    import argparse

    from stages import show

    manifest, layout, _, _ = run
    key = read_labels(layout.labels, 1, ["key"]).column("key")[2].as_py()
    result = show.run(manifest, argparse.Namespace(key=key, top=5, out=None))
    path = layout.show_png(key)
    assert result["path"] == str(path) and result["boxes"] == 5
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) >= 640
    out = tmp_path / "x.png"
    show.run(manifest, argparse.Namespace(key=None, top=3, out=str(out)))
    assert out.is_file()


def test_teacher_scale_of_its_own_labels_the_same_boxes(run):
    """label.min_size / max_size set the teacher's input scale apart from the proposals' (128 / 192
    here): the boxes stay the proposals', the embeddings are the teacher's at 96 / 144. Runs last: it
    relabels the module's run."""
    manifest, layout, concepts, _ = run
    assert teacher_scale(manifest) == {"min_size": 128, "max_size": 192}
    small = manifest.model_copy(update={"label": manifest.label.model_copy(update={"min_size": 96, "max_size": 144})})
    assert teacher_scale(small) == {"min_size": 96, "max_size": 144}
    label.run(small)
    rows = read_labels(layout.labels, 0).to_pylist()
    expected = direct(layout, concepts, 0, scale=(96, 144))
    at_proposal_scale = direct(layout, concepts, 0)
    changed = 0
    for row, exp, before in zip(rows, expected, at_proposal_scale):
        probs = torch.softmax(exp["logits"], -1)
        assert row["pseudo_label"] == probs.argmax(-1).tolist()
        np.testing.assert_allclose(row["pseudo_prob"], probs.max(-1).values.numpy(), atol=1e-4)
        changed += int((exp["logits"] - before["logits"]).abs().max() > 1e-3)
    assert changed > 0, "another scale should give other region embeddings"
