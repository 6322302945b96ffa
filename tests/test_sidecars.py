"""pipeline/sidecars.py: every run-folder format round-trips through its writer and reader, and the one
shard-tar reader streams samples, skips unsafe members and reports a tar that breaks off."""
from __future__ import annotations

import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.layout import StageDir, sample_key
from pipeline.sidecars import (CAPTION_CONCEPTS_SCHEMA, CAPTION_NOUNS_SCHEMA, CONCEPT_POOL_SCHEMA,
                               KEYED_ROW_GROUP_BYTES, KEYED_ROW_GROUP_ROWS, PROPOSALS_SCHEMA, REGION_IDS_SCHEMA, SHARD_ROWS_SCHEMA,
                               DamagedTarError, KeyedRows, Proposals, ShardSidecarReader,
                               labels_schema, read_caption_concepts, read_caption_embeddings, read_caption_nouns,
                               read_concept_names, read_labels, read_proposals, read_region_ids, read_region_labels,
                               read_shard_images, shard_captions, shard_of_key, shard_samples, sidecar_shards,
                               write_caption_concepts, write_caption_embeddings, write_caption_nouns,
                               labels_writer, write_concept_pool, write_labels, write_proposals, write_region_ids,
                               write_shard_rows, written_keys)
from tests.corpora import add_tar_member


def test_shard_rows_round_trip(tmp_path):
    shards = StageDir(tmp_path / "shards")
    rows = [{"key": sample_key(3, 0), "caption": "two kites", "status": "success", "error_message": None,
             "width": 64, "height": 48, "bytes": 1234},
            {"key": sample_key(3, 1), "caption": "", "status": "failed_caption", "reason": "empty_caption",
             "error_message": "empty_caption"},
            {"key": sample_key(3, 2), "caption": "a cup", "status": "success", "width": 32, "height": 40}]
    path = write_shard_rows(shards, 3, rows)
    assert path == shards.parquet(3) and pq.read_schema(path).equals(SHARD_ROWS_SCHEMA)
    assert written_keys(shards, 3) == [{"key": "000030000", "width": 64, "height": 48},
                                       {"key": "000030002", "width": 32, "height": 40}]
    assert shard_captions(shards, 3) == (["000030000", "000030002"], ["two kites", "a cup"])
    # an image with several captions (one per line): one entry per caption, the key repeated
    rows[2]["caption"] = "a cup\na mug on a desk"
    write_shard_rows(shards, 3, rows)
    assert shard_captions(shards, 3) == (["000030000", "000030002", "000030002"],
                                         ["two kites", "a cup", "a mug on a desk"])
    assert shard_of_key("000030002") == 3 and sidecar_shards(shards) == [3]


def test_concept_pool_and_caption_concepts_round_trip(tmp_path):
    pool = [{"concept_id": 1, "name": "kite", "count": 3, "source": "corpus"},
            {"concept_id": 0, "name": "cup", "count": 5, "source": "corpus"},
            {"concept_id": 2, "name": "hot dog", "count": 0, "source": "vocabulary"}]
    write_concept_pool(tmp_path / "concepts.parquet", pool)
    assert pq.read_schema(tmp_path / "concepts.parquet").equals(CONCEPT_POOL_SCHEMA)
    assert read_concept_names(tmp_path / "concepts.parquet") == ["cup", "kite", "hot dog"]  # by concept_id
    write_concept_pool(tmp_path / "gap.parquet", pool[:1])
    with pytest.raises(ValueError, match="not dense"):
        read_concept_names(tmp_path / "gap.parquet")

    captions = StageDir(tmp_path / "captions")
    keys, nouns = ["000000000", "000000001"], [["kite", "kite", "sky"], []]
    write_caption_nouns(captions, 0, keys, nouns)
    assert pq.read_schema(captions.parquet(0)).equals(CAPTION_NOUNS_SCHEMA)
    assert read_caption_nouns(captions, 0) == (keys, nouns)
    write_caption_concepts(captions, 0, *read_caption_nouns(captions, 0), [[1], []])
    assert pq.read_schema(captions.parquet(0)).equals(CAPTION_CONCEPTS_SCHEMA)
    assert read_caption_nouns(captions, 0) == (keys, nouns)
    assert read_caption_concepts(captions, 0) == {"000000000": [1], "000000001": []}
    # several captions of one key (one row each): the concepts any of them names
    write_caption_concepts(captions, 1, ["000010000"] * 3, [["kite"], ["cup", "kite"], []], [[1], [0, 1], []])
    assert read_caption_concepts(captions, 1) == {"000010000": [1, 0]}


