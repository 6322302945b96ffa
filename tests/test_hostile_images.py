"""Hostile images (round three): whatever a decoder raises on a bad file is a rejected row with a reason,
never a crash of the shard stage; only the formats of shard.image_formats are opened at all; size checks
apply to the image as stored; a seeded fuzz of the opener over mutated files of every format PIL opens
finds no exception escaping and no hang."""
from __future__ import annotations

import io
import math
import time
import warnings

import pyarrow.parquet as pq
import pytest
from PIL import Image, PngImagePlugin

from pipeline.config import ManifestError
from pipeline.images import DEFAULT_IMAGE_FORMATS, ImageError, decode_image, openable_formats
from pipeline.layout import RunLayout
from pipeline.readers import read_corpus
from pipeline.shard_writer import write_shard
from pipeline.sidecars import SUCCESS
from stages.shard import shard_options
from tests.corpora import jpeg_bytes, png_bytes
from tests.imagefuzz import fuzz, seed_files

# One byte of a valid file changed (offset, value): each made PIL raise something other than the five
# exception types the opener caught before (found by tests/imagefuzz.py).
DAMAGED = {"AVIF": (81, 0x00, "RuntimeError"), "DDS": (80, 0x00, "NotImplementedError"),
           "TIFF": (72, 0x02, "TypeError"), "SPIDER": (107, 0x7F, "AttributeError"),
           "BLP": (4, 0x00, "BLPFormatError"), "MCIDAS": (52, 0x7F, "OverflowError")}


def damaged(name: str) -> bytes:
    offset, value, _ = DAMAGED[name]
    data = bytearray(seed_files()[name])
    data[offset] = value
    return bytes(data)


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_any_exception_of_a_decoder_is_an_image_error_naming_it(name):
    expected = DAMAGED[name][2]
    with pytest.raises(ImageError) as err:
        decode_image(damaged(name), 1 << 20, formats=openable_formats())
    assert err.value.reason == "decode_error" and expected in str(err.value)
    # by default none of these formats is opened at all: no decoder of theirs runs
    with pytest.raises(ImageError) as err:
        decode_image(damaged(name), 1 << 20)
    assert err.value.reason == "not_an_image" and "shard.image_formats" in str(err.value)


@pytest.mark.parametrize("raised", [TypeError("x"), RuntimeError("x"), NotImplementedError("x"),
                                    AttributeError("x"), KeyError("x"), IndexError("x"), ZeroDivisionError("x"),
                                    RecursionError("x"), SystemError("x")])
def test_whatever_a_plugin_raises_while_loading_is_a_rejected_image(monkeypatch, raised):
    def load(self):
        raise raised
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", load)
    with pytest.raises(ImageError) as err:
        decode_image(png_bytes(Image.new("RGB", (20, 20))), 1 << 20)
    assert err.value.reason == "decode_error" and type(raised).__name__ in str(err.value)


@pytest.mark.parametrize("raised", [MemoryError, KeyboardInterrupt])
def test_memory_errors_and_interrupts_pass_through(monkeypatch, raised):
    def load(self):
        raise raised()
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", load)
    with pytest.raises(raised):
        decode_image(png_bytes(Image.new("RGB", (20, 20))), 1 << 20)


def test_only_the_listed_formats_are_opened():
    tiff = seed_files()["TIFF"]
    with pytest.raises(ImageError, match="not_an_image"):
        decode_image(tiff, 1 << 20)
    assert decode_image(tiff, 1 << 20, formats=["TIFF"]).format == "TIFF"
    for name in ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP"):       # camera MPO comes through JPEG's opener
        assert decode_image(seed_files()[name], 1 << 20).image.size == (24, 16)
    assert set(DEFAULT_IMAGE_FORMATS) < set(openable_formats())


def test_image_formats_is_validated_and_names_the_field(write_manifest):
    manifest = write_manifest("shard: {image_formats: [jpeg, Tiff, JPEG]}\n")
    assert manifest.shard.image_formats == ["JPEG", "TIFF"]
    for bad in ("[JPEG, HEIC]", "[]", "JPEG"):
        with pytest.raises(ManifestError, match="shard.image_formats"):
            write_manifest(f"shard: {{image_formats: {bad}}}\n")


