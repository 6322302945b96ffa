"""The shard stage: every input format, hostile rows, WebDataset compatibility, reruns."""
from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipeline.layout import RunLayout
from pipeline.readers import read_corpus
from stages import shard
from tests.corpora import (jpeg_bytes, make_coco_captions, make_folder_corpus, make_img2dataset_folder,
                           make_tsv_corpus)


def shard_rows(layout: RunLayout) -> list[dict]:
    rows = []
    for p in sorted(layout.shards.root.glob("[0-9]*.parquet")):
        rows.extend(pq.read_table(p).to_pylist())
    return rows


def tar_samples(layout: RunLayout) -> dict[str, dict]:
    urls = sorted(str(p) for p in layout.shards.root.glob("[0-9]*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}


def assert_balanced(layout: RunLayout, n_in: int) -> list[dict]:
    rows = shard_rows(layout)
    manifest = json.loads(layout.shards.manifest.read_text())
    counts = manifest["counts"]
    samples = tar_samples(layout)
    assert counts["in"] == n_in == len(rows)
    assert counts["written"] == len(samples) == sum(r["status"] == "success" for r in rows)
    assert counts["in"] == counts["written"] + counts["rejected"]
    assert len({r["key"] for r in rows}) == len(rows), "keys must be unique in the run"
    return rows


def test_folder_corpus_with_hostile_rows(ray_local, tmp_path, write_manifest):
    corpus = make_folder_corpus(tmp_path / "corpus")
    m = write_manifest(f"""
        corpus: {{format: folder, path: {tmp_path / 'corpus'}}}
        shard: {{samples_per_shard: 4, max_pixels: 10000000}}
    """)
    shard.run(m)
    layout = RunLayout.of(m)
    rows = assert_balanced(layout, corpus["rows"])
    by_stem = {Path(r["source_id"]).stem: r for r in rows}
    for stem, reason in corpus["expected_rejected"].items():
        assert by_stem[stem]["status"].startswith("failed_"), stem
        assert by_stem[stem]["reason"] == reason, (stem, by_stem[stem]["error_message"])
        assert by_stem[stem]["error_message"].startswith(reason)
    # unusual modes are converted, not rejected
    samples = tar_samples(layout)
    for stem in ["cmyk", "gray", "rgba", "palette", "gray16"]:
        row = by_stem[stem]
        assert row["status"] == "success", (stem, row["error_message"])
        img = Image.open(__import__("io").BytesIO(samples[row["key"]]["jpg"]))
        assert img.mode == "RGB" and img.format == "JPEG"
    meta = json.loads(samples[by_stem["good00"]["key"]]["json"])
    assert meta["caption"] == "a photo of 1 red apples on a table"
    assert (meta["width"], meta["height"]) == (64, 48)
    sizes = json.loads(layout.sizes_json.read_text())
    assert sum(sizes.values()) == len(samples)


def test_cc3m_tsv_with_and_without_header(ray_local, tmp_path, write_manifest):
    for header in (True, False):
        root = tmp_path / f"tsv{header}"
        path = make_tsv_corpus(root, header=header)
        m = write_manifest(f"""
            corpus: {{format: cc3m_tsv, path: {path}}}
            shard: {{samples_per_shard: 3}}
        """, name=f"tsv{header}")
        m.output_dir = str(root / "out")
        shard.run(m)
        rows = assert_balanced(RunLayout.of(m), 8)
        errors = [r["reason"] for r in rows if r["status"] != "success"]
        assert sorted(errors) == ["duplicate_row", "missing_file", "remote_url"]


def test_coco_captions_several_per_image(ray_local, tmp_path, write_manifest):
    path = make_coco_captions(tmp_path / "coco", n_images=3, per_image=3)
    m = write_manifest(f"corpus: {{format: coco_captions, path: {path}, images_root: {path.parent / 'train2017'}}}\n")
    shard.run(m)
    rows = assert_balanced(RunLayout.of(m), 4)     # one row per image (+ the orphan caption's)
    assert sum(r["status"] == "success" for r in rows) == 3
    assert [r["reason"] for r in rows if r["status"] != "success"] == ["unknown_image_id"]
    assert rows[0]["caption"] == "caption 0 of image 0\ncaption 1 of image 0\ncaption 2 of image 0"


def test_several_captions_of_one_image_make_one_sample(tmp_path, write_manifest):
    """Rows naming the same image (adjacent or not) become one row with every caption; a repeated
    (image, caption) pair stays a rejected duplicate; the shard writes one sample whose .txt holds the
    captions one per line, and shard_captions gives one entry per caption."""
    from pipeline.layout import StageDir, sample_key
    from pipeline.shard_writer import ShardOptions, write_shard
    from pipeline.sidecars import shard_captions, shard_samples

    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b"):
        (images / f"{name}.jpg").write_bytes(jpeg_bytes(40, 30, seed=ord(name)))
    (tmp_path / "captions.tsv").write_text("\n".join([
        "caption\turl", "a dog on a sofa\timages/a.jpg", "a red kite\timages/b.jpg",
        "a puppy  sleeping\timages/a.jpg", "a dog on a sofa\timages/a.jpg", "a brown dog\timages/a.jpg"]) + "\n")
    m = write_manifest(f"corpus: {{format: cc3m_tsv, path: {tmp_path / 'captions.tsv'}}}\n")
    rows = read_corpus(m).to_pylist()
    assert [(r["captions"], r["error"]) for r in rows] == [
        ([b"a dog on a sofa", b"a puppy  sleeping", b"a brown dog"], None), ([b"a red kite"], None),
        ([b"a dog on a sofa"], "duplicate_row: same image and caption as captions.tsv:2")]

    import pyarrow as pa
    from pipeline.readers import ROW_SCHEMA, corpus_files
    shards = StageDir(tmp_path / "shards")
    options = ShardOptions(max_side=1333, max_pixels=10**8, min_side=8, jpeg_quality=95, max_caption_chars=2000,
                           key_digits=4, files=corpus_files(m))
    stats = write_shard(0, pa.Table.from_pylist(rows, schema=ROW_SCHEMA), options, shards,
                        shards.root / "00000.tar", "fp")
    assert stats["counts"] == {"in": 3, "written": 2, "rejected": 1}
    samples = dict(shard_samples(shards.root / "00000.tar"))
    assert samples[sample_key(0, 0, 4)]["txt"] == b"a dog on a sofa\na puppy sleeping\na brown dog"
    assert json.loads(samples[sample_key(0, 0, 4)]["json"])["caption"].count("\n") == 2
    keys, captions = shard_captions(shards, 0)
    assert keys == [sample_key(0, 0, 4)] * 3 + [sample_key(0, 1, 4)]
    assert captions == ["a dog on a sofa", "a puppy sleeping", "a brown dog", "a red kite"]


def test_img2dataset_input_and_our_shards_round_trip(ray_local, tmp_path, write_manifest):
    folder = make_img2dataset_folder(tmp_path / "i2d")
    m = write_manifest(f"corpus: {{format: img2dataset, path: {folder}}}\n")
    shard.run(m)
    rows = assert_balanced(RunLayout.of(m), 6)
    rejected = sorted(r["reason"] for r in rows if r["status"] != "success")
    assert rejected == ["unsafe_tar_member", "unsafe_tar_member"]
    assert not (tmp_path / "evil.jpg").exists()

    # Our own shards are valid img2dataset output: shard them again, same captions and pixels.
    m2 = write_manifest(f"corpus: {{format: img2dataset, path: {RunLayout.of(m).shards.root}}}\n", name="again")
    m2.output_dir = str(tmp_path / "again")
    shard.run(m2)
    first, second = tar_samples(RunLayout.of(m)), tar_samples(RunLayout.of(m2))
    assert sorted(s["txt"] for s in first.values()) == sorted(s["txt"] for s in second.values())
    assert sorted(s["jpg"] for s in first.values()) == sorted(s["jpg"] for s in second.values())


def test_truncated_tar_is_reported_not_fatal(ray_local, tmp_path, write_manifest):
    folder = make_img2dataset_folder(tmp_path / "i2d", n=6, unsafe=False)
    tar = folder / "00000.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    m = write_manifest(f"corpus: {{format: img2dataset, path: {folder}}}\n")
    rows_in = read_corpus(m).num_rows
    shard.run(m)
    rows = assert_balanced(RunLayout.of(m), rows_in)
    reasons = [r["reason"] for r in rows if r["status"] != "success"]
    assert "truncated_tar" in reasons
    assert sum(r["status"] == "success" for r in rows) >= 1


def test_resize_only_oversized_and_keep_original_bytes(ray_local, tmp_path, write_manifest):
    corpus = tmp_path / "c"
    corpus.mkdir()
    small = jpeg_bytes(100, 80, seed=1)
    (corpus / "small.jpg").write_bytes(small)
    (corpus / "small.txt").write_text("small")
    (corpus / "big.jpg").write_bytes(jpeg_bytes(400, 200, seed=2))
    (corpus / "big.txt").write_text("big")
    m = write_manifest(f"corpus: {{format: folder, path: {corpus}}}\nshard: {{max_side: 200}}\n")
    shard.run(m)
    layout = RunLayout.of(m)
    by_caption = {s["txt"].decode(): s for s in tar_samples(layout).values()}
    assert by_caption["small"]["jpg"] == small
    meta = json.loads(by_caption["big"]["json"])
    assert (meta["width"], meta["height"], meta["original_width"]) == (200, 100, 400)


def test_rerun_is_a_no_op_and_settings_change_rewrites(ray_local, tmp_path, write_manifest):
    make_folder_corpus(tmp_path / "corpus", n_good=5, hostile=False)
    m = write_manifest(f"corpus: {{format: folder, path: {tmp_path / 'corpus'}}}\nshard: {{samples_per_shard: 2}}\n")
    first = shard.run(m)
    layout = RunLayout.of(m)
    mtimes = {p.name: p.stat().st_mtime_ns for p in layout.shards.root.iterdir()}
    again = shard.run(m)
    assert again["fingerprint"] == first["fingerprint"]
    assert {p.name: p.stat().st_mtime_ns for p in layout.shards.root.glob("[0-9]*")} == \
        {k: v for k, v in mtimes.items() if k[0].isdigit()}
    m.shard.jpeg_quality = 80
    changed = shard.run(m)
    assert changed["fingerprint"] != first["fingerprint"]


def test_a_copied_synthetic_run_folder_is_up_to_date(ray_local, tmp_path, write_manifest):
    # The synthetic world lives inside the run folder; a copy (or a move) of the folder must not re-shard.
    import shutil

    from pipeline.config import load_manifest

    from stages import synth

    m = write_manifest("corpus: {format: synthetic}\nsynth: {num_images: 6, num_val_images: 2}\n"
                       "shard: {samples_per_shard: 4}\n")
    synth.run(m)
    first = shard.run(m)
    shutil.copytree(tmp_path / "out", tmp_path / "moved")
    moved = load_manifest(tmp_path / "t.yaml", [f"output_dir={tmp_path / 'moved'}"])
    tars = {p.name: p.stat().st_mtime_ns for p in RunLayout.of(moved).shards.root.glob("[0-9]*.tar")}
    assert synth.run(moved)["work"] is False          # the world and its manifest came along
    again = shard.run(moved)
    assert again["fingerprint"] == first["fingerprint"] and len(tars) == 2
    assert {p.name: p.stat().st_mtime_ns for p in RunLayout.of(moved).shards.root.glob("[0-9]*.tar")} == tars


def test_run_stops_at_the_first_failing_stage_with_its_status(tmp_path, write_manifest, capfd):
    from stages.cli import main

    m = write_manifest(f"corpus: {{format: folder, path: {tmp_path / 'missing'}}}\n")
    assert main(["run", str(m.source_path)]) == 1        # shard (its own process) cannot read the corpus
    err = capfd.readouterr().err
    assert "corpus.path" in err and "stage shard exited with status 1" in err
    assert not (tmp_path / "out" / "concepts").exists()  # nothing after it ran


def test_shards_open_with_tarfile_and_members_follow_conventions(ray_local, tmp_path, write_manifest):
    make_folder_corpus(tmp_path / "corpus", n_good=3, hostile=False)
    m = write_manifest(f"corpus: {{format: folder, path: {tmp_path / 'corpus'}}}\n")
    shard.run(m)
    with tarfile.open(RunLayout.of(m).shard_tar(0)) as tar:
        names = tar.getnames()
        assert all(t.mtime == 0 for t in tar.getmembers())
    assert sorted(names[:3]) == ["000000000.jpg", "000000000.json", "000000000.txt"]


def test_manifest_errors_name_the_field(tmp_path):
    from pipeline.config import ManifestError, load_manifest

    path = tmp_path / "bad.yaml"
    path.write_text("name: x\noutput_dir: o\nshard: {max_sied: 10}\n")
    with pytest.raises(ManifestError, match=r"shard\.max_sied: unknown key"):
        load_manifest(path)
    path.write_text("name: x\noutput_dir: o\ncorpus: {format: tsv}\n")
    with pytest.raises(ManifestError, match=r"corpus\.format"):
        load_manifest(path)
    path.write_text("name: x\noutput_dir: o\nray: {dashboard_host: 0.0.0.0}\n")
    with pytest.raises(ManifestError, match=r"ray: .*loopback"):
        load_manifest(path)
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\noutput_dir: o\n")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(path)


def test_every_shipped_manifest_validates():
    from pipeline.config import load_manifest

    from tests.conftest import REPO

    paths = sorted((REPO / "manifests").glob("*.yaml"))
    assert paths
    for path in paths:
        if path.name.startswith("ray-cluster"):
            continue
        assert load_manifest(path).name


def letterboxed_jpeg(seed: int, size: int = 256) -> bytes:
    """A photo as img2dataset's defaults store it (--resize_mode border): fitted into a size x size
    square, padded with white bands above and below."""
    photo = Image.open(io.BytesIO(jpeg_bytes(size, size * 3 // 5, seed=seed)))
    square = Image.new("RGB", (size, size), (255, 255, 255))
    square.paste(photo, (0, (size - photo.height) // 2))
    buf = io.BytesIO()
    square.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_shard_warns_once_when_most_images_are_far_below_scale_or_letterboxed(ray_local, tmp_path, write_manifest,
                                                                               caplog):
    from pipeline.shard_writer import looks_letterboxed

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"boxed{i}.jpg").write_bytes(letterboxed_jpeg(seed=i))
        (corpus / f"plain{i}.jpg").write_bytes(jpeg_bytes(300, 200, seed=10 + i))
        for stem in (f"boxed{i}", f"plain{i}"):
            (corpus / f"{stem}.txt").write_text("a dog on a sofa")
    assert looks_letterboxed(Image.open(corpus / "boxed0.jpg").convert("RGB"))
    assert not looks_letterboxed(Image.open(corpus / "plain0.jpg").convert("RGB"))

    def shard_at(min_size: int, name: str):
        m = write_manifest(f"""
            corpus: {{format: folder, path: {corpus}}}
            shard: {{samples_per_shard: 4}}
            pretrain: {{min_size: {min_size}, max_size: {min_size * 5 // 3}}}
        """, name=name)
        m.output_dir = str(tmp_path / name)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="stages.shard"):
            counts = shard.run(m)["image_scale"]
        return counts, [r.getMessage() for r in caplog.records if "training scale" in r.getMessage()]

    # At the paper's 800 px every image is enlarged 2.7x or more: one warning over both shards, with counts.
    counts, warned = shard_at(800, "paper")
    assert counts == {"images": 6, "far_below_scale": 6, "letterboxed": 3}
    assert len(warned) == 1 and warned[0].startswith("shard: 6 of 6 images are far below") \
        and "and 3 look letterboxed" in warned[0] and "--resize_mode keep_ratio" in warned[0]
    # At 256 px none is far below, and 3 of 6 letterboxed is not most of them: no warning.
    counts, warned = shard_at(256, "small")
    assert counts == {"images": 6, "far_below_scale": 0, "letterboxed": 3} and warned == []
