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

import codecs
import csv
import functools
import hashlib
import itertools
import json
import os
import stat
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Optional
from urllib.parse import quote, unquote_to_bytes, urlparse

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
    """`caption`: one caption (str or bytes) or a list of them (a table's list column). Names that are not
    valid UTF-8 (a file name's raw bytes) are kept: image_ref as a percent-encoded file:// URL
    (`storable_ref`, read back by `ref_path`), ids and messages with the bytes escaped."""
    captions = list(caption) if isinstance(caption, (list, tuple)) else [caption]
    captions = [c.encode("utf-8", errors="surrogateescape") if isinstance(c, str) else c for c in captions]
    return {"source_id": _text(source_id), "captions": captions, "image_ref": storable_ref(image_ref),
            "error": None if error is None else _text(error)}


def _text(value: str) -> str:
    """A name or message as valid UTF-8: bytes of a non-UTF-8 file name shown as \\x.. escapes."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape" if _fs_encodable(value) else "backslashreplace"
                            ).decode("utf-8", "backslashreplace")


def _fs_encodable(value: str) -> bool:
    try:
        os.fsencode(value)
        return True
    except UnicodeEncodeError:
        return False


def storable_ref(path: str) -> str:
    """A local path as an image_ref (an Arrow string): itself, or, when the file name is not valid UTF-8
    (os.fsdecode's surrogates), a file:// URL with its bytes percent-encoded, so the file is still found."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        if not _fs_encodable(path):
            return _text(path)          # not a name the file system can hold: it is reported missing
        return "file://" + quote(os.fsencode(path))


def ref_path(ref: str) -> str:
    """The local path of an image_ref written by storable_ref (or a file:// URL of a corpus)."""
    if ref.startswith("file://"):
        return os.fsdecode(unquote_to_bytes(urlparse(ref).path))
    return ref


def _local_ref(url: str, base: Path) -> tuple[str, Optional[str]]:
    """A path or file:// URL made absolute; any other URL scheme is a reason, not a download. Whether
    the file may be read is decided when it is read (CorpusFiles)."""
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https", "s3", "gs"):
        return url, "remote_url: download the corpus with img2dataset and use corpus.format: img2dataset"
    if parsed.scheme == "file":
        return ref_path(url), None
    path = Path(url)
    return str(path if path.is_absolute() else base / path), None


# -- CC3M-style TSV / CSV / Parquet ------------------------------------------------------------

TEXT_TYPES = (pa.string(), pa.large_string(), pa.binary(), pa.large_binary())


def read_caption_table(path: Path, images_root: Optional[Path], caption_column: str = "caption",
                       url_column: str = "url") -> Iterator[dict]:
    """CC3M's `caption<TAB>url` (with or without a header), a CSV, or a Parquet file (a caption column of
    text or a list of texts, a url column of text). Rows end at a line feed only (a CR inside a caption is
    whitespace, a CR LF ends a row); a UTF-8 byte order mark before the header is ignored; a url's bytes
    are the file name's, UTF-8 or not."""
    base = images_root or path.parent
    if path.suffix == ".parquet":
        yield from _read_caption_parquet(path, base, caption_column, url_column)
        return
    delimiter = b"," if path.suffix == ".csv" else b"\t"
    with open(path, "rb") as stream:
        lines = (line[:-1] if line.endswith(b"\n") else line for line in stream)   # LF only: a CR stays
        lines = (line[:-1] if line.endswith(b"\r") else line for line in lines)
        first = next(lines, None)
        if first is None:
            return
        first = first.removeprefix(codecs.BOM_UTF8)
        rows = _csv_rows(itertools.chain([first], lines)) if delimiter == b"," else \
            ((n, line.split(delimiter)) for n, line in enumerate(itertools.chain([first], lines), start=1))
        header = None
        for n, fields in rows:
            if header is None:
                header = [h.strip().decode("utf-8", "replace") for h in fields] if fields is not None else []
                if caption_column in header and url_column in header:
                    ci, ui = header.index(caption_column), header.index(url_column)
                    continue
                ci, ui = 0, 1        # CC3M's released TSV has no header
            if fields is None:
                yield _row(f"{path.name}:{n}", b"", "", "malformed_row: not a valid CSV row")
                continue
            if not any(f.strip() for f in fields):
                continue
            if len(fields) <= max(ci, ui):
                yield _row(f"{path.name}:{n}", b"", "", "malformed_row: expected caption and url columns")
                continue
            ref, err = _local_ref(os.fsdecode(fields[ui].strip()), base)
            yield _row(f"{path.name}:{n}", fields[ci].strip(), ref, err)


def _csv_rows(lines: Iterator[bytes]) -> Iterator[tuple[int, Optional[list]]]:
    """(line number, fields as bytes) of each CSV row (None: a row the csv module refuses)."""
    text = (line.replace(b"\r", b" ").decode("utf-8", "surrogateescape") + "\n" for line in lines)
    reader = csv.reader(text)
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error:
            yield reader.line_num, None
            continue
        yield reader.line_num, [f.encode("utf-8", "surrogateescape") for f in fields]


def _read_caption_parquet(path: Path, base: Path, caption_column: str, url_column: str) -> Iterator[dict]:
    """A Parquet caption table, a record batch at a time; a missing column or one of the wrong type is a
    CorpusError naming the file and the setting, before any row."""
    try:
        source = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise CorpusError(f"corpus.path: {path} is not a readable Parquet file ({type(err).__name__}: {err})") \
            from None
    schema = source.schema_arrow
    for column, setting, kinds in ((caption_column, "caption_column", "text or a list of texts"),
                                   (url_column, "url_column", "text")):
        if column not in schema.names:
            raise CorpusError(f"corpus.path: {path} has no column {column!r} (corpus.{setting}); its columns: "
                              f"{', '.join(schema.names)}")
        kind = schema.field(column).type
        is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind)
        element = kind.value_type if is_list else kind
        if element not in TEXT_TYPES or (is_list and column == url_column):
            raise CorpusError(f"corpus.path: {path}: column {column!r} (corpus.{setting}) holds {kind}, not "
                              f"{kinds}")
    index = 0
    try:
        for batch in source.iter_batches(columns=[caption_column, url_column]):
            for caption, url in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                if isinstance(url, bytes):
                    url = os.fsdecode(url)
                ref, err = _local_ref(url or "", base)
                yield _row(f"{path.name}:{index}", [c or b"" for c in caption] if isinstance(caption, list)
                           else caption or b"", ref, err)
                index += 1
    except (OSError, pa.ArrowException) as err:
        raise CorpusError(f"corpus.path: {path}: rows from {index} on cannot be read ({type(err).__name__}: "
                          f"{err})") from None


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
                sample["image"] = f"tar://{storable_ref(str(tar_path))}#{member.offset_data}:{member.size}"
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
            # every column once per row group (a missing one: nulls), so each row costs the same
            absent = [None] * len(lengths)
            keys, captions, statuses, messages = (table[c].to_pylist() if c in wanted else absent
                                                  for c in ("key", caption_column, "status", "error_message"))
            for i, length in enumerate(lengths):
                key, caption, status = keys[i], captions[i], statuses[i]
                error = None
                if status not in (None, "success"):
                    error = f"input_failed: img2dataset status {status}: {messages[i]}"
                elif not length:
                    error = "missing_image: no jpg value"
                elif caption is None:
                    error = "missing_caption: no caption value"
                yield _row(f"{label}:{key if key is not None else f'{group}:{i}'}", caption or b"",
                           f"parquet://{storable_ref(str(path))}#{group}:{i}", error)
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
    """A COCO captions JSON: one row per caption, ordered by image and annotation id (read_corpus merges
    the captions of an image). A file that is not a JSON object with `images` and `annotations` lists is
    a CorpusError naming it; an annotation or image record of the wrong shape is a rejected row
    `malformed_annotation` (after the others, in file order)."""
    data = _coco_json(path)
    base = images_root or path.parent
    files: dict[int, str] = {}
    bad_images: dict[int, str] = {}
    for n, img in enumerate(data["images"]):
        image_id = img.get("id") if isinstance(img, dict) else None
        if not _is_id(image_id):
            continue            # no annotation can name it: any that tries is `unknown_image_id`
        name = img.get("file_name")
        if not isinstance(name, str) or not name:
            bad_images[image_id] = f"image {image_id} has no file_name text (got {type(name).__name__})"
        elif files.setdefault(image_id, name) != name:
            bad_images[image_id] = f"image {image_id} is listed twice with different file names"
    usable, malformed = [], []
    for n, ann in enumerate(data["annotations"]):
        problem = _annotation_problem(ann, n)
        if problem:
            ann_id = ann.get("id") if isinstance(ann, dict) else None
            malformed.append((f"coco:{ann_id if _is_id(ann_id) else f'#{n}'}", problem))
        else:
            usable.append(ann)
    for ann in sorted(usable, key=lambda a: (a["image_id"], a["id"])):
        sid, image_id = f"coco:{ann['id']}", ann["image_id"]
        if image_id in bad_images:
            yield _row(sid, ann["caption"], "", f"malformed_annotation: {bad_images[image_id]}")
        elif image_id not in files:
            yield _row(sid, ann["caption"], "", f"unknown_image_id: {image_id}")
        else:
            yield _row(sid, ann["caption"], str(base / files[image_id]))
    for sid, problem in malformed:
        yield _row(sid, b"", "", f"malformed_annotation: {problem}")


