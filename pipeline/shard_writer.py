"""Write one WebDataset shard (img2dataset conventions) from a slice of input rows.

Members per sample: `{key}.jpg`, `{key}.txt` (caption), `{key}.json` (metadata). A sample is one
image; an image with several captions (COCO) has them all, one per line, in `.txt`, in the json's
`caption` and in the Parquet's `caption` (a caption never holds a line break: whitespace is collapsed).
The shard's Parquet holds every input row (an image and its captions), rejected ones too, with
img2dataset's `status` words, a `reason` code and an `error_message` (pipeline/sidecars.py), so that
rows in = samples written + rows rejected. Files are written under temporary names and renamed; the
`_stats.json` marker (with img2dataset's `_stats.json` fields: count, successes, failed_to_download,
..., `dropped_captions`: why captions of images that kept others were dropped, and `letterboxed`:
written images padded with uniform bands, see looks_letterboxed) is written last.

Only bad data becomes a rejected row: the errors caught are those of reading and decoding (FileRefused,
OSError, EOFError, ImageError, UnicodeDecodeError); a MemoryError or KeyboardInterrupt stops the shard
(no marker is written, so a rerun redoes it) rather than being counted against a row.
"""
from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import webdataset as wds

from pipeline.images import DEFAULT_IMAGE_FORMATS, ImageError, decode_image, encode_jpeg
from pipeline.io import FileRefused, atomic_path
from pipeline.layout import StageDir, sample_key
from pipeline.readers import CorpusFiles, read_image_bytes
from pipeline.sidecars import FAILURE_STATUSES, SUCCESS, failure_status, write_shard_rows
from pipeline.stage import write_shard_stats

# Fixed tar metadata so that a rerun writes byte-identical shards.
TAR_MTIME = 0.0

@dataclass(frozen=True)
class ShardOptions:
    max_side: int
    max_pixels: int
    min_side: int
    jpeg_quality: int
    max_caption_chars: int
    key_digits: int
    files: CorpusFiles          # where image files may be read from, and how much of each
    image_formats: tuple = DEFAULT_IMAGE_FORMATS   # the formats PIL may open (shard.image_formats)


class RowRejected(Exception):
    pass


