"""Hostile corpus input for the shard stage (and images for `detect`): every refusal is a rejected row
with a named reason, or a clear error before any work; the counts always balance (rows in = written +
rejected, per status word); nothing outside the corpus root is read.

Shards are written in this process (`shard_all`: the stage's reading, options and per-shard writer,
without Ray) so that each kind costs a fraction of a second. A private file outside every corpus root
(`sentinel`) is named by several corpora; it must never be read into a shard nor changed."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.layout import RunLayout
from pipeline.readers import CorpusError, read_corpus
from pipeline.shard_writer import write_shard
from pipeline.sidecars import FAILURE_STATUSES, SUCCESS, failure_status, shard_samples
from stages.shard import shard_options
from tests.corpora import add_tar_member, bomb_png, jpeg_bytes


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory):
    """A private picture outside every run folder and corpus root: named by corpora, never read."""
    path = tmp_path_factory.mktemp("private") / "secret.jpg"
    path.write_bytes(jpeg_bytes(40, 40, seed=999))
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    yield path
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: something blocked")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def shard_all(manifest) -> list[dict]:
    """Shard the corpus as the stage does, in this process; check that every count balances and that
    each rejected row's status, reason and error_message agree; return the shard Parquet rows."""
    rows = read_corpus(manifest)
    layout, per_shard = RunLayout.of(manifest), manifest.shard.samples_per_shard
    options = shard_options(manifest)
    shard_ids = range(math.ceil(rows.num_rows / per_shard))
    with deadline(60):
        stats = [write_shard(s, rows.slice(s * per_shard, per_shard), options, layout.shards,
                             layout.shard_tar(s), "test") for s in shard_ids]
    records = [r for s in shard_ids for r in pq.read_table(layout.shards.parquet(s)).to_pylist()]
    tar_samples = [key for s in shard_ids for key, _ in shard_samples(layout.shard_tar(s))]
    successes = [r for r in records if r["status"] == SUCCESS]
    assert len(records) == rows.num_rows == sum(s["count"] for s in stats) == sum(s["counts"]["in"] for s in stats)
    assert len(successes) == len(tar_samples) == sum(s["successes"] for s in stats)
    assert len(records) - len(successes) == sum(s["counts"]["rejected"] for s in stats) \
        == sum(s[status] for s in stats for status in FAILURE_STATUSES)
    for r in records:
        if r["status"] != SUCCESS:
            assert r["status"] == failure_status(r["reason"]) and r["error_message"].startswith(r["reason"]), r
    return records


def reasons(records: list[dict]) -> dict[str, str]:
    """source_id -> reason (or `success`)."""
    return {r["source_id"]: r["reason"] or r["status"] for r in records}


def assert_no_output_holds(layout: RunLayout, data: bytes) -> None:
    for path in layout.root.rglob("*"):
        if path.is_file():
            assert data not in path.read_bytes(), f"{path} holds the bytes of a file outside the corpus root"


