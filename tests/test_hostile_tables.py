"""Hostile corpus tables and files (round three): a caption table or COCO captions file of the wrong
shape is a clear error naming the file and the setting, or a rejected row, never a traceback; text
details (a byte order mark, a CR inside a caption, a file name that is not UTF-8) are read as meant; the
run folder is never read as corpus; and every per-row path is linear (100,000 captions of one image)."""
from __future__ import annotations

import json
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.readers import CorpusError, read_corpus
from pipeline.sidecars import SUCCESS
from tests.corpora import jpeg_bytes
from tests.test_hostile_corpus import deadline, reasons, shard_all


def picture(folder, name: str | bytes, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    path = os.path.join(os.fsencode(folder), name if isinstance(name, bytes) else name.encode())
    with open(path, "wb") as f:
        f.write(jpeg_bytes(24, 16, seed=seed))
    return path


# -- Parquet caption tables ----------------------------------------------------------------------------------

@pytest.mark.parametrize("columns,message", [
    ({"caption": pa.array([1, 2]), "url": pa.array(["a.jpg", "b.jpg"])},
     "column 'caption' (corpus.caption_column) holds int64, not text or a list of texts"),
    ({"caption": pa.array(["a", "b"])}, "has no column 'url' (corpus.url_column); its columns: caption"),
    ({"caption": pa.array(["a", "b"]), "url": pa.array([[1], [2]])},
     "column 'url' (corpus.url_column) holds list<element: int64>, not text"),
    ({"caption": pa.array([{"x": 1}, {"x": 2}]), "url": pa.array(["a.jpg", "b.jpg"])}, "holds struct<x: int64>"),
])
def test_a_parquet_table_of_the_wrong_shape_is_an_error_naming_the_file_and_setting(tmp_path, write_manifest,
                                                                                    columns, message):
    path = tmp_path / "captions.parquet"
    pq.write_table(pa.table(columns), path)
    with pytest.raises(CorpusError) as err:
        read_corpus(write_manifest(f"corpus: {{format: cc3m_tsv, path: {path}}}\n"))
    assert f"corpus.path: {path}" in str(err.value) and message in str(err.value)


def test_a_parquet_file_that_is_not_parquet_is_an_error_naming_it(tmp_path, write_manifest):
    path = tmp_path / "captions.parquet"
    path.write_bytes(b"PAR1 but not really" * 10)
    with pytest.raises(CorpusError, match=f"corpus.path: {path} is not a readable Parquet file"):
        read_corpus(write_manifest(f"corpus: {{format: cc3m_tsv, path: {path}}}\n"))


def test_parquet_lists_of_captions_binary_urls_and_nulls_are_rows(tmp_path, write_manifest):
    picture(tmp_path / "images", "a.jpg", 1)
    picture(tmp_path / "images", b"caf\xe9.jpg", 2)                       # a Latin-1 file name
    path = tmp_path / "captions.parquet"
    pq.write_table(pa.table({"caption": pa.array([["a red kite", "a kite", None], ["a cafe"], None]),
                             "url": pa.array([b"images/a.jpg", b"images/caf\xe9.jpg", None])}), path)
    records = shard_all(write_manifest(f"corpus: {{format: cc3m_tsv, path: {path}}}\n"))
    assert [(r["status"], r["caption"]) for r in records][:2] == [(SUCCESS, "a red kite\na kite"), (SUCCESS, "a cafe")]
    assert records[2]["status"] != SUCCESS


# -- TSV and CSV text -----------------------------------------------------------------------------------------

def test_a_byte_order_mark_before_the_header_is_not_a_row(tmp_path, write_manifest):
    picture(tmp_path, "a.jpg")
    path = tmp_path / "captions.tsv"
    path.write_bytes(b"\xef\xbb\xbfcaption\turl\na kite in the sky\ta.jpg\n")
    records = shard_all(write_manifest(f"corpus: {{format: cc3m_tsv, path: {path}}}\n"))
    assert [(r["source_id"], r["status"]) for r in records] == [("captions.tsv:2", SUCCESS)]


@pytest.mark.parametrize("suffix,delimiter", [(".tsv", b"\t"), (".csv", b",")])
def test_a_lone_cr_inside_a_caption_does_not_split_the_row_and_crlf_ends_one(tmp_path, write_manifest, suffix,
                                                                              delimiter):
    picture(tmp_path, "a.jpg", 1)
    picture(tmp_path, "b.jpg", 2)
    path = tmp_path / f"captions{suffix}"
    path.write_bytes(b"caption" + delimiter + b"url\r\n" + b"a red\rkite" + delimiter + b"a.jpg\r\n"
                     + b"a blue kite" + delimiter + b"b.jpg\n")
    records = shard_all(write_manifest(f"corpus: {{format: cc3m_tsv, path: {path}}}\n"))
    assert [(r["status"], r["caption"]) for r in records] == [(SUCCESS, "a red kite"), (SUCCESS, "a blue kite")]


def test_a_file_name_that_is_not_utf8_is_found(tmp_path, write_manifest):
    corpus = tmp_path / "corpus"
    picture(corpus, b"caf\xe9.jpg", 1)
    picture(corpus, "plain.jpg", 2)
    path = corpus / "captions.tsv"
    path.write_bytes(b"caption\turl\na cafe\tcaf\xe9.jpg\na plain picture\tplain.jpg\n")
    records = shard_all(write_manifest(f"corpus: {{format: cc3m_tsv, path: {path}}}\n", name="tsv"))
    assert [r["status"] for r in records] == [SUCCESS, SUCCESS]
    assert records[0]["url"].startswith("file://") and records[0]["url"].endswith("/caf%E9.jpg")
    folder = tmp_path / "folder"
    picture(folder, b"caf\xe9.jpg", 1)
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.txt"), "wb") as f:
        f.write(b"a cafe")
    manifest = write_manifest(f"corpus: {{format: folder, path: {folder}}}\n", name="folder")
    manifest.output_dir = str(tmp_path / "folder-run")
    assert [(r["source_id"], r["status"]) for r in shard_all(manifest)] == [("caf\\xe9.jpg", SUCCESS)]


# -- COCO captions files --------------------------------------------------------------------------------------

@pytest.mark.parametrize("content,message", [
    (b'{"images": [', "is not valid JSON"),
    (b'[{"id": 1}]', "a COCO captions file is a JSON object with images and annotations, not a list"),
    (b'{"images": {}, "annotations": []}', "'images' must be a list (got dict)"),
    (b'{"images": []}', "'annotations' must be a list (got NoneType)"),
    (b'\xff\xfe{}', "is not UTF-8 text"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
])
def test_a_coco_file_of_the_wrong_shape_is_an_error_naming_it(tmp_path, write_manifest, content, message):
    path = tmp_path / "captions.json"
    path.write_bytes(content)
    with pytest.raises(CorpusError) as err:
        read_corpus(write_manifest(f"corpus: {{format: coco_captions, path: {path}}}\n"))
    assert f"corpus.path: {path}" in str(err.value) and message in str(err.value)


def test_coco_records_of_the_wrong_type_are_rejected_rows(tmp_path, write_manifest):
    picture(tmp_path, "1.jpg", 1)
    picture(tmp_path, "2.jpg", 2)
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": 7}, {"id": "3", "file_name": "2.jpg"},
                   "not an image", {"id": 4, "file_name": "1.jpg"}, {"id": 4, "file_name": "2.jpg"}],
        "annotations": [{"id": 10, "image_id": 1, "caption": "a kite"},
                        {"id": 11, "image_id": 1, "caption": ["a", "list"]},
                        {"id": 12, "image_id": "1", "caption": "an id of text"},
                        {"id": 13, "image_id": 2, "caption": "a file name of a number"},
                        {"id": 14, "image_id": 3, "caption": "an image id nobody has"},
                        {"id": 15, "image_id": 4, "caption": "an image listed twice"},
                        {"image_id": 1, "caption": "no id"}, 42, None]}))
    records = shard_all(write_manifest(f"corpus: {{format: coco_captions, path: {path}}}\n"))
    assert reasons(records) == {"coco:10": "success", "coco:13": "malformed_annotation",
                                "coco:14": "unknown_image_id", "coco:15": "malformed_annotation",
                                "coco:11": "malformed_annotation", "coco:12": "malformed_annotation",
                                "coco:#6": "malformed_annotation", "coco:#7": "malformed_annotation",
                                "coco:#8": "malformed_annotation"}
    messages = {r["source_id"]: r["error_message"] for r in records}
    assert "caption must be text (got list)" in messages["coco:11"]
    assert "image 2 has no file_name text (got int)" in messages["coco:13"]
    assert "listed twice with different file names" in messages["coco:15"]


