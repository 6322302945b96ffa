"""Corpus readers: turn each supported input format into one table of rows to shard.

A row is (`source_id`, `captions` as a list of raw bytes, `image_ref`, `error`): one image with its
captions. Rows of the same image (COCO captions: one per caption; a caption table naming an image twice)
are merged into the first one's `captions` by `read_corpus`, so that an image is one sample, never
two in one batch. `image_ref` is a local path,
`tar://<path>#<offset>:<size>` for a member of an input tar (read later by offset, never extracted,
so a member named `../x` cannot write anywhere) or `parquet://<path>#<row group>:<row>` for the `jpg`
value of img2dataset's `parquet` output format. A row the reader already knows is bad (a remote URL,
an image without a caption, a symlink member, a damaged tar) keeps its place with `error` set
("reason: detail"), so it is counted and reported in the shard's Parquet rather than dropped.

Every file a corpus names is read through `CorpusFiles`: it must resolve inside the corpus root
(corpus.images_root for cc3m_tsv and coco_captions, else the corpus folder, or the corpus file's
folder) unless corpus.allow_outside_root is set, must be a regular file (no FIFO, device or folder;
checked without blocking), and at most corpus.max_file_bytes (images) or corpus.max_caption_bytes
(caption files, text members). Each refusal is a rejected row: `outside_root`, `not_a_file`,
`too_large`, `caption_too_large`.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import stat
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Optional
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.images import DEFAULT_MAX_FILE_BYTES
from pipeline.io import FileRefused, read_regular_file
from pipeline.sidecars import IMAGE_EXTENSIONS, is_plain_member, split_member_name

ROW_SCHEMA = pa.schema([("source_id", pa.string()), ("captions", pa.list_(pa.binary())),
                        ("image_ref", pa.string()), ("error", pa.string())])
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_MAX_CAPTION_BYTES = 65_536
TAR_BLOCK = tarfile.BLOCKSIZE


class CorpusError(ValueError):
    """The corpus cannot be sharded at all (empty, or no usable row); the message names the setting."""


@dataclass(frozen=True)
class CorpusFiles:
    """Where the files a corpus names may be read from, and how much of each (see the module doc)."""
    root: Optional[str]                          # None: anywhere (corpus.allow_outside_root)
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES

    def confined(self, path: str | os.PathLike) -> str:
        """The real path (links resolved) of a file the corpus names; FileRefused("outside_root") unless
        it lies inside the root."""
        real = os.path.realpath(path)
        if self.root is not None:
            root = os.path.realpath(self.root)
            if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
                raise FileRefused("outside_root", f"{path} is outside {self.root} (corpus.allow_outside_root: "
                                  "true lifts this)")
        return real

    def read(self, path: str | os.PathLike, max_bytes: Optional[int] = None, offset: int = 0,
             length: Optional[int] = None) -> bytes:
        """The bytes of a file the corpus names (FileRefused, FileNotFoundError, EOFError, OSError)."""
        limit = self.max_file_bytes if max_bytes is None else max_bytes
        return read_regular_file(self.confined(path), limit, offset, length)

    def regular(self, path: str | os.PathLike) -> str:
        """The real path of a regular file inside the root, for readers that open it themselves."""
        real = self.confined(path)
        mode = os.stat(real).st_mode
        if not stat.S_ISREG(mode):
            raise FileRefused("not_a_file", f"{path} is not a regular file")
        return real


def corpus_files(manifest) -> CorpusFiles:
    """The manifest's CorpusFiles: its root (see the module doc) and limits."""
    from pipeline.layout import synthetic_world

    corpus = manifest.corpus
    if corpus.format == "synthetic":
        root = synthetic_world(manifest)
    elif corpus.images_root and corpus.format in ("cc3m_tsv", "coco_captions"):
        root = manifest.resolve(corpus.images_root)
    else:
        path = Path(manifest.resolve(corpus.path))
        root = path if path.is_dir() else path.parent
    return CorpusFiles(None if corpus.allow_outside_root else str(root), corpus.max_file_bytes,
                       corpus.max_caption_bytes)