def _coco_json(path: Path) -> dict:
    """A COCO captions file parsed, or a CorpusError naming it and corpus.path."""
    where = f"corpus.path: {path}"
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise CorpusError(f"{where} is not UTF-8 text (byte {err.start}); a COCO captions file is JSON") from None
    except json.JSONDecodeError as err:
        raise CorpusError(f"{where} is not valid JSON: {err}") from None
    except RecursionError:
        raise CorpusError(f"{where}: JSON nested too deeply to be a COCO captions file") from None
    if not isinstance(data, dict):
        raise CorpusError(f"{where}: a COCO captions file is a JSON object with images and annotations, "
                          f"not a {type(data).__name__}")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise CorpusError(f"{where}: {key!r} must be a list (got {type(data.get(key)).__name__})")
    return data


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _annotation_problem(ann, n: int) -> Optional[str]:
    if not isinstance(ann, dict):
        return f"annotation #{n} is a {type(ann).__name__}, not an object"
    for key in ("id", "image_id"):
        if not _is_id(ann.get(key)):
            return f"annotation #{n}: {key} must be a whole number (got {ann.get(key)!r:.40})"
    if not isinstance(ann.get("caption"), str):
        return f"annotation {ann['id']}: caption must be text (got {type(ann.get('caption')).__name__})"
    return None


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
    else:
        _refuse_run_folder_inside(manifest, path)
    if corpus.format == "synthetic":
        pass
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
    # Every lookup is a dict's: the time per row does not grow with the rows already read (100,000
    # captions of one image are as fast as 100,000 images; bench/linear_rows.py).
    batches, pending, written, count, refused = [], [], 0, 0, Counter()
    images: dict[bytes, int] = {}       # image digest -> the index of its row
    pairs: dict[bytes, str] = {}        # image digest + caption digest -> the source_id that had them
    merged: dict[int, list] = {}        # row index -> captions of later rows of the same image
    for row in rows:
        count += 1
        if row["error"] is None:
            image = _digest(row["image_ref"])
            pair = image + _digest(row["captions"])
            first = images.setdefault(image, written)
            known = len(pairs)
            same = pairs.setdefault(pair, row["source_id"])
            if len(pairs) == known:       # this image with this caption was read before
                row["error"] = f"duplicate_row: same image and caption as {same}"
            elif first != written:        # another caption of an image already read: it joins that row
                merged.setdefault(first, []).extend(row["captions"])
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