def tsv(folder: Path, lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "captions.tsv"
    path.write_text("caption\turl\n" + "".join(f"{line}\n" for line in lines))
    return path


# -- corpus paths confined to the corpus root -----------------------------------------------------------

def test_paths_urls_and_links_leading_outside_the_root_are_rejected_and_never_read(tmp_path, write_manifest,
                                                                                    sentinel):
    corpus = tmp_path / "corpus"
    (corpus / "images").mkdir(parents=True)
    (corpus / "images" / "good.jpg").write_bytes(jpeg_bytes(32, 24, seed=1))
    (corpus / "images" / "kept.jpg").write_bytes(jpeg_bytes(32, 24, seed=2))
    os.symlink(sentinel, corpus / "images" / "link_out.jpg")
    os.symlink(corpus / "images" / "kept.jpg", corpus / "images" / "link_in.jpg")
    path = tsv(corpus, ["a good picture\timages/good.jpg",
                        f"an absolute path outside\t{sentinel}",
                        f"a file URL outside\tfile://{sentinel}",
                        f"a relative path climbing out\t{os.path.relpath(sentinel, corpus)}",
                        "a link leading out\timages/link_out.jpg",
                        "a link staying inside\timages/link_in.jpg"])
    manifest = write_manifest(f"corpus: {{format: cc3m_tsv, path: {path}}}\nshard: {{samples_per_shard: 4}}\n")
    records = shard_all(manifest)
    # The absolute path and the file URL name the same image: one sample with both captions (an image
    # is one sample), refused once.
    assert list(reasons(records).values()) == ["success", "outside_root", "outside_root", "outside_root",
                                               "success"]
    assert records[1]["caption"] == "an absolute path outside\na file URL outside"
    assert "corpus.allow_outside_root" in records[1]["error_message"]
    assert_no_output_holds(RunLayout.of(manifest), sentinel.read_bytes())


def test_allow_outside_root_reads_files_elsewhere(tmp_path, write_manifest):
    elsewhere = tmp_path / "elsewhere" / "shared.jpg"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(jpeg_bytes(32, 24, seed=3))
    path = tsv(tmp_path / "corpus", [f"a picture elsewhere\t{elsewhere}", f"by URL\tfile://{elsewhere}"])
    # both rows name one image: one sample with two captions
    refused = shard_all(write_manifest(f"corpus: {{format: cc3m_tsv, path: {path}}}\n", name="refused"))
    assert [r["reason"] for r in refused] == ["outside_root"]
    allowed = write_manifest(f"corpus: {{format: cc3m_tsv, path: {path}, allow_outside_root: true}}\n", name="allowed")
    allowed.output_dir = str(tmp_path / "allowed")
    assert [(r["status"], r["caption"]) for r in shard_all(allowed)] == [(SUCCESS, "a picture elsewhere\nby URL")]


def test_devices_fifos_folders_and_oversized_files_are_refused_without_reading(tmp_path, write_manifest):
    corpus = tmp_path / "corpus"
    (corpus / "images" / "folder.jpg").mkdir(parents=True)
    os.mkfifo(corpus / "images" / "fifo.jpg")
    (corpus / "images" / "big.jpg").write_bytes(jpeg_bytes(300, 300, seed=4))
    (corpus / "images" / "small.jpg").write_bytes(jpeg_bytes(16, 16, seed=5))
    lines = ["a FIFO\timages/fifo.jpg", "a folder\timages/folder.jpg", "a big file\timages/big.jpg",
             "a small file\timages/small.jpg", "the zero device\t/dev/zero", "by URL\tfile:///dev/zero"]
    path = tsv(corpus, lines)
    confined = write_manifest(f"corpus: {{format: cc3m_tsv, path: {path}, max_file_bytes: 4000}}\n", name="c")
    assert list(reasons(shard_all(confined)).values()) == [   # /dev/zero twice: one image, one row
        "not_a_file", "not_a_file", "too_large", "success", "outside_root"]
    anywhere = write_manifest(f"corpus: {{format: cc3m_tsv, path: {path}, max_file_bytes: 4000, "
                              "allow_outside_root: true}\n", name="a")
    anywhere.output_dir = str(tmp_path / "anywhere")
    records = shard_all(anywhere)
    assert list(reasons(records).values())[-1:] == ["not_a_file"]
    assert "character device" in records[-1]["error_message"] and "FIFO" in records[0]["error_message"]


def test_folder_corpus_caption_files_are_read_like_images(tmp_path, write_manifest, sentinel):
    corpus = tmp_path / "folder"
    corpus.mkdir()
    for name in ("fifo_caption", "long_caption", "linked_caption", "dir_image", "ok"):
        if name != "dir_image":
            (corpus / f"{name}.jpg").write_bytes(jpeg_bytes(24, 24, seed=len(name)))
    os.mkfifo(corpus / "fifo_caption.txt")
    (corpus / "long_caption.txt").write_text("word " * 40)
    os.symlink(sentinel, corpus / "linked_caption.txt")
    (corpus / "dir_image.jpg").mkdir()
    (corpus / "dir_image.txt").write_text("a folder named like a picture")
    os.symlink(sentinel, corpus / "escaping.jpg")
    (corpus / "escaping.txt").write_text("a link to a private picture")
    (corpus / "ok.txt").write_text("a fine caption")
    manifest = write_manifest(f"corpus: {{format: folder, path: {corpus}, max_caption_bytes: 100}}\n")
    assert reasons(shard_all(manifest)) == {
        "dir_image.jpg": "not_a_file", "escaping.jpg": "outside_root", "fifo_caption.jpg": "not_a_file",
        "linked_caption.jpg": "outside_root", "long_caption.jpg": "caption_too_large", "ok.jpg": "success"}
    assert_no_output_holds(RunLayout.of(manifest), sentinel.read_bytes())


# -- tars --------------------------------------------------------------------------------------------------

def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            add_tar_member(tar, name, data)
    return path


def samples(n: int, prefix: str = "", seed: int = 0) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        out += [(f"{prefix}{i:04d}.jpg", jpeg_bytes(16, 16, seed=seed + i)), (f"{prefix}{i:04d}.txt", f"kite {i}".encode())]
    return out


def test_a_damaged_header_mid_tar_is_a_corrupt_tar_row_and_the_rest_is_read(tmp_path, write_manifest):
    tar = write_tar(tmp_path / "i2d" / "00000.tar", samples(5))
    data = bytearray(tar.read_bytes())
    header = data.find(b"0001.jpg")
    data[header + 148: header + 156] = b"garbage!"     # the checksum field: tarfile stops here quietly
    tar.write_bytes(bytes(data))
    with tarfile.open(tar) as t:
        assert len(t.getnames()) == 2                   # what tarfile alone would have read
    records = shard_all(write_manifest(f"corpus: {{format: img2dataset, path: {tmp_path / 'i2d'}}}\n"))
    assert reasons(records) == {"00000.tar:0000": "success", "00000.tar:0001": "missing_image",
                                "00000.tar:0002": "success", "00000.tar:0003": "success",
                                "00000.tar:0004": "success", f"00000.tar@{header}": "corrupt_tar"}
    assert f"bytes {header}-" in records[-1]["error_message"]


def test_a_long_name_header_tarfile_refuses_is_skipped_not_read_forever(tmp_path, write_manifest):
    long = "long" * 40 + "/"                             # over 100 characters: a GNU long-name header
    tar = tmp_path / "i2d" / "00000.tar"
    tar.parent.mkdir()
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT) as t:
        for name, data in samples(1) + samples(1, long, seed=5) + samples(1, "z/", seed=9):
            add_tar_member(t, name, data)
    data = bytearray(tar.read_bytes())
    real_header = data.find(b"././@LongLink") + 1024      # the header the long name belongs to
    data[real_header + 148: real_header + 156] = b"garbage!"
    tar.write_bytes(bytes(data))
    with deadline(20):
        records = shard_all(write_manifest(f"corpus: {{format: img2dataset, path: {tmp_path / 'i2d'}}}\n"))
    got = reasons(records)
    assert got["00000.tar:0000"] == got["00000.tar:z/0000"] == "success"
    assert sorted(got.values()).count("corrupt_tar") == 1