def _row(source_id: str, caption, image_ref: str, error: Optional[str] = None) -> dict:
    """`caption`: one caption (str or bytes) or a list of them (a table's list column)."""
    captions = list(caption) if isinstance(caption, (list, tuple)) else [caption]
    captions = [c.encode("utf-8", errors="surrogateescape") if isinstance(c, str) else c for c in captions]
    return {"source_id": source_id, "captions": captions, "image_ref": image_ref, "error": error}


def _local_ref(url: str, base: Path) -> tuple[str, Optional[str]]:
    """A path or file:// URL made absolute; any other URL scheme is a reason, not a download. Whether
    the file may be read is decided when it is read (CorpusFiles)."""
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https", "s3", "gs"):
        return url, "remote_url: download the corpus with img2dataset and use corpus.format: img2dataset"
    if parsed.scheme == "file":
        return unquote(parsed.path), None
    path = Path(url)
    return str(path if path.is_absolute() else base / path), None


# -- CC3M-style TSV / CSV / Parquet ------------------------------------------------------------

def read_caption_table(path: Path, images_root: Optional[Path], caption_column: str = "caption",
                       url_column: str = "url") -> Iterator[dict]:
    """CC3M's `caption<TAB>url` (with or without a header), a CSV, or a Parquet file."""
    base = images_root or path.parent
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        for i, (caption, url) in enumerate(zip(table[caption_column].to_pylist(),
                                               table[url_column].to_pylist())):
            ref, err = _local_ref(str(url or ""), base)
            yield _row(f"{path.name}:{i}", caption or b"", ref, err)
        return
    delimiter = b"," if path.suffix == ".csv" else b"\t"
    raw_lines = path.read_bytes().splitlines()
    if not raw_lines:
        return
    header = [h.strip().decode("utf-8", "replace") for h in raw_lines[0].split(delimiter)]
    if caption_column in header and url_column in header:
        ci, ui = header.index(caption_column), header.index(url_column)
        lines, first_line = raw_lines[1:], 2
    else:
        ci, ui, lines, first_line = 0, 1, raw_lines, 1  # CC3M's released TSV has no header
    for n, line in enumerate(lines, start=first_line):
        if not line.strip():
            continue
        if delimiter == b",":
            fields = [f.encode("utf-8", "surrogateescape") for f in
                      next(csv.reader([line.decode("utf-8", "surrogateescape")]))]
        else:
            fields = line.split(delimiter)
        if len(fields) <= max(ci, ui):
            yield _row(f"{path.name}:{n}", b"", "", "malformed_row: expected caption and url columns")
            continue
        url = fields[ui].strip().decode("utf-8", "replace")
        ref, err = _local_ref(url, base)
        yield _row(f"{path.name}:{n}", fields[ci].strip(), ref, err)


# -- img2dataset output ------------------------------------------------------------------------

def read_img2dataset(folder: Path, files: CorpusFiles) -> Iterator[dict]:
    """An img2dataset output folder: webdataset tars (in sub-folders too), else its `parquet` format (a
    `jpg` column per NNNNN.parquet), else its `files` format (NNNNN/key.jpg + key.txt)."""
    tars = sorted(folder.rglob("*.tar"))
    if tars:
        for tar_path in tars:
            yield from _read_tar(tar_path, folder, files)
        return
    parquets = sorted(folder.rglob("*.parquet"))
    if any("jpg" in _parquet_columns(p, files) for p in parquets):
        for path in parquets:       # every one, so that a damaged file is a row rather than left out
            yield from _read_parquet_output(path, folder, files)
        return
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        yield _image_with_sidecar_caption(image, folder, files)


def _label(path: Path, folder: Path) -> str:
    """A file's name in source ids: relative to the corpus folder, so same-named files in two
    sub-folders never share ids."""
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return str(path)