def test_caption_embeddings_round_trip_and_bad_rows_read_as_nan(tmp_path):
    import pyarrow as pa

    sidecars = StageDir(tmp_path)
    emb = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float16)
    write_caption_embeddings(sidecars, 1, ["a", "b", "c"], emb)
    keys, back = read_caption_embeddings(sidecars, 1)
    assert keys == ["a", "b", "c"] and back.dtype == np.float16 and np.array_equal(back, emb)
    # A hand-made sidecar with a null row and a short row (a list column, not fixed-size).
    pq.write_table(pa.table({"key": ["a", "b", "c"], "embedding": pa.array(
        [emb[0].tolist(), None, emb[2, :4].tolist()], pa.list_(pa.float16()))}), sidecars.parquet(2))
    keys, back = read_caption_embeddings(sidecars, 2)
    assert np.array_equal(back[0], emb[0]) and np.isnan(back[1]).all() and np.isnan(back[2]).all()


def _proposals(key: str, n: int, seed: int) -> Proposals:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 30, (n, 2)).astype(np.float32)
    return Proposals(key, 64, 48, np.concatenate([xy, xy + 10], 1), np.sort(rng.standard_normal(n))[::-1].astype(np.float32))


def test_proposals_round_trip_and_a_damaged_row_is_an_error_or_a_skip(tmp_path):
    import pyarrow as pa

    stage = StageDir(tmp_path / "proposals")
    rows = [_proposals("k0", 5, 0), _proposals("k1", 0, 1), _proposals("k2", 2, 2)]
    write_proposals(stage, 0, rows)
    assert pq.read_schema(stage.parquet(0)).equals(PROPOSALS_SCHEMA)
    back = read_proposals(stage, 0)
    assert list(back) == ["k0", "k1", "k2"]
    for r in rows:
        b = back[r.key]
        assert (b.width, b.height) == (64, 48) and b.boxes.shape == (len(r.boxes), 4)
        assert np.array_equal(b.boxes, r.boxes) and np.array_equal(b.objectness, r.objectness)
    table = pq.read_table(stage.parquet(0)).to_pydict()
    table["boxes"][2] = [float("nan")] + table["boxes"][2][1:]
    table["width"][1] = 0
    pq.write_table(pa.table(table, schema=PROPOSALS_SCHEMA), stage.parquet(0))
    with pytest.raises(ValueError, match=r"key k1: no image size"):
        read_proposals(stage, 0)
    assert list(read_proposals(stage, 0, skip_damaged=True)) == ["k0"]


@pytest.mark.parametrize("store_flipped", [False, True])
def test_labels_round_trip_as_a_table_and_as_region_targets(tmp_path, store_flipped):
    stage = StageDir(tmp_path / "labels")
    columns = {"key": ["k0", "k1"], "num_regions": [2, 0], "pseudo_label": [[3, 1], []],
               "pseudo_prob": [[0.5, 0.25], []], "region_codes": [b"\x01\x02\x03\x04", b""],
               "image_code": [b"\x05\x06", b"\x07\x08"], "image_pseudo_label": [3, 0]}
    if store_flipped:
        columns.update(flipped_region_codes=[b"\x09\x0a\x0b\x0c", b""], flipped_image_code=[b"\x00\x01", b"\x02\x03"])
    write_labels(stage, 4, columns, store_flipped)
    assert pq.read_schema(stage.parquet(4)).equals(labels_schema(store_flipped))
    assert read_labels(stage, 4).to_pydict() == columns
    targets = read_region_labels(stage, 4)
    assert list(targets) == ["k0", "k1"]
    k0 = targets["k0"]
    assert k0.pseudo_label.tolist() == [3, 1] and k0.pseudo_label.dtype == np.int64
    assert k0.pseudo_prob.tolist() == [0.5, 0.25] and k0.region_codes == b"\x01\x02\x03\x04"
    assert k0.flipped_region_codes == (b"\x09\x0a\x0b\x0c" if store_flipped else None)
    assert targets["k1"].pseudo_label.size == 0


