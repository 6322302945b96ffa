"""Every file format of a run folder but the stage markers: each schema with its writer and reader,
and the one reader of shard tars.

| file | schema | writer | readers |
|---|---|---|---|
| `shards/NNNNN.tar` | WebDataset members `{key}.jpg`, `.txt`, `.json` | `pipeline.shard_writer` (webdataset's `TarWriter`) | `shard_samples` (streamed), `ShardIndex` (random access), `read_shard_images` |
| `shards/NNNNN.parquet` | `SHARD_ROWS_SCHEMA` (every input row) | `write_shard_rows` | `written_keys`, `shard_captions` |
| `concepts/concepts.parquet` | `CONCEPT_POOL_SCHEMA` | `write_concept_pool` | `read_concept_names` |
| `concepts/captions/NNNNN.parquet` | `CAPTION_NOUNS_SCHEMA`, then `CAPTION_CONCEPTS_SCHEMA` | `write_caption_nouns`, `write_caption_concepts` | `read_caption_nouns`, `read_caption_concepts` |
| `concepts/caption_embeddings/NNNNN.parquet` | key + fixed_size_list<float16>[D] | `write_caption_embeddings` | `read_caption_embeddings`, `ShardSidecarReader` (by key) |
| `proposals/NNNNN.parquet` | `PROPOSALS_SCHEMA` | `write_proposals`, `proposals_writer` (batch by batch) | `read_proposals`, `iter_proposals` (streamed), `ShardSidecarReader` (by key) |
| `labels/NNNNN.parquet` | `labels_schema(store_flipped)` | `write_labels`, `labels_writer` (batch by batch) | `read_labels` (a table), `read_region_labels`, `ShardSidecarReader` (by key) |
| `labels/regions.parquet` | `REGION_IDS_SCHEMA` | `write_region_ids` | `read_region_ids` |
| `checkpoints/transfer/train_proposals.parquet` | `DETECTION_PROPOSALS_SCHEMA` (+ fingerprint) | `detection_proposals_writer` (image by image) | `detection_proposals_fingerprint`, `iter_detection_proposals` (streamed) |

Per-shard sidecars (docs/formats.md) have one Parquet file per shard and one row per *written* key of
that shard (shard Parquet rows with status `success`), in the shard's order; the caption sidecars
(`concepts/captions/`, `concepts/caption_embeddings/`) have one row per caption, so a key repeats,
its captions in order, when its image has several. Boxes are float32 x1,y1,x2,y2
in the pixels of the image stored in the shard tar ("original pixels"), flattened into one list.

    keys = written_keys(layout.shards, 3)                # [{"key", "width", "height"}, ...]
    images = read_shard_images(layout.shard_tar(3), [k["key"] for k in keys])
    props = read_proposals(layout.proposals, 3)          # {key: Proposals}
"""
from __future__ import annotations

import contextlib
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io import parquet_writer, read_parquet, write_parquet
from pipeline.layout import SHARD_ID_DIGITS, StageDir

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

# The trainer reads per-shard sidecars by key in a random order (`ShardSidecarReader`), decoding the
# whole row group that holds a key: row groups stay small, at most KEYED_ROW_GROUP_ROWS rows and about
# KEYED_ROW_GROUP_BYTES (one row at least). 64 rows of an RN50's fp16 region codes (300 x 1024) would be
# 38 MiB decoded for one sample's 600 kB; proposals (300 boxes, 5 kB a row) keep 64 rows.
KEYED_ROW_GROUP_ROWS = 64
KEYED_ROW_GROUP_BYTES = 4 << 20
# Bytes of recently read row groups a keyed reader keeps: a shard's sidecar up to this size is decoded
# once per pass; a larger one costs one row group per sample, and memory stays at this.
KEYED_CACHE_BYTES = 32 << 20