def _read_tar(tar_path: Path, folder: Path, files: CorpusFiles) -> Iterator[dict]:
    """One row per sample of an input tar, and one per stretch of it that holds no readable member.

    tarfile stops quietly at a header it cannot parse (or a zero block) in the middle of a tar and
    would drop the rest; here the reader looks past it for the next valid header, carries on there,
    and reports the bytes in between as a `corrupt_tar` row (with their offsets), so every member is
    either in a sample row or inside a reported stretch. A tar that ends before its end-of-archive
    marker gets a `truncated_tar` row."""
    label = _label(tar_path, folder)
    try:
        real = files.regular(tar_path)
    except FileRefused as err:
        yield _row(f"{label}:", b"", str(tar_path), str(err))
        return
    except OSError as err:              # e.g. a link to nothing
        yield _row(f"{label}:", b"", str(tar_path), f"read_error: {tar_path}: {err}")
        return
    samples: dict[str, dict] = {}
    problems: list[tuple[int, str]] = []      # (byte offset, "reason: detail")
    with open(real, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        position, data_end = 0, 0
        while True:
            stopped, data_end = _read_members(stream, position, tar_path, samples, files, data_end)
            # No progress: tarfile refuses a header that looks valid (e.g. a broken long-name or pax
            # header); it is part of the damage, and the search starts after it.
            resume, damaged = _next_header(stream, stopped, size, skip_first=stopped == position)
            if resume is not None:
                if damaged is not None:
                    problems.append((damaged[0], f"corrupt_tar: bytes {damaged[0]}-{damaged[1]} of {label} "
                                                 "hold no readable tar header; any member there is lost"))
                position = resume
                continue
            if damaged is not None:
                problems.append((damaged[0], f"truncated_tar: bytes {damaged[0]}-{size} of {label} hold no "
                                             "complete tar header (cut off or damaged at its end); later "
                                             "samples are lost"))
            elif not _ends_with_marker(stopped, size, data_end):
                problems.append((size, f"truncated_tar: {label} ends at byte {size}, before its "
                                       "end-of-archive marker; later samples are lost"))
            break
    for key, sample in samples.items():
        error = sample.get("error") or (None if "image" in sample else "missing_image: no image member") \
            or (None if "caption" in sample else "missing_caption: no .txt member")
        yield _row(f"{label}:{key}", sample.get("caption", b""), sample.get("image", ""), error)
    for offset, problem in problems:
        yield _row(f"{label}@{offset}", b"", str(tar_path), problem)


def _read_members(stream: BinaryIO, start: int, tar_path: Path, samples: dict, files: CorpusFiles,
                  data_end: int) -> tuple[int, int]:
    """Group the members tarfile reads from byte `start` into `samples`; returns where it stopped (the
    offset of the header it could not read, or of the end of the file) and where the last member's data
    ends."""
    stream.seek(start)
    try:
        tar = tarfile.open(fileobj=stream, mode="r:")
    except tarfile.TarError:          # the header at `start` (the file's first) is unreadable
        return start, data_end
    try:
        while (member := tar.next()) is not None:
            tar.members.clear()       # tarfile keeps every TarInfo; memory would grow with the tar
            data_end = member.offset_data + -(-member.size // TAR_BLOCK) * TAR_BLOCK
            if member.isdir():
                continue              # a folder entry carries no data
            key, ext = split_member_name(member.name)
            sample = samples.setdefault(key, {})
            seen = sample.setdefault("seen", set())
            if not is_plain_member(member):
                sample["error"] = f"unsafe_tar_member: {member.name!r} is not a plain file inside the tar"
            elif ext in seen:
                sample.setdefault("error", f"duplicate_tar_member: {member.name!r} appears twice")
            elif ext in IMAGE_EXTENSIONS:
                sample["image"] = f"tar://{tar_path}#{member.offset_data}:{member.size}"
            elif ext == "txt":
                if member.size > files.max_caption_bytes:
                    sample.setdefault("error", f"caption_too_large: {member.name!r} holds {member.size} bytes "
                                      f"(limit {files.max_caption_bytes})")
                else:
                    sample["caption"] = tar.extractfile(member).read()
            seen.add(ext)
    except (tarfile.TarError, EOFError):
        pass                          # tar.offset is the header it could not read
    return tar.offset, data_end


def _is_header(block: bytes) -> bool:
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
        return True
    except tarfile.HeaderError:
        return False


def _next_header(stream: BinaryIO, position: int, size: int,
                 skip_first: bool = False) -> tuple[Optional[int], Optional[tuple]]:
    """From where tarfile stopped: the offset of the next valid header (None at the end of the file) and
    the stretch (start, end) of non-zero blocks skipped on the way, if any. Zero blocks are skipped
    quietly: the end-of-archive marker, or the gap between two concatenated tars. `skip_first`: the
    block at `position` is damaged whatever it looks like."""
    damaged_from = None
    if skip_first and position < size:
        stream.seek(position)
        block = stream.read(TAR_BLOCK)
        damaged_from = None if block.count(0) == len(block) else position
        position += len(block)
    while position < size:
        stream.seek(position)
        block = stream.read(TAR_BLOCK)
        if block.count(0) == len(block):
            position += len(block)
            continue
        if len(block) == TAR_BLOCK and _is_header(block):
            return position, ((damaged_from, position) if damaged_from is not None else None)
        damaged_from = position if damaged_from is None else damaged_from
        position += len(block)
    return None, ((damaged_from, size) if damaged_from is not None else None)


def _ends_with_marker(stopped: int, size: int, data_end: int) -> bool:
    """Whether the last member's data is complete and two zero blocks follow it (tarfile itself stops
    quietly at a tar cut off at a member boundary)."""
    return size >= max(stopped, data_end) + 2 * TAR_BLOCK


def _parquet_columns(path: Path, files: CorpusFiles) -> list[str]:
    try:
        return pq.read_schema(files.regular(path)).names
    except (FileRefused, OSError, pa.ArrowException):
        return []     # unreadable: not taken for the parquet format (and reported if it is the only one)


def _read_parquet_output(path: Path, folder: Path, files: CorpusFiles) -> Iterator[dict]:
    """img2dataset's `parquet` output format: one row per input row, `jpg` holding the image (null when
    img2dataset failed), `key`, the caption in `caption` (or `txt`), `status` and `error_message`. Rows
    whose status is not `success` stay rejected with img2dataset's reason; the images are read later,
    a row group at a time (parquet_image)."""
    label, group = _label(path, folder), None
    try:
        source = pq.ParquetFile(files.regular(path))
        names = source.schema_arrow.names
        if "jpg" not in names:
            yield _row(f"{label}:", b"", str(path), f"missing_image: {label} has no jpg column")
            return
        caption_column = "caption" if "caption" in names else "txt" if "txt" in names else None
        wanted = [c for c in ("key", caption_column, "status", "error_message") if c and c in names]
        for group in range(source.num_row_groups):
            table = source.read_row_group(group, columns=wanted + ["jpg"])
            lengths = pc.binary_length(table["jpg"]).to_pylist()
            columns = {c: table[c].to_pylist() for c in wanted}
            for i, length in enumerate(lengths):
                key = (columns.get("key") or [None] * len(lengths))[i]
                caption = (columns.get(caption_column) or [None] * len(lengths))[i] if caption_column else None
                status = (columns.get("status") or [None] * len(lengths))[i]
                error = None
                if status not in (None, "success"):
                    message = (columns.get("error_message") or [None] * len(lengths))[i]
                    error = f"input_failed: img2dataset status {status}: {message}"
                elif not length:
                    error = "missing_image: no jpg value"
                elif caption is None:
                    error = "missing_caption: no caption value"
                yield _row(f"{label}:{key if key is not None else f'{group}:{i}'}", caption or b"",
                           f"parquet://{path}#{group}:{i}", error)
    except FileRefused as err:
        yield _row(f"{label}:", b"", str(path), str(err))
    except (OSError, pa.ArrowException) as err:
        # The rows before the damage are kept; the rest of the file is this one row.
        where = f"from row group {group} on" if group is not None else "nothing"
        yield _row(f"{label}@{group}" if group is not None else f"{label}:", b"", str(path),
                   f"corrupt_parquet: {label}: {where} can be read ({type(err).__name__}: {err})")


def _image_with_sidecar_caption(image: Path, root: Path, files: CorpusFiles) -> dict:
    caption_file = image.with_suffix(".txt")
    sid = str(image.relative_to(root))
    try:
        caption = files.read(caption_file, files.max_caption_bytes)
    except FileNotFoundError:
        return _row(sid, b"", str(image), "missing_caption: no same-name .txt file")
    except FileRefused as err:
        reason = "caption_too_large" if err.reason == "too_large" else err.reason
        return _row(sid, b"", str(image), f"{reason}: caption file {str(err).partition(': ')[2]}")
    except (OSError, EOFError) as err:
        return _row(sid, b"", str(image), f"read_error: caption file {caption_file}: {err}")
    return _row(sid, caption.strip(), str(image))


# -- COCO captions ---------------------------------------------------------------------------

def read_coco_captions(path: Path, images_root: Optional[Path]) -> Iterator[dict]:
    """A COCO captions JSON: one row per caption, those of an image adjacent (read_corpus merges them)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    base = images_root or path.parent
    files = {img["id"]: img["file_name"] for img in data.get("images", [])}
    for ann in sorted(data.get("annotations", []), key=lambda a: (a["image_id"], a["id"])):
        file_name = files.get(ann["image_id"])
        sid = f"coco:{ann['id']}"
        if file_name is None:
            yield _row(sid, ann.get("caption") or "", "", f"unknown_image_id: {ann['image_id']}")
        else:
            yield _row(sid, ann.get("caption") or "", str(base / file_name))


# -- a folder of images with .txt captions -----------------------------------------------------

def read_folder(folder: Path, files: CorpusFiles) -> Iterator[dict]:
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        yield _image_with_sidecar_caption(image, folder, files)


# -- dispatch ------------------------------------------------------------------------------------

def read_corpus(manifest) -> pa.Table:
    """All input rows of the manifest's corpus, in a deterministic order, as an Arrow table.

    A corpus without rows, or whose every row the reader already rejects, is a CorpusError naming
    corpus.path: nothing would be sharded."""
    from pipeline.layout import synthetic_world

    corpus = manifest.corpus
    path = manifest.resolve(corpus.path)
    images_root = manifest.resolve(corpus.images_root)
    if corpus.format == "synthetic":
        world = synthetic_world(manifest)
        # world.json is written last: without it the world is absent or half-written.
        if not (world / "world.json").is_file() or not (world / "captions.tsv").is_file():
            raise FileNotFoundError(f"{world}: no synthetic world; run `regionclip synth MANIFEST` first")
        rows = read_caption_table(world / "captions.tsv", world)
    elif path is None or not path.exists():
        raise FileNotFoundError(f"corpus.path: {corpus.path!r} does not exist; point it at the "
                                f"{corpus.format} input (see README, 'Plugging in real data')")
    elif corpus.format == "cc3m_tsv":
        rows = read_caption_table(path, images_root, corpus.caption_column, corpus.url_column)
    elif corpus.format == "img2dataset":
        rows = read_img2dataset(path, corpus_files(manifest))
    elif corpus.format == "coco_captions":
        rows = read_coco_captions(path, images_root)
    else:
        rows = read_folder(path, corpus_files(manifest))
    # Rows become Arrow in batches and images and captions are known by 16-byte digests, so the reading
    # holds the table (about 1 GB for CC3M's 3.3M rows) rather than a Python dict per row and every
    # caption twice; one chunk in the end, as the corpus fingerprint's bytes depend on the chunking.
    batches, pending, written, count, refused = [], [], 0, 0, Counter()
    images: dict[bytes, tuple] = {}   # image digest -> (its row's index, (caption digest, source_id), ...)
    merged: dict[int, list] = {}      # row index -> captions of later rows of the same image
    for row in rows:
        count += 1
        if row["error"] is None:
            image = _digest(row["image_ref"])
            caption = _digest(row["captions"])
            first = images.get(image)
            if first is None:
                images[image] = (written, (caption, row["source_id"]))
            else:
                same = next((sid for digest, sid in first[1:] if digest == caption), None)
                if same is not None:
                    row["error"] = f"duplicate_row: same image and caption as {same}"
                else:                 # another caption of an image already read: it joins that row
                    images[image] = (*first, (caption, row["source_id"]))
                    merged.setdefault(first[0], []).extend(row["captions"])
                    row = None
        if row is not None:
            if row["error"] is not None:
                refused[row["error"].split(":")[0]] += 1
            pending.append(row)
            written += 1
        if len(pending) == BATCH_ROWS:
            batches.append(pa.Table.from_pylist(pending, schema=ROW_SCHEMA))
            pending = []
        if corpus.max_rows and count >= corpus.max_rows:
            break
    where = f"corpus.path: {corpus.path!r} ({corpus.format})"
    if count == 0:
        raise CorpusError(f"{where} holds no rows; nothing to shard")
    if sum(refused.values()) == count:
        reasons = ", ".join(f"{r} {n}" for r, n in refused.most_common())
        raise CorpusError(f"{where}: none of its {count} rows can be used ({reasons}); nothing to shard")
    batches.append(pa.Table.from_pylist(pending, schema=ROW_SCHEMA))
    return pa.concat_tables(_with_merged_captions(batches, merged)).combine_chunks()


BATCH_ROWS = 65536


def _digest(value) -> bytes:
    return hashlib.blake2b(repr(value).encode(), digest_size=16).digest()


def _with_merged_captions(batches: list, merged: dict[int, list]) -> list:
    """The batches (BATCH_ROWS rows each) with each row's merged captions appended to its own."""
    out = []
    for b, batch in enumerate(batches):
        rows = {i - b * BATCH_ROWS: extra for i, extra in merged.items() if i // BATCH_ROWS == b}
        if rows:
            captions = batch.column("captions").to_pylist()
            for i, extra in rows.items():
                captions[i] += extra
            batch = batch.set_column(batch.schema.get_field_index("captions"), "captions",
                                     pa.array(captions, ROW_SCHEMA.field("captions").type))
        out.append(batch)
    return out


def corpus_fingerprint(rows: pa.Table, root: Optional[Path] = None) -> str:
    """Identifies the input rows (ids, captions, image references), cheaply, without reading images.

    Image references under `root` count relative to it: a corpus that lives inside the run folder (the
    synthetic world) keeps its fingerprint when the run folder is copied or moved."""
    if root is not None:
        prefix = str(root).rstrip("/") + "/"
        refs = [r[len(prefix):] if r.startswith(prefix) else r for r in rows.column("image_ref").to_pylist()]
        rows = rows.set_column(rows.schema.get_field_index("image_ref"), "image_ref", pa.array(refs, pa.string()))
    sink = _HashingSink()
    pq.write_table(rows, sink, compression="none")  # hashed as written, never held
    return sink.hash.hexdigest()[:16]


class _HashingSink:
    """A write-only file that hashes what is written to it (sha256)."""

    def __init__(self):
        self.hash, self.position, self.closed = hashlib.sha256(), 0, False

    def write(self, data) -> int:
        self.hash.update(data)
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def read_image_bytes(image_ref: str, files: CorpusFiles) -> bytes:
    """The bytes behind an image reference, read only as `files` allows (raises FileRefused,
    FileNotFoundError, EOFError or OSError)."""
    if image_ref.startswith("tar://"):
        tar_path, _, span = image_ref[len("tar://"):].rpartition("#")
        offset, size = (int(x) for x in span.split(":"))
        return files.read(tar_path, offset=offset, length=size)
    if image_ref.startswith("parquet://"):
        path, _, place = image_ref[len("parquet://"):].rpartition("#")
        group, row = (int(x) for x in place.split(":"))
        real = files.regular(path)
        try:
            value = _parquet_images(real, group, os.stat(real).st_mtime_ns)[row].as_py()
        except (pa.ArrowException, IndexError) as err:
            raise OSError(f"{path}: row group {group} row {row}: {err}") from None
        if value is None:
            raise FileNotFoundError(f"{path}: row group {group} row {row} has no jpg value")
        if len(value) > files.max_file_bytes:
            raise FileRefused("too_large", f"{path}: row group {group} row {row}: {len(value)} bytes exceed "
                              f"the limit of {files.max_file_bytes}")
        return value
    if not image_ref:
        raise FileNotFoundError("no image reference")
    return files.read(image_ref)


@functools.lru_cache(maxsize=1)
def _parquet_images(path: str, group: int, mtime_ns: int) -> pa.ChunkedArray:
    """The `jpg` column of one row group: rows are sharded in order, so each group is read once."""
    return pq.ParquetFile(path).read_row_group(group, columns=["jpg"]).column(0)