def test_the_keyed_reader_gives_every_row_of_a_large_shard_within_its_cache(tmp_path):
    """The trainer's reader by key on a shard of 300 images (several row groups per file): each key's
    proposals, targets and captions equal the whole-file readers'; a file within the cache is decoded once,
    and a reader never holds more than its cache (one row group at least)."""
    n = 300
    keys = [sample_key(0, i) for i in range(n)]
    rng = np.random.default_rng(0)
    proposals, labels, captions = StageDir(tmp_path / "p"), StageDir(tmp_path / "l"), StageDir(tmp_path / "c")
    write_proposals(proposals, 0, [_proposals(k, 1 + i % 7, i) for i, k in enumerate(keys)])
    counts = [1 + i % 7 for i in range(n)]
    write_labels(labels, 0, {
        "key": keys, "num_regions": counts, "pseudo_label": [list(range(c)) for c in counts],
        "pseudo_prob": [[0.5] * c for c in counts], "region_codes": [bytes([i % 256]) * 2 * c for i, c in enumerate(counts)],
        "image_code": [b"\x00\x01"] * n, "image_pseudo_label": [0] * n}, False)
    caption_keys = [keys[0]] * 3 + keys[1:]                 # the first image has three captions
    emb = rng.standard_normal((len(caption_keys), 8)).astype(np.float16)
    emb[5, 2] = np.nan                                       # a damaged caption row is left out
    write_caption_embeddings(captions, 0, caption_keys, emb)
    for stage in (proposals, labels, captions):
        groups = pq.ParquetFile(stage.parquet(0)).metadata
        assert groups.num_row_groups >= 4 and max(groups.row_group(g).num_rows
                                                  for g in range(groups.num_row_groups)) <= KEYED_ROW_GROUP_ROWS
    reader = ShardSidecarReader(captions.parquet(0), proposals.parquet(0), labels.parquet(0))
    whole_p, whole_l = read_proposals(proposals, 0), read_region_labels(labels, 0)
    for i in rng.permutation(n):                             # the trainer's order: random within the shard
        key = keys[i]
        p, lab = reader.proposals(key), reader.labels(key)
        assert np.array_equal(p.boxes, whole_p[key].boxes) and np.array_equal(p.objectness, whole_p[key].objectness)
        assert lab.pseudo_label.tolist() == whole_l[key].pseudo_label.tolist()
        assert lab.region_codes == whole_l[key].region_codes
        want = [emb[j] for j, k in enumerate(caption_keys) if k == key and np.isfinite(emb[j]).all()]
        assert [c.tolist() for c in reader.captions(key)] == [w.tolist() for w in want]
    for rows in (reader._proposals, reader._labels, reader._captions):
        assert rows.group_reads == rows.file.num_row_groups          # each group decoded once
    small = KeyedRows(labels.parquet(0), ["key", "pseudo_label"], cache_bytes=1)
    for i in rng.permutation(n):                             # at most the cache: here one group
        assert small.table(keys[i])["key"].to_pylist() == [keys[i]] and len(small.groups) == 1
    assert len(reader.captions(keys[0])) == 3 and reader.captions(keys[3]) == []   # caption row 5 is keys[3]
    assert reader.proposals("absent") is None and reader.labels("absent") is None and reader.captions("absent") == []
    missing = ShardSidecarReader(tmp_path / "none.parquet")
    assert missing.captions(keys[0]) == [] and missing.proposals(keys[0]) is None


@pytest.mark.parametrize("streamed", [False, True])
def test_row_groups_of_large_rows_stay_small_enough_to_read_one_row(tmp_path, streamed):
    """Rows of 1 MiB of region codes (an RN50's fp16 codes are 600 kB): about KEYED_ROW_GROUP_BYTES per
    row group instead of 64 rows, from the whole-file writer and the streamed one alike; rows unchanged."""
    n, stage = 20, StageDir(tmp_path / "l")
    columns = {"key": [sample_key(0, i) for i in range(n)], "num_regions": [1] * n, "pseudo_label": [[i] for i in range(n)],
               "pseudo_prob": [[0.5]] * n, "region_codes": [bytes([i]) * (1 << 20) for i in range(n)],
               "image_code": [b"\x00"] * n, "image_pseudo_label": [0] * n}
    if streamed:
        with labels_writer(stage, 0, False) as write:
            write({k: v[:12] for k, v in columns.items()})
            write({k: v[12:] for k, v in columns.items()})
    else:
        write_labels(stage, 0, columns, False)
    meta = pq.ParquetFile(stage.parquet(0)).metadata
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    assert sum(sizes) == n and 1 < max(sizes) <= KEYED_ROW_GROUP_BYTES >> 20   # 64 rows if by rows alone
    assert read_labels(stage, 0).to_pydict() == columns


def test_region_ids_round_trip(tmp_path):
    write_region_ids(tmp_path / "regions.parquet", ["k0", "k0", "k2"], [0, 1, 0])
    table = read_region_ids(tmp_path / "regions.parquet")
    assert table.schema.equals(REGION_IDS_SCHEMA)
    assert table.to_pydict() == {"key": ["k0", "k0", "k2"], "region": [0, 1, 0]}


# -- the shard-tar reader --------------------------------------------------------------------------------

def _shard_tar(path, n: int = 3, extra=()) -> dict:
    """A WebDataset tar of n samples (jpg, txt, json) written by webdataset itself; returns its samples."""
    import webdataset as wds

    samples = {sample_key(0, i): {"jpg": bytes([i]) * 40, "txt": f"caption {i}".encode(), "json": b"{}"}
               for i in range(n)}
    with open(path, "wb") as stream, wds.TarWriter(stream) as sink:
        for key, members in samples.items():
            sink.write({"__key__": key, **members})
    return samples