def shard_folder(manifest) -> list[dict]:
    rows = read_corpus(manifest)
    layout, per_shard = RunLayout.of(manifest), manifest.shard.samples_per_shard
    records = []
    for s in range(math.ceil(rows.num_rows / per_shard)):
        stats = write_shard(s, rows.slice(s * per_shard, per_shard), shard_options(manifest), layout.shards,
                            layout.shard_tar(s), "test")
        part = pq.read_table(layout.shards.parquet(s)).to_pylist()
        assert stats["count"] == len(part) and stats["successes"] == sum(r["status"] == SUCCESS for r in part)
        records += part
    return records


def test_the_shard_stage_rejects_damaged_files_and_writes_the_good_ones(tmp_path, write_manifest):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"good{i}.jpg").write_bytes(jpeg_bytes(32, 24, seed=i))
        (corpus / f"good{i}.txt").write_text(f"good picture {i}")
    for name in DAMAGED:
        (corpus / f"{name.lower()}.jpg").write_bytes(damaged(name))     # any name: PIL reads the bytes
        (corpus / f"{name.lower()}.txt").write_text(f"a damaged {name} file")
    every = "[" + ", ".join(openable_formats()) + "]"
    opened = write_manifest(f"corpus: {{format: folder, path: {corpus}}}\nshard: {{image_formats: {every}}}\n",
                            name="every")
    records = {r["source_id"]: r for r in shard_folder(opened)}
    for name, (_, _, raised) in DAMAGED.items():
        row = records[f"{name.lower()}.jpg"]
        assert (row["status"], row["reason"]) == ("failed_to_decode", "decode_error") and raised in row["error_message"]
    assert [records[f"good{i}.jpg"]["status"] for i in range(3)] == [SUCCESS] * 3
    default = write_manifest(f"corpus: {{format: folder, path: {corpus}}}\n", name="default")
    default.output_dir = str(tmp_path / "default")
    reasons = {r["source_id"]: r["reason"] for r in shard_folder(default)}
    assert {reasons[f"{name.lower()}.jpg"] for name in DAMAGED} == {"not_an_image"}


def test_min_side_applies_to_the_image_as_stored(tmp_path, write_manifest):
    strip = png_bytes(Image.new("RGB", (20000, 8), (200, 10, 10)))       # resized to 1333x1
    with pytest.raises(ImageError) as err:
        decode_image(strip, 1 << 30, min_side=8, max_side=1333)
    assert err.value.reason == "too_small" and "20000x8 is stored as 1333x1" in str(err.value)
    wide = decode_image(png_bytes(Image.new("RGB", (2000, 40))), 1 << 30, min_side=8, max_side=1333)
    assert wide.image.size == (1333, 27) and wide.needs_reencode
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "strip.png").write_bytes(strip)
    (corpus / "strip.txt").write_text("a long thin strip")
    (corpus / "ok.jpg").write_bytes(jpeg_bytes(32, 24))
    (corpus / "ok.txt").write_text("a picture")
    records = shard_folder(write_manifest(f"corpus: {{format: folder, path: {corpus}}}\n"))
    assert [(r["source_id"], r["reason"]) for r in records] == [("ok.jpg", None), ("strip.png", "too_small")]


def test_every_seed_format_opens_and_the_seeds_cover_every_format_pil_opens():
    seen = set()
    for data in seed_files().values():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            with Image.open(io.BytesIO(data)) as image:
                seen.add(image.format.upper())
    assert set(openable_formats()) <= seen


def test_fuzz_of_the_opener_over_every_format_finds_no_crash_and_no_hang():
    """About 5000 seeded mutations of small files of every format PIL opens, decoded with every format
    allowed (so that each plugin's decoder meets them), each under a 5 s limit; then others with the
    default formats. bench/fuzz_images.py runs more."""
    started = time.perf_counter()
    seeds = seed_files()
    every = fuzz(seeds, 60, seed=0, max_pixels=1 << 20, formats=None, time_limit=5.0)
    default = fuzz(seeds, 15, seed=1, max_pixels=1 << 20, formats=DEFAULT_IMAGE_FORMATS, time_limit=5.0)
    assert every.crashes == [] and default.crashes == []
    assert every.hangs == [] and default.hangs == []
    assert every.decodes + default.decodes >= 5000
    assert every.outcomes["ok"] > 0 and every.outcomes["decode_error"] > 0 and every.outcomes["truncated_image"] > 0
    assert time.perf_counter() - started < 30