def _caption_text(raw: bytes, max_chars: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RowRejected(f"caption_not_utf8: byte {err.start} is not valid UTF-8") from None
    text = " ".join(text.split())  # tabs and newlines inside captions become single spaces
    if not text:
        raise RowRejected("empty_caption")
    if len(text) > max_chars:
        raise RowRejected(f"caption_too_long: {len(text)} characters (limit {max_chars})")
    return text


def _caption_lines(raw_captions: list, max_chars: int) -> tuple[str, Counter]:
    """The usable captions of a row, one per line, without repeats, and the reasons the others were
    dropped; RowRejected (the first reason) when none is usable."""
    kept, dropped, first = {}, Counter(), None      # a dict: ordered, and a repeat is found in O(1)
    for raw in raw_captions or [b""]:
        try:
            text = _caption_text(raw or b"", max_chars)
        except RowRejected as err:
            first = first or err
            dropped[str(err).split(":")[0]] += 1
            continue
        kept.setdefault(text, None)
    if not kept:
        raise first
    return "\n".join(kept), dropped


# Letterboxing (img2dataset's default `--resize_mode border` pads to a square with white): one pair of
# opposite edges is a band of one colour, `BAND_ROWS` deep, within `BAND_TOLERANCE` per channel (JPEG
# noise), while the other pair is not (an object on a plain background has all four edges plain).
BAND_ROWS = 2
BAND_TOLERANCE = 8


def _one_colour(image, boxes) -> bool:
    """Whether the pixels of every box (left, top, right, bottom) together hold a single colour."""
    extrema = [image.crop(box).getextrema() for box in boxes]     # per box: ((min, max) per channel)
    return all(max(e[c][1] for e in extrema) - min(e[c][0] for e in extrema) <= BAND_TOLERANCE
               for c in range(len(extrema[0])))


def looks_letterboxed(image) -> bool:
    """An RGB image padded to its size with uniform bands on two opposite sides (a cheap check: four
    strips of BAND_ROWS pixels along the edges)."""
    w, h = image.size
    if min(w, h) <= 4 * BAND_ROWS:
        return False
    rows = _one_colour(image, [(0, 0, w, BAND_ROWS), (0, h - BAND_ROWS, w, h)])
    columns = _one_colour(image, [(0, 0, BAND_ROWS, h), (w - BAND_ROWS, 0, w, h)])
    return rows != columns


def _image_payload(image_ref: str, opt: ShardOptions) -> tuple[bytes, dict, bool]:
    """The bytes to store, their sizes, and whether the image looks letterboxed."""
    try:
        data = read_image_bytes(image_ref, opt.files)
    except FileRefused as err:
        raise RowRejected(str(err)) from None
    except FileNotFoundError:
        raise RowRejected(f"missing_file: {image_ref}") from None
    except (EOFError, OSError) as err:
        raise RowRejected(f"read_error: {err}") from None
    try:
        # min_side applies to the image as stored, after the resize to max_side
        decoded = decode_image(data, opt.max_pixels, opt.min_side, max_side=opt.max_side,
                               formats=opt.image_formats)
    except ImageError as err:
        raise RowRejected(str(err)) from None
    image = decoded.image
    # Keep the original bytes when they already are the RGB JPEG we would store (no quality loss).
    if not decoded.needs_reencode:
        payload = data
    else:
        payload = encode_jpeg(image, opt.jpeg_quality)
    ow, oh = decoded.original_size
    return payload, {"width": image.width, "height": image.height,
                     "original_width": ow, "original_height": oh}, looks_letterboxed(image)


def write_shard(shard_id: int, rows: pa.Table, opt: ShardOptions, stage_dir: StageDir,
                tar_path, fingerprint: str) -> dict:
    """Write `<shard>.tar`, `<shard>.parquet`, then `<shard>_stats.json`. Returns the stats."""
    started = time.time()
    records, reasons, dropped_captions = [], Counter(), Counter()
    letterboxed = 0
    with atomic_path(tar_path) as tmp_tar:
        with open(tmp_tar, "wb") as stream, wds.TarWriter(stream, mtime=TAR_MTIME) as sink:
            for index, row in enumerate(rows.to_pylist()):
                key = sample_key(shard_id, index, opt.key_digits)
                raw_captions = row["captions"] or []
                rec = {"key": key, "source_id": row["source_id"], "url": row["image_ref"],
                       "uid": hashlib.sha1((row["image_ref"]).encode() + b"\0" + b"\n".join(raw_captions)
                                           ).hexdigest()}
                try:
                    if row["error"]:
                        raise RowRejected(row["error"])
                    caption, dropped = _caption_lines(raw_captions, opt.max_caption_chars)
                    payload, sizes, banded = _image_payload(row["image_ref"], opt)
                except RowRejected as err:
                    message = str(err)
                    reason = message.split(":")[0]
                    reasons[reason] += 1
                    records.append({**rec, "caption": "\n".join(map(_safe_text, raw_captions)),
                                    "status": failure_status(reason), "reason": reason, "error_message": message})
                    continue
                dropped_captions.update(dropped)
                letterboxed += banded
                digest = hashlib.sha256(payload).hexdigest()
                meta = {"key": key, "uid": rec["uid"], "source_id": row["source_id"], "url": row["image_ref"],
                        "caption": caption, "status": SUCCESS, "error_message": None, "sha256": digest, **sizes}
                sink.write({"__key__": key, "jpg": payload, "txt": caption, "json": meta})
                records.append({**rec, **sizes, "caption": caption, "status": SUCCESS, "reason": None,
                                "error_message": None, "sha256": digest, "bytes": len(payload)})
    parquet_path = write_shard_rows(stage_dir, shard_id, records)
    statuses = Counter(r["status"] for r in records)
    counts = {"in": len(records), "written": statuses[SUCCESS], "rejected": len(records) - statuses[SUCCESS]}
    seconds = round(time.time() - started, 3)
    # img2dataset's _stats.json fields, so that its tools read our markers: failed_to_resize stays 0 (a
    # resize never fails here; undecodable images count in failed_to_decode).
    img2dataset_stats = {"count": len(records), "successes": statuses[SUCCESS], "failed_to_resize": 0,
                         **{status: statuses[status] for status in FAILURE_STATUSES}, "duration": seconds,
                         "status_dict": dict(sorted({SUCCESS: statuses[SUCCESS], **reasons}.items()))}
    return write_shard_stats(stage_dir, shard_id, fingerprint, counts, [tar_path, parquet_path],
                             extra={**img2dataset_stats,
                                    "dropped_captions": dict(sorted(dropped_captions.items())),
                                    "letterboxed": letterboxed},
                             seconds=seconds)


def _safe_text(raw) -> str:
    if raw is None:
        return ""
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