def test_shard_samples_reads_what_webdataset_wrote_in_order(tmp_path):
    samples = _shard_tar(tmp_path / "00000.tar")
    assert list(shard_samples(tmp_path / "00000.tar")) == list(samples.items())
    images = read_shard_images(tmp_path / "00000.tar", ["000000002", "000000000"])
    assert images == {"000000000": samples["000000000"]["jpg"], "000000002": samples["000000002"]["jpg"]}
    with pytest.raises(FileNotFoundError, match="000000009"):
        read_shard_images(tmp_path / "00000.tar", ["000000009"])


def test_shard_samples_skips_links_and_names_outside_the_tar(tmp_path):
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        add_tar_member(tar, "000000000.jpg", b"image")
        add_tar_member(tar, "000000000.TXT", b"a kite")
        add_tar_member(tar, "../000000001.jpg", b"outside")
        add_tar_member(tar, "/abs/000000002.jpg", b"absolute")
        link = tarfile.TarInfo("000000003.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        add_tar_member(tar, "noextension", b"?")
    assert list(shard_samples(path)) == [("000000000", {"jpg": b"image", "txt": b"a kite"})]
    assert not (tmp_path.parent / "000000001.jpg").exists()


def test_a_tar_that_breaks_off_keeps_its_complete_samples_and_says_so(tmp_path):
    samples = _shard_tar(tmp_path / "00000.tar", n=4)
    data = (tmp_path / "00000.tar").read_bytes()
    with tarfile.open(tmp_path / "00000.tar") as tar:
        members = tar.getmembers()
    cases = {"inside a member": members[7].offset_data + 5,            # third sample's json
             "at a member boundary": members[9].offset,                 # before the fourth sample
             "before the end marker": members[-1].offset_data + 512}    # every member, no zero blocks
    for case, cut in cases.items():
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        read = []
        with pytest.raises(DamagedTarError, match="cut.tar"):
            for key, members_of_key in shard_samples(tmp_path / "cut.tar"):
                read.append(key)
                assert members_of_key == samples[key]        # a sample is yielded only when complete
        assert read == list(samples)[:len(read)] and len(read) == {"inside a member": 2,
                                                                    "at a member boundary": 2,
                                                                    "before the end marker": 3}[case], case


def test_the_shard_index_reads_the_samples_shard_samples_yields(tmp_path):
    from pipeline.sidecars import ShardIndex

    samples = _shard_tar(tmp_path / "00000.tar", n=4)
    index = ShardIndex(tmp_path / "00000.tar")
    assert index.damaged is None and index.keys == list(samples)
    assert [index.sample(i) for i in (3, 0, 2, 1)] == [samples[k] for k in (list(samples)[i] for i in (3, 0, 2, 1))]
    data = (tmp_path / "00000.tar").read_bytes()
    with tarfile.open(tmp_path / "00000.tar") as tar:
        members = tar.getmembers()
    for cut, kept in ((members[7].offset_data + 5, 2), (members[9].offset, 2), (members[-1].offset_data + 512, 3),
                      (len(data) // 2, None)):
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        streamed = []
        with pytest.raises(DamagedTarError):
            for sample in shard_samples(tmp_path / "cut.tar"):
                streamed.append(sample)
        index = ShardIndex(tmp_path / "cut.tar")
        assert "cut.tar" in index.damaged and len(index) == len(streamed) == (kept or len(streamed))
        assert [(k, index.sample(i)) for i, k in enumerate(index.keys)] == streamed


def test_the_pretrain_reader_counts_a_broken_tar_and_keeps_its_samples(tmp_path):
    from tests.pretrain_world import make_world
    from trainer.data.pretrain_stream import DataOptions, PretrainStream, shard_sources

    w = make_world(tmp_path, num_shards=1, per_shard=6)
    tar = w["layout"].shard_tar(0)
    with tarfile.open(tar) as t:
        cut = t.getmembers()[3 * 3].offset  # before the fourth sample's first member
    tar.write_bytes(tar.read_bytes()[:cut])
    it = iter(PretrainStream(shard_sources(w["layout"], [0]), DataOptions(batch_size=1, min_size=64, max_size=96,
                                                                         regions_per_image=4)))
    # one epoch: the first two samples (the third may be cut off: the end-of-archive marker is missing)
    batches = [next(it) for _ in range(2)]
    assert sorted(k for b in batches for k in b["keys"]) == w["keys"][:2]
    assert batches[-1]["_skipped"] == {"truncated_tar": 1}