# -- the run folder is never corpus ---------------------------------------------------------------------------

@pytest.mark.parametrize("corpus_format", ["folder", "img2dataset"])
def test_an_output_dir_and_a_corpus_folder_that_overlap_are_refused(tmp_path, write_manifest, corpus_format):
    corpus = tmp_path / "corpus"
    picture(corpus, "a.jpg")
    (corpus / "a.txt").write_text("a picture")
    for output_dir in (corpus / "run", corpus):
        manifest = write_manifest(f"corpus: {{format: {corpus_format}, path: {corpus}}}\n")
        manifest.output_dir = str(output_dir)
        with pytest.raises(CorpusError, match="the run folder is inside the corpus folder, .* put output_dir outside"):
            read_corpus(manifest)
    beside = write_manifest(f"corpus: {{format: {corpus_format}, path: {corpus}}}\n")
    beside.output_dir = str(tmp_path / "corpus-run")          # a sibling whose name starts the same
    assert read_corpus(beside).num_rows == 1
    around = write_manifest(f"corpus: {{format: {corpus_format}, path: {corpus}}}\n")
    around.output_dir = str(tmp_path)                          # e.g. corpus.path: <output_dir>/shards
    with pytest.raises(CorpusError, match="the corpus folder is inside the run folder"):
        read_corpus(around)


# -- linear per-row paths ---------------------------------------------------------------------------------------

def test_a_hundred_thousand_captions_of_one_image_are_read_and_sharded_in_linear_time(tmp_path, write_manifest):
    """A quadratic merge or duplicate check takes minutes here (5e9 comparisons); linear is about a second."""
    picture(tmp_path, "one.jpg")
    n = 100_000
    table = tmp_path / "captions.tsv"
    table.write_text("caption\turl\n" + "".join(f"caption number {i}\tone.jpg\n" for i in range(n)))
    listed = tmp_path / "listed.parquet"
    pq.write_table(pa.table({"caption": [[f"caption number {i}" for i in range(n)]], "url": ["one.jpg"]}), listed)
    started = time.perf_counter()
    with deadline(60):
        for path, name in ((table, "rows"), (listed, "list")):
            manifest = write_manifest(f"corpus: {{format: cc3m_tsv, path: {path}}}\n", name=name)
            manifest.output_dir = str(tmp_path / name)
            records = shard_all(manifest)
            assert len(records) == 1 and records[0]["status"] == SUCCESS
            assert records[0]["caption"].count("\n") == n - 1
    assert time.perf_counter() - started < 60