def keyed_group_rows(table: pa.Table) -> int:
    """Rows per row group for `table` in a keyed sidecar (see KEYED_ROW_GROUP_BYTES)."""
    row_bytes = table.nbytes / max(table.num_rows, 1)
    return max(1, min(KEYED_ROW_GROUP_ROWS, int(KEYED_ROW_GROUP_BYTES // max(row_bytes, 1.0))))


def write_keyed(path: str | os.PathLike, table: pa.Table) -> None:
    """A whole per-shard sidecar, its row groups sized for reading by key."""
    write_parquet(path, table, row_group_rows=keyed_group_rows(table))


# -- shard tars ------------------------------------------------------------------------------------

class DamagedTarError(OSError):
    """A tar that cannot be read to its end (cut off, or a broken header or member)."""


def split_member_name(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member's name as WebDataset groups members: the key is the name up to
    the first dot of its base name, folders kept (`a/001.jpg` and `b/001.jpg` are two samples), the
    extension the rest in lower case ("" when there is none)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def is_plain_member(member: tarfile.TarInfo) -> bool:
    """A regular file named inside the tar: no link, device or folder, no absolute or '..' name."""
    return member.isfile() and not member.name.startswith("/") and ".." not in member.name.split("/")


def _member_key(member: tarfile.TarInfo) -> tuple[Optional[str], str]:
    """(key, extension) of a plain-file member (split_member_name); (None, "") for what is never read:
    links, devices, folders, absolute or '..' names, names without an extension."""
    if not is_plain_member(member):
        return None, ""
    key, ext = split_member_name(member.name)
    if not ext or not key or key.endswith("/"):
        return None, ""
    return key, ext


def _each_member(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members of an open tar one by one; tarfile's own iteration keeps every TarInfo it has read, so
    memory would grow with the number of members."""
    while (member := tar.next()) is not None:
        tar.members.clear()
        yield member


def _grouped_members(path: Path, mode: str, take) -> Iterator[tuple[str, dict]]:
    """(key, {extension: take(tar, member)}) per sample in tar order: the grouping and damage rules of
    `shard_samples` and `ShardIndex` (see shard_samples)."""
    key, members, end_of_members = None, {}, 0
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        try:
            with tarfile.open(fileobj=stream, mode=mode) as tar:
                for member in _each_member(tar):
                    end_of_members = member.offset_data + -(-member.size // 512) * 512
                    member_key, ext = _member_key(member)
                    if member_key is None:
                        continue
                    if member_key != key:
                        if key is not None:
                            yield key, members
                        key, members = member_key, {}
                    if ext not in members:  # a repeated member name: the first one counts
                        members[ext] = take(tar, member)
        except (tarfile.TarError, EOFError) as err:
            raise DamagedTarError(f"{path}: reading stopped early ({str(err) or type(err).__name__})") from None
    if size < end_of_members + 1024:
        raise DamagedTarError(f"{path}: the file ends before the end-of-archive marker")
    if key is not None:
        yield key, members


def shard_samples(tar_path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a WebDataset tar, in tar order, streamed.

    Members are read one at a time (memory holds one sample) and never written to disk; links and
    names outside the tar are skipped. A sample is yielded once the next one starts (or the tar ends),
    so a tar that breaks off raises DamagedTarError after its complete samples, without the sample it
    was reading. A tar that stops at a member boundary counts as broken off too: a complete tar ends
    with two zero blocks (tarfile itself stops there quietly).
    """
    return _grouped_members(Path(tar_path), "r|*", lambda tar, member: tar.extractfile(member).read())


class ShardIndex:
    """Random access to the samples of an uncompressed shard tar: where each member's bytes lie, read
    once from the headers (the data is skipped, not read), then one sample read at a time.

        index = ShardIndex(layout.shard_tar(3))
        key, members = index.keys[i], index.sample(i)     # what shard_samples yields as its i-th sample

    The samples are exactly shard_samples' (same grouping, same rules for links, repeated names and a tar
    that breaks off: `damaged` then holds the message and the complete samples before it are kept).
    Memory: a key and a few (offset, size) pairs per sample, never the members' bytes.
    """

    def __init__(self, tar_path: str | os.PathLike):
        self.path = Path(tar_path)
        self.keys: list[str] = []
        self.spans: list[dict[str, tuple[int, int]]] = []
        self.damaged: Optional[str] = None
        try:
            for key, spans in _grouped_members(self.path, "r:", lambda tar, m: (m.offset_data, m.size)):
                self.keys.append(key)
                self.spans.append(spans)
        except DamagedTarError as err:
            self.damaged = str(err)

    def __len__(self) -> int:
        return len(self.keys)

    def sample(self, i: int) -> dict[str, bytes]:
        """{extension: bytes} of sample i (DamagedTarError if the file changed since it was indexed)."""
        out = {}
        with open(self.path, "rb") as stream:
            for ext, (offset, size) in self.spans[i].items():
                stream.seek(offset)
                out[ext] = stream.read(size)
                if len(out[ext]) != size:
                    raise DamagedTarError(f"{self.path}: {self.keys[i]}.{ext} ends early; the tar changed "
                                          "after it was indexed")
        return out


def read_shard_images(tar_path: str | os.PathLike, keys: Optional[Iterable[str]] = None) -> dict[str, bytes]:
    """The image bytes (`{key}.jpg` or another image member) of a shard tar, by key; only `keys` when
    given (FileNotFoundError names those that have no image)."""
    wanted = set(keys) if keys is not None else None
    out: dict[str, bytes] = {}
    for key, members in shard_samples(tar_path):
        if wanted is not None and key not in wanted:
            continue
        image = next((members[ext] for ext in IMAGE_EXTENSIONS if ext in members), None)
        if image is not None:
            out[key] = image
    if wanted is not None and len(out) != len(wanted):
        missing = sorted(wanted - set(out))[:5]
        raise FileNotFoundError(f"{tar_path}: no image for keys {missing}")
    return out


def shard_of_key(key: str) -> int:
    """The shard id a sample key starts with (pipeline.layout.sample_key)."""
    return int(key[:SHARD_ID_DIGITS])


# -- the shard Parquet: every input row, rejected ones too ----------------------------------------------

# Status words, img2dataset's: `success`, or which step failed; the `reason` column names the exact cause
# (a code such as `outside_root`, `not_an_image`) and `error_message` is the reason with its detail.
SUCCESS = "success"
FAILED_TO_DOWNLOAD = "failed_to_download"   # the image's bytes could not be had (file, URL, tar, row)
FAILED_TO_DECODE = "failed_to_decode"       # the bytes are no usable image
FAILED_CAPTION = "failed_caption"           # the caption is missing, empty, not UTF-8 or too long
DUPLICATE = "duplicate"                     # same image and caption as an earlier row
FAILURE_STATUSES = (FAILED_TO_DOWNLOAD, FAILED_TO_DECODE, FAILED_CAPTION, DUPLICATE)
_STATUS_OF_REASON = {
    **dict.fromkeys(("empty_file", "not_an_image", "truncated_image", "decode_error", "too_many_pixels",
                     "too_small"), FAILED_TO_DECODE),
    **dict.fromkeys(("missing_caption", "empty_caption", "caption_not_utf8", "caption_too_long",
                     "caption_too_large"), FAILED_CAPTION),
    "duplicate_row": DUPLICATE,
}


def failure_status(reason: str) -> str:
    """The status word of a rejected row from its reason code (any other reason: failed_to_download)."""
    return _STATUS_OF_REASON.get(reason, FAILED_TO_DOWNLOAD)


SHARD_ROWS_SCHEMA = pa.schema([
    ("key", pa.string()), ("uid", pa.string()), ("source_id", pa.string()), ("url", pa.string()),
    ("caption", pa.string()), ("status", pa.string()), ("reason", pa.string()), ("error_message", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()),
    ("original_width", pa.int32()), ("original_height", pa.int32()),
    ("sha256", pa.string()), ("bytes", pa.int64()),
])


def write_shard_rows(shards: StageDir, shard_id: int, records: list[dict]) -> Path:
    """One dict per input row (fields of SHARD_ROWS_SCHEMA; absent ones are null), in input order."""
    path = shards.parquet(shard_id)
    write_parquet(path, pa.Table.from_pylist(records, schema=SHARD_ROWS_SCHEMA))
    return path


def written_keys(shards: StageDir, shard_id: int) -> list[dict]:
    """The written samples of a shard in shard order: key, width, height (pixels in the tar)."""
    table = read_parquet(shards.parquet(shard_id), columns=["key", "status", "width", "height"])
    return [{"key": r["key"], "width": int(r["width"]), "height": int(r["height"])}
            for r in table.to_pylist() if r["status"] == SUCCESS]


def shard_captions(shards: StageDir, shard_id: int) -> tuple[list[str], list[str]]:
    """(keys, captions) of the written (`success`) rows of a shard, one entry per caption, in shard
    order: a key repeats, its captions in order, when its image has several (the Parquet's caption lines)."""
    table = read_parquet(shards.parquet(shard_id), columns=["key", "caption", "status"]).to_pydict()
    keys, captions = [], []
    for key, text, status in zip(table["key"], table["caption"], table["status"]):
        if status == SUCCESS:
            lines = (text or "").split("\n")
            keys += [key] * len(lines)
            captions += lines
    return keys, captions


# -- the concept pool ---------------------------------------------------------------------------------

CONCEPT_POOL_SCHEMA = pa.schema([("concept_id", pa.int32()), ("name", pa.string()), ("count", pa.int64()),
                                 ("source", pa.string())])


def write_concept_pool(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Rows {concept_id, name, count, source ("corpus" or "vocabulary")}, ids dense from 0."""
    write_parquet(path, pa.table({name: pa.array([r[name] for r in rows], CONCEPT_POOL_SCHEMA.field(name).type)
                                  for name in CONCEPT_POOL_SCHEMA.names}))


def read_concept_names(path: str | os.PathLike) -> list[str]:
    """Concept names in concept_id order."""
    table = read_parquet(path, columns=["concept_id", "name"]).to_pydict()
    order = sorted(range(len(table["name"])), key=lambda i: table["concept_id"][i])
    if [table["concept_id"][i] for i in order] != list(range(len(order))):
        raise ValueError(f"{path}: concept_id is not dense from 0; re-run `regionclip concepts MANIFEST`")
    return [table["name"][i] for i in order]


# -- caption concepts: each caption's noun lemmas (pass 1), then its pool concept ids (pass 2) -----------

CAPTION_NOUNS_SCHEMA = pa.schema([("key", pa.string()), ("nouns", pa.list_(pa.string()))])
# Pass 2 rewrites pass 1's nouns as Parquet reads them back, with the list items named `element`.
CAPTION_CONCEPTS_SCHEMA = pa.schema([("key", pa.string()), ("nouns", pa.list_(pa.field("element", pa.string()))),
                                     ("concept_ids", pa.list_(pa.int32()))])


def write_caption_nouns(sidecars: StageDir, shard_id: int, keys: Sequence[str],
                        nouns: Sequence[Sequence[str]]) -> Path:
    path = sidecars.parquet(shard_id)
    write_parquet(path, pa.table([pa.array(keys, pa.string()), pa.array(nouns, pa.list_(pa.string()))],
                                 schema=CAPTION_NOUNS_SCHEMA))
    return path


def write_caption_concepts(sidecars: StageDir, shard_id: int, keys: Sequence[str],
                           nouns: Sequence[Sequence[str]], concept_ids: Sequence[Sequence[int]]) -> Path:
    path = sidecars.parquet(shard_id)
    columns = [keys, nouns, concept_ids]
    write_parquet(path, pa.table([pa.array(values, field.type) for values, field in zip(columns, CAPTION_CONCEPTS_SCHEMA)],
                                 schema=CAPTION_CONCEPTS_SCHEMA))
    return path


def read_caption_nouns(sidecars: StageDir, shard_id: int) -> tuple[list[str], list[list[str]]]:
    """(keys, noun lemmas of each caption) in shard order."""
    table = read_parquet(sidecars.parquet(shard_id), columns=["key", "nouns"])
    return table["key"].to_pylist(), table["nouns"].to_pylist()


def read_caption_concepts(sidecars: StageDir, shard_id: int) -> dict[str, list[int]]:
    """{key: concept ids} of one shard's captions (pass 2's column); a key with several captions gets
    the concepts any of them names, in order of first mention."""
    table = read_parquet(sidecars.parquet(shard_id), columns=["key", "concept_ids"])
    out: dict[str, list[int]] = {}
    for key, ids in zip(table["key"].to_pylist(), table["concept_ids"].to_pylist()):
        seen = out.setdefault(key, [])
        seen += [i for i in ids or [] if i not in seen]
    return out


# -- caption embeddings ---------------------------------------------------------------------------------

def write_caption_embeddings(sidecars: StageDir, shard_id: int, keys: Sequence[str],
                             embeddings: np.ndarray) -> Path:
    """key, embedding (fixed_size_list<float16>[D]): one L2-normalized embedding per caption (the keys of
    shard_captions: a key repeats for an image with several captions)."""
    embeddings = np.ascontiguousarray(embeddings, np.float16)
    values = pa.array(embeddings.reshape(-1))
    path = sidecars.parquet(shard_id)
    write_keyed(path, pa.table({"key": pa.array(list(keys), pa.string()),
                                "embedding": pa.FixedSizeListArray.from_arrays(values, embeddings.shape[1])}))
    return path


def _embedding_lengths(column) -> np.ndarray:
    return np.asarray(pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False))


def _embedding_rows(table: pa.Table, dim: int) -> np.ndarray:
    """float16 [rows, dim] of a caption-embedding table; a row that is null or not `dim` long is NaN."""
    column = table["embedding"].combine_chunks()
    out = np.full((len(column), dim), np.nan, np.float16)
    if len(column) == 0:
        return out
    lengths = _embedding_lengths(column)
    flat = np.asarray(pc.list_flatten(column).to_numpy(zero_copy_only=False), np.float16)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for i in np.flatnonzero(lengths == dim):
        out[i] = flat[starts[i]:starts[i] + dim]
    return out


def read_caption_embeddings(sidecars: StageDir, shard_id: int) -> tuple[list[str], np.ndarray]:
    """(keys, float16 [N, D]) of one shard; a row that is null or not D long (D: the longest) is NaN."""
    table = read_parquet(sidecars.parquet(shard_id), columns=["key", "embedding"])
    if table.num_rows == 0:
        return [], np.zeros((0, 0), np.float16)
    dim = int(_embedding_lengths(table["embedding"].combine_chunks()).max())
    return table["key"].to_pylist(), _embedding_rows(table, dim)


# -- proposals ---------------------------------------------------------------------------------------

PROPOSALS_SCHEMA = pa.schema([
    ("key", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("boxes", pa.list_(pa.float32())), ("objectness", pa.list_(pa.float32())),
    ("num_boxes", pa.int32()),
])


@dataclass
class Proposals:
    key: str
    width: int
    height: int
    boxes: np.ndarray       # [N, 4] float32, original pixels, ordered by objectness
    objectness: np.ndarray  # [N] float32 logits


def _list_rows(table: pa.Table, name: str, dtype) -> list[Optional[np.ndarray]]:
    """Each row of a list column as a numpy array (None for a null row), without a Python object per value."""
    column = table.column(name).combine_chunks()
    valid = np.asarray(column.is_valid().to_numpy(zero_copy_only=False), bool)
    offsets = np.asarray(column.offsets.to_numpy(), np.int64)
    values = np.asarray(column.values.to_numpy(zero_copy_only=False), dtype)
    return [values[offsets[i]:offsets[i + 1]] if valid[i] else None for i in range(len(column))]


def _proposals_table(rows: Sequence[Proposals]) -> pa.Table:
    return pa.table({
        "key": pa.array([r.key for r in rows], pa.string()),
        "width": pa.array([r.width for r in rows], pa.int32()),
        "height": pa.array([r.height for r in rows], pa.int32()),
        "boxes": pa.array([np.asarray(r.boxes, np.float32).reshape(-1) for r in rows], pa.list_(pa.float32())),
        "objectness": pa.array([np.asarray(r.objectness, np.float32) for r in rows], pa.list_(pa.float32())),
        "num_boxes": pa.array([len(r.boxes) for r in rows], pa.int32()),
    }, schema=PROPOSALS_SCHEMA)


def write_proposals(stage_dir: StageDir, shard_id: int, rows: list[Proposals]) -> Path:
    path = stage_dir.parquet(shard_id)
    write_keyed(path, _proposals_table(rows))
    return path


def _write_keyed_batch(writer: pq.ParquetWriter, table: pa.Table) -> None:
    writer.write_table(table, row_group_size=keyed_group_rows(table))


@contextlib.contextmanager
def proposals_writer(stage_dir: StageDir, shard_id: int) -> Iterator:
    """`write(rows)` for a shard's proposals a batch at a time (row groups of at most a batch each); the
    file appears under its name when the block ends without an error. The same rows as `write_proposals`."""
    with parquet_writer(stage_dir.parquet(shard_id), PROPOSALS_SCHEMA) as writer:
        yield lambda rows: _write_keyed_batch(writer, _proposals_table(rows))


def _checked_proposals(path: Path, table: pa.Table, skip_damaged: bool) -> Iterator[Proposals]:
    for key, width, height, n, boxes, objectness in zip(
            table["key"].to_pylist(), table["width"].to_pylist(), table["height"].to_pylist(),
            table["num_boxes"].to_pylist(), _list_rows(table, "boxes", np.float32),
            _list_rows(table, "objectness", np.float32)):
        boxes = boxes if boxes is not None else np.zeros(0, np.float32)
        if n is None or boxes.size != 4 * n or not np.isfinite(boxes).all():
            problem = f"boxes are not {n} finite x1,y1,x2,y2 rows"
        elif width is None or height is None or width <= 0 or height <= 0:
            problem = f"no image size ({width}x{height})"
        else:
            objectness = objectness if objectness is not None else np.zeros(0, np.float32)
            yield Proposals(key, width, height, boxes.reshape(n, 4), objectness)
            continue
        if not skip_damaged:
            raise ValueError(f"{path}: key {key}: {problem}; the sidecar is damaged "
                             "(`regionclip verify MANIFEST --repair`, then rerun proposals)")


def read_proposals(stage_dir: StageDir, shard_id: int, *, skip_damaged: bool = False) -> dict[str, Proposals]:
    """A shard's proposals by key (insertion order = shard order).

    A damaged row (boxes that are not num_boxes finite x1,y1,x2,y2 rows, no image size) is a ValueError
    naming the file and key; with `skip_damaged` it is left out instead (the trainer counts it missing)."""
    path = stage_dir.parquet(shard_id)
    return {p.key: p for p in _checked_proposals(path, read_parquet(path), skip_damaged)}


def iter_proposals(stage_dir: StageDir, shard_id: int, batch_rows: int = 256) -> Iterator[Proposals]:
    """A shard's proposals in shard order, read `batch_rows` rows at a time (memory does not grow with
    the shard); a damaged row is a ValueError as in `read_proposals`."""
    path = stage_dir.parquet(shard_id)
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
        yield from _checked_proposals(path, pa.Table.from_batches([batch]), False)


# -- a detection set's proposals (transfer's training images) ----------------------------------------------

# One row per image of a COCO-format set, by its image id; boxes as in PROPOSALS_SCHEMA (float32 x1,y1,x2,y2 in
# the image's pixels, flattened, ordered by objectness). The fingerprint of what made them (the RPN, its
# settings, the annotations) is in the file's metadata, so a reader can tell whether they are still current.
DETECTION_PROPOSALS_SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("num_boxes", pa.int32()),
    ("boxes", pa.list_(pa.float32())), ("objectness", pa.list_(pa.float32())),
])
FINGERPRINT_METADATA_KEY = b"regionclip.fingerprint"


@contextlib.contextmanager
def detection_proposals_writer(path: str | os.PathLike, fingerprint: str) -> Iterator:
    """`write(image_id, boxes [N, 4], objectness [N])` image by image into a detection set's proposals file
    carrying `fingerprint`; rows are written in row groups of about KEYED_ROW_GROUP_BYTES (memory holds
    one), and the file appears under its name only when the block ends without an error."""
    schema = DETECTION_PROPOSALS_SCHEMA.with_metadata({FINGERPRINT_METADATA_KEY: fingerprint.encode()})
    rows: list[tuple[int, np.ndarray, np.ndarray]] = []
    held = 0

    with parquet_writer(path, schema) as writer:
        def flush() -> None:
            nonlocal held
            if rows:
                writer.write_table(pa.table({
                    "image_id": pa.array([r[0] for r in rows], pa.int64()),
                    "num_boxes": pa.array([len(r[2]) for r in rows], pa.int32()),
                    "boxes": pa.array([r[1].reshape(-1) for r in rows], pa.list_(pa.float32())),
                    "objectness": pa.array([r[2] for r in rows], pa.list_(pa.float32())),
                }, schema=schema))
            rows.clear()
            held = 0

        def write(image_id: int, boxes, objectness) -> None:
            nonlocal held
            b = np.ascontiguousarray(boxes, np.float32).reshape(-1, 4)
            o = np.ascontiguousarray(objectness, np.float32).reshape(-1)
            if len(b) != len(o):
                raise ValueError(f"image {image_id}: {len(b)} boxes but {len(o)} objectness scores")
            rows.append((int(image_id), b, o))
            held += b.nbytes + o.nbytes
            if held >= KEYED_ROW_GROUP_BYTES:
                flush()

        yield write
        flush()


def detection_proposals_fingerprint(path: str | os.PathLike) -> Optional[str]:
    """The fingerprint a detection proposals file was written with; None when there is no such file or it
    is not one (a cut-off or foreign file)."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):
        return None
    value = metadata.get(FINGERPRINT_METADATA_KEY)
    return value.decode() if value is not None else None


def iter_detection_proposals(path: str | os.PathLike, batch_rows: int = 256) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(image id, boxes [N, 4] float32, objectness [N] float32) per row of a detection proposals file, read
    `batch_rows` rows at a time (memory does not grow with the set). A damaged row is a ValueError naming
    the file and the image."""
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
        table = pa.Table.from_batches([batch])
        for image_id, n, boxes, objectness in zip(table["image_id"].to_pylist(), table["num_boxes"].to_pylist(),
                                                  _list_rows(table, "boxes", np.float32),
                                                  _list_rows(table, "objectness", np.float32)):
            if (image_id is None or n is None or boxes is None or objectness is None
                    or boxes.size != 4 * n or objectness.size != n):
                raise ValueError(f"{path}: image {image_id}: boxes are not {n} x1,y1,x2,y2 rows with a score each")
            yield int(image_id), boxes.reshape(n, 4), objectness


# -- labels ------------------------------------------------------------------------------------------

LABELS_SCHEMA = pa.schema([
    ("key", pa.string()), ("num_regions", pa.int32()),
    ("pseudo_label", pa.list_(pa.int32())), ("pseudo_prob", pa.list_(pa.float32())),
    ("region_codes", pa.binary()), ("image_code", pa.binary()), ("image_pseudo_label", pa.int32()),
])
FLIPPED_FIELDS = [("flipped_region_codes", pa.binary()), ("flipped_image_code", pa.binary())]


def labels_schema(store_flipped: bool) -> pa.Schema:
    schema = LABELS_SCHEMA
    for name, typ in FLIPPED_FIELDS if store_flipped else ():
        schema = schema.append(pa.field(name, typ))
    return schema


def write_labels(stage_dir: StageDir, shard_id: int, columns: dict, store_flipped: bool) -> Path:
    """`columns`: key and the other fields of labels_schema(store_flipped), one list each."""
    path = stage_dir.parquet(shard_id)
    write_keyed(path, pa.table(columns, schema=labels_schema(store_flipped)))
    return path


@contextlib.contextmanager
def labels_writer(stage_dir: StageDir, shard_id: int, store_flipped: bool) -> Iterator:
    """`write(columns)` for a shard's labels a batch at a time (columns as `write_labels` takes them,
    row groups of at most a call each); the file appears under its name when the block ends without an
    error."""
    schema = labels_schema(store_flipped)
    with parquet_writer(stage_dir.parquet(shard_id), schema) as writer:
        yield lambda columns: _write_keyed_batch(writer, pa.table(columns, schema=schema))


def read_labels(stage_dir: StageDir, shard_id: int, columns: Optional[list[str]] = None) -> pa.Table:
    return read_parquet(stage_dir.parquet(shard_id), columns=columns)


@dataclass
class RegionLabels:
    """The teacher's outputs for one image's regions, in proposal order."""
    pseudo_label: np.ndarray              # [N] int64 concept ids
    pseudo_prob: np.ndarray               # [N] float32
    region_codes: bytes                   # N codes of the label codec, concatenated
    flipped_region_codes: Optional[bytes]  # the same for the mirrored image (label.store_flipped)


REGION_LABEL_COLUMNS = ["key", "pseudo_label", "pseudo_prob", "region_codes", "flipped_region_codes"]


def _region_labels(table: pa.Table) -> Iterator[tuple[str, RegionLabels]]:
    """(key, targets) of each complete row of a labels table (REGION_LABEL_COLUMNS that the file has)."""
    codes = table["region_codes"].to_pylist()
    flipped = "flipped_region_codes" in table.column_names
    flipped_codes = table["flipped_region_codes"].to_pylist() if flipped else [None] * len(codes)
    for key, y, p, c, fc in zip(table["key"].to_pylist(), _list_rows(table, "pseudo_label", np.int64),
                                _list_rows(table, "pseudo_prob", np.float32), codes, flipped_codes):
        if y is not None and p is not None and c is not None:
            yield key, RegionLabels(y, p, c, fc)


def read_region_labels(stage_dir: StageDir, shard_id: int) -> dict[str, RegionLabels]:
    """The region targets of a shard by key; a row missing any of them is left out."""
    path = stage_dir.parquet(shard_id)
    names = pq.read_schema(path).names
    return dict(_region_labels(read_parquet(path, [c for c in REGION_LABEL_COLUMNS if c in names])))


# -- a per-shard sidecar read by key (the trainer's) ---------------------------------------------

class KeyedRows:
    """A per-shard sidecar read by key, a row group at a time. It holds each key's row numbers and the row
    groups read last (at most `cache_bytes`, and always the group just read), never the file: the teacher
    targets of a 10000-image CC3M shard are about 1 GB. A file that fits in the cache is decoded once
    whatever the order of the keys.

        rows = KeyedRows(layout.labels.parquet(3), REGION_LABEL_COLUMNS)
        table = rows.table(key)      # the key's rows (several for a multi-caption image), in file order
    """

    def __init__(self, path: str | os.PathLike, columns: Sequence[str], cache_bytes: int = KEYED_CACHE_BYTES):
        self.path = Path(path)
        self.file = pq.ParquetFile(self.path)
        names = self.file.schema_arrow.names
        self.columns = [c for c in columns if c in names]
        meta = self.file.metadata
        self.starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        self.rows: dict[str, list[int]] = {}
        for g in range(meta.num_row_groups):   # the key column a row group at a time
            keys = self.file.read_row_group(g, columns=["key"]).column(0).to_pylist()
            for i, key in enumerate(keys, start=int(self.starts[g])):
                self.rows.setdefault(key, []).append(i)
        self.cache_bytes = cache_bytes
        self.groups: dict[int, pa.Table] = {}   # row group -> its rows, least recently used first
        self.cached_bytes = 0                   # of the tables in self.groups
        self.group_reads = 0

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def _group(self, g: int) -> pa.Table:
        if g in self.groups:
            self.groups[g] = self.groups.pop(g)   # now the most recently used
            return self.groups[g]
        table = self.groups[g] = self.file.read_row_group(g, columns=self.columns)
        self.group_reads += 1
        self.cached_bytes += table.nbytes
        while len(self.groups) > 1 and self.cached_bytes > self.cache_bytes:
            self.cached_bytes -= self.groups.pop(next(iter(self.groups))).nbytes
        return table

    def table(self, key: str) -> pa.Table:
        parts = []
        for i in self.rows.get(key, ()):
            g = int(np.searchsorted(self.starts, i, side="right")) - 1
            parts.append(self._group(g).slice(i - int(self.starts[g]), 1))
        if not parts:
            return self.file.schema_arrow.empty_table().select(self.columns)
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]


def _keyed_rows(path: Optional[Path], columns: Sequence[str]) -> Optional[KeyedRows]:
    return KeyedRows(path, columns) if path is not None and Path(path).exists() else None


class ShardSidecarReader:
    """The trainer's view of one shard's sidecars, by key: caption embeddings (each finite one), proposals
    (None when missing or damaged) and region targets (None when missing or incomplete). Memory: the
    keys and at most KEYED_CACHE_BYTES of row groups per file, whatever the shard's size. A missing file reads as no rows."""

    def __init__(self, caption_embeddings: Optional[Path], proposals: Optional[Path] = None,
                 labels: Optional[Path] = None):
        self._captions = _keyed_rows(caption_embeddings, ["key", "embedding"])
        self._proposals = _keyed_rows(proposals, PROPOSALS_SCHEMA.names)
        self._labels = _keyed_rows(labels, REGION_LABEL_COLUMNS)
        self._dim = self._caption_dim() if self._captions is not None else 0

    def _caption_dim(self) -> int:
        """D of the caption embeddings: the fixed list size, or (a plain list column) the longest row."""
        typ = self._captions.file.schema_arrow.field("embedding").type
        if pa.types.is_fixed_size_list(typ):
            return typ.list_size
        return max((int(_embedding_lengths(self._captions.file.read_row_group(g, ["embedding"])["embedding"]
                                           .combine_chunks()).max(initial=0))
                    for g in range(self._captions.file.num_row_groups)), default=0)

    def captions(self, key: str) -> list[np.ndarray]:
        """The key's caption embeddings (float16 [D] each, in file order), non-finite ones left out."""
        if self._captions is None or key not in self._captions:
            return []
        return [row for row in _embedding_rows(self._captions.table(key), self._dim) if np.isfinite(row).all()]

    def proposals(self, key: str) -> Optional[Proposals]:
        if self._proposals is None or key not in self._proposals:
            return None
        return next(_checked_proposals(self._proposals.path, self._proposals.table(key), True), None)

    def labels(self, key: str) -> Optional[RegionLabels]:
        if self._labels is None or key not in self._labels:
            return None
        return next((found for _, found in _region_labels(self._labels.table(key))), None)


# -- the region index's row ids ----------------------------------------------------------------------

REGION_IDS_SCHEMA = pa.schema([("key", pa.string()), ("region", pa.int32())])


def write_region_ids(path: str | os.PathLike, keys: Sequence[str], regions: Sequence[int]) -> None:
    """Row i of the region index is region `regions[i]` (proposal order) of sample `keys[i]`."""
    write_parquet(path, pa.table([pa.array(keys, pa.string()), pa.array(regions, pa.int32())],
                                 schema=REGION_IDS_SCHEMA))


def read_region_ids(path: str | os.PathLike) -> pa.Table:
    return read_parquet(path)


def sidecar_shards(stage_dir: StageDir) -> list[int]:
    """Shard ids that have a Parquet sidecar in a stage folder."""
    if not stage_dir.root.is_dir():
        return []
    return sorted(int(p.stem) for p in stage_dir.root.glob("[0-9]*.parquet"))