def _refuse_run_folder_inside(manifest, corpus_path: Path) -> None:
    """A CorpusError when the run folder and the folder a folder or img2dataset corpus is read from overlap:
    the reader, which takes every tar or picture under its folder, would read the run's own shards and
    pictures as corpus (every rerun finding more rows), or the shard stage would rewrite the tars it reads."""
    if manifest.corpus.format not in ("folder", "img2dataset"):
        return                  # these name their files row by row
    folder = os.path.realpath(corpus_path)
    run = os.path.realpath(manifest.output_path)
    where = (f"output_dir {manifest.output_dir!r} ({run}) and corpus.path {manifest.corpus.path!r} ({folder})")
    if run == folder or run.startswith(folder.rstrip(os.sep) + os.sep):
        raise CorpusError(f"{where}: the run folder is inside the corpus folder, so the {manifest.corpus.format} "
                          "reader would read the run's own files as corpus; put output_dir outside the corpus folder")
    if folder.startswith(run.rstrip(os.sep) + os.sep):
        raise CorpusError(f"{where}: the corpus folder is inside the run folder, whose files the run rewrites; "
                          "keep the corpus outside output_dir")


def _digest(value) -> bytes:
    return hashlib.blake2b(repr(value).encode(), digest_size=16).digest()


def _with_merged_captions(batches: list, merged: dict[int, list]) -> list:
    """The batches (BATCH_ROWS rows each) with each row's merged captions appended to its own."""
    by_batch: dict[int, dict[int, list]] = {}
    for i, extra in merged.items():
        by_batch.setdefault(i // BATCH_ROWS, {})[i % BATCH_ROWS] = extra
    out = []
    for b, batch in enumerate(batches):
        rows = by_batch.get(b)
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
        return files.read(ref_path(tar_path), offset=offset, length=size)
    if image_ref.startswith("parquet://"):
        path, _, place = image_ref[len("parquet://"):].rpartition("#")
        group, row = (int(x) for x in place.split(":"))
        path = ref_path(path)
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
    return files.read(ref_path(image_ref))


@functools.lru_cache(maxsize=1)
def _parquet_images(path: str, group: int, mtime_ns: int) -> pa.ChunkedArray:
    """The `jpg` column of one row group: rows are sharded in order, so each group is read once."""
    return pq.ParquetFile(path).read_row_group(group, columns=["jpg"]).column(0)