def test_same_names_in_two_tar_folders_or_two_member_folders_never_merge(tmp_path, write_manifest):
    write_tar(tmp_path / "i2d" / "a" / "00000.tar", samples(2, seed=0))
    write_tar(tmp_path / "i2d" / "b" / "00000.tar", samples(2, seed=10))
    write_tar(tmp_path / "i2d" / "c" / "00000.tar", samples(1, "x/", seed=20) + samples(1, "y/", seed=30))
    records = shard_all(write_manifest(f"corpus: {{format: img2dataset, path: {tmp_path / 'i2d'}}}\n"))
    assert reasons(records) == {f"{tar}:{key}": "success" for tar, key in [
        ("a/00000.tar", "0000"), ("a/00000.tar", "0001"), ("b/00000.tar", "0000"), ("b/00000.tar", "0001"),
        ("c/00000.tar", "x/0000"), ("c/00000.tar", "y/0000")]}
    assert len({r["sha256"] for r in records}) == 6


def test_oversized_text_members_repeated_members_and_links_are_named(tmp_path, write_manifest):
    tar = tmp_path / "i2d" / "00000.tar"
    tar.parent.mkdir()
    with tarfile.open(tar, "w") as t:
        folder = tarfile.TarInfo("subfolder")
        folder.type = tarfile.DIRTYPE
        t.addfile(folder)                                # a folder entry: nothing to read, no row
        for name, data in samples(2) + [("0001.txt", b"a second caption for the same sample"),
                                        ("0002.jpg", jpeg_bytes(16, 16)), ("0002.txt", b"x" * 5000)]:
            add_tar_member(t, name, data)
        link = tarfile.TarInfo("0003.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(link)
    manifest = write_manifest(f"corpus: {{format: img2dataset, path: {tmp_path / 'i2d'}, max_caption_bytes: 1000}}\n")
    assert reasons(shard_all(manifest)) == {"00000.tar:0000": "success", "00000.tar:0001": "duplicate_tar_member",
                                            "00000.tar:0002": "caption_too_large",
                                            "00000.tar:0003": "unsafe_tar_member"}


# -- img2dataset's parquet output format ------------------------------------------------------------------

def test_img2dataset_parquet_output_is_read_with_its_failures_and_a_bad_jpg(tmp_path, write_manifest):
    folder = tmp_path / "i2d_parquet"
    folder.mkdir()
    good = jpeg_bytes(24, 20, seed=7)
    table = pa.table({"key": ["000000000", "000000001", "000000002", "000000003"],
                      "caption": ["a red kite", "a broken picture", "never downloaded", "a kite again"],
                      "status": ["success", "success", "failed_to_download", "success"],
                      "error_message": [None, None, "HTTP Error 404", None],
                      "jpg": [good, b"<html>not a picture</html>", None, jpeg_bytes(24, 20, seed=8)]})
    pq.write_table(table, folder / "00000.parquet", row_group_size=2)
    (folder / "00001.parquet").write_bytes((folder / "00000.parquet").read_bytes()[:300])  # cut off
    manifest = write_manifest(f"corpus: {{format: img2dataset, path: {folder}}}\n")
    records = shard_all(manifest)
    got = {r["source_id"]: (r["status"], r["reason"]) for r in records}
    assert got == {"00000.parquet:000000000": ("success", None),
                   "00000.parquet:000000001": ("failed_to_decode", "not_an_image"),
                   "00000.parquet:000000002": ("failed_to_download", "input_failed"),
                   "00000.parquet:000000003": ("success", None),
                   "00001.parquet:": ("failed_to_download", "corrupt_parquet")}
    assert "HTTP Error 404" in records[2]["error_message"]
    first = dict(shard_samples(RunLayout.of(manifest).shard_tar(0)))
    assert first[records[0]["key"]]["jpg"] == good and first[records[0]["key"]]["txt"] == b"a red kite"


def test_a_damaged_parquet_file_is_a_corrupt_parquet_row(tmp_path, write_manifest):
    folder = tmp_path / "i2d_parquet"
    folder.mkdir()
    table = pa.table({"key": ["a", "b"], "caption": ["one", "two"], "jpg": [jpeg_bytes(16, 16), jpeg_bytes(16, 16, 1)]})
    pq.write_table(table, folder / "00000.parquet", row_group_size=1)
    data = bytearray((folder / "00000.parquet").read_bytes())
    second_group = pq.ParquetFile(folder / "00000.parquet").metadata.row_group(1).column(0).data_page_offset
    data[second_group: second_group + 64] = b"\xff" * 64
    (folder / "00000.parquet").write_bytes(bytes(data))
    records = shard_all(write_manifest(f"corpus: {{format: img2dataset, path: {folder}}}\n"))
    assert reasons(records) == {"00000.parquet:a": "success", "00000.parquet@1": "corrupt_parquet"}


# -- nothing to shard --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["empty_tsv", "empty_folder", "only_bad_rows"])
def test_an_empty_corpus_or_one_without_a_usable_row_is_an_error_before_any_work(tmp_path, write_manifest, kind):
    from stages import shard

    if kind == "empty_tsv":
        path = tsv(tmp_path / "c", [])
        body = f"corpus: {{format: cc3m_tsv, path: {path}}}\n"
    elif kind == "empty_folder":
        (tmp_path / "c").mkdir()
        body = f"corpus: {{format: folder, path: {tmp_path / 'c'}}}\n"
    else:
        path = tsv(tmp_path / "c", ["remote\thttp://example.com/a.jpg", "remote too\thttps://example.com/b.jpg"])
        body = f"corpus: {{format: cc3m_tsv, path: {path}}}\n"
    manifest = write_manifest(body)
    with pytest.raises(CorpusError, match="corpus.path") as err:
        shard.run(manifest)                            # fails in the stage's identify step: no Ray, no files
    if kind == "only_bad_rows":
        assert "none of its 2 rows can be used (remote_url 2)" in str(err.value)
    assert not RunLayout.of(manifest).shards.root.exists()


def test_a_corpus_whose_every_image_is_bad_is_sharded_then_refused(ray_local, tmp_path, write_manifest):
    from stages import shard

    corpus = tmp_path / "c"
    corpus.mkdir()
    for i, data in enumerate([b"", b"<html>", jpeg_bytes(64, 48)[:200]]):
        (corpus / f"{i}.jpg").write_bytes(data)
        (corpus / f"{i}.txt").write_text(f"caption {i}")
    manifest = write_manifest(f"corpus: {{format: folder, path: {corpus}}}\n")
    with pytest.raises(CorpusError, match=r"none of its 3 rows was written \(.*empty_file 1"):
        shard.run(manifest)
    layout = RunLayout.of(manifest)
    rows = pq.read_table(layout.shards.parquet(0)).to_pylist()
    assert [r["status"] for r in rows] == ["failed_to_decode"] * 3
    assert json.loads(layout.shards.manifest.read_text())["status"] == "running"  # not done: nothing runs after


# -- only bad data is counted as bad ---------------------------------------------------------------------

def test_a_memory_error_or_interrupt_while_reading_is_never_counted_as_bad_data(tmp_path, write_manifest, monkeypatch):
    import pipeline.images
    import pipeline.shard_writer

    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.jpg").write_bytes(jpeg_bytes(16, 16))
    (corpus / "a.txt").write_text("a kite")
    manifest = write_manifest(f"corpus: {{format: folder, path: {corpus}}}\n")
    layout = RunLayout.of(manifest)

    def out_of_memory(*args, **kwargs):
        raise MemoryError("no memory left")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    for target, fake, error in [(pipeline.images.Image, out_of_memory, MemoryError),
                                (pipeline.shard_writer, interrupted, KeyboardInterrupt)]:
        name = "open" if target is pipeline.images.Image else "read_image_bytes"
        with monkeypatch.context() as patch:
            patch.setattr(target, name, fake)
            with pytest.raises(error):
                shard_all(manifest)
        assert not layout.shards.stats(0).exists() and not layout.shards.parquet(0).exists()
        assert not list(layout.shards.root.glob(".tmp-*"))
    assert [r["status"] for r in shard_all(manifest)] == [SUCCESS]   # and the row itself is fine


def test_the_tar_json_and_the_parquet_speak_the_same_status_words_as_img2dataset(tmp_path, write_manifest):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.jpg").write_bytes(jpeg_bytes(16, 16))
    (corpus / "a.txt").write_text("a kite")
    (corpus / "b.jpg").write_bytes(b"not a picture")
    (corpus / "b.txt").write_text("a broken kite")
    (corpus / "c.jpg").write_bytes(jpeg_bytes(16, 16, seed=3))
    (corpus / "c.txt").write_bytes(b"\xff\xfe")
    manifest = write_manifest(f"corpus: {{format: folder, path: {corpus}}}\n")
    records = shard_all(manifest)
    assert [(r["status"], r["reason"]) for r in records] == [
        ("success", None), ("failed_to_decode", "not_an_image"), ("failed_caption", "caption_not_utf8")]
    layout = RunLayout.of(manifest)
    meta = json.loads(dict(shard_samples(layout.shard_tar(0)))[records[0]["key"]]["json"])
    assert meta["status"] == records[0]["status"] == SUCCESS and meta["error_message"] is None
    stats = json.loads(layout.shards.stats(0).read_text())
    # the fields img2dataset's own logger reads from NNNNN_stats.json
    assert {k: stats[k] for k in ("count", "successes", "failed_to_download", "failed_to_resize")} == \
        {"count": 3, "successes": 1, "failed_to_download": 0, "failed_to_resize": 0}
    assert (stats["failed_to_decode"], stats["failed_caption"]) == (1, 1)
    assert stats["status_dict"] == {"success": 1, "not_an_image": 1, "caption_not_utf8": 1}


# -- detect: the same opener, a clear error ------------------------------------------------------------------

def test_detect_on_a_non_image_a_bomb_or_a_fifo_is_a_clear_error_before_any_model_loads(tmp_path, write_manifest,
                                                                                      capsys):
    from stages.cli import main

    manifest = write_manifest("corpus: {format: synthetic}\n")
    (tmp_path / "notes.jpg").write_bytes(b"<html>not a picture</html>")
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    os.mkfifo(tmp_path / "pipe.jpg")
    with deadline(60):
        code = main(["detect", str(manifest.source_path), "--images", str(tmp_path / "notes.jpg"),
                     str(tmp_path / "bomb.png"), str(tmp_path / "pipe.jpg"), "--vocabulary", "cat,dog",
                     "--checkpoint", str(tmp_path / "no-such-checkpoint.pt")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "3 of 3 images cannot be used" in err
    assert f"not_an_image: {tmp_path / 'notes.jpg'}: no known image format" in err
    assert f"too_many_pixels: {tmp_path / 'bomb.png'}: " in err
    assert f"not_a_file: {tmp_path / 'pipe.jpg'} is a FIFO" in err


def test_open_rgb_refuses_what_is_not_a_regular_file():
    from pipeline.images import open_rgb
    from pipeline.io import FileRefused

    with deadline(10), pytest.raises(FileRefused, match="not_a_file: /dev/zero is a character device"):
        open_rgb("/dev/zero")
    with pytest.raises(FileRefused, match="too_large"):
        open_rgb(io.__file__, max_bytes=10)
