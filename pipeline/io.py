"""Atomic file writes: every output is written under a temporary name and renamed into place.

A crash (even SIGKILL) therefore leaves either the old file, the complete new file, or a stray
`.tmp-*` file that nothing reads and the next run removes; never a half-written output.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")
    if os.path.lexists(tmp):
        os.unlink(tmp)      # a leftover, or a link planted there: writing would follow it
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8"))


def read_json(path: str | os.PathLike):
    """A JSON file's content; a JSONDecodeError names the file (the message a user sees)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise json.JSONDecodeError(f"{path}: {err.msg}", err.doc, err.pos) from None


def write_parquet(path: str | os.PathLike, table: pa.Table, row_group_rows: int | None = None) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_rows)


@contextlib.contextmanager
def parquet_writer(path: str | os.PathLike, schema: pa.Schema) -> Iterator[pq.ParquetWriter]:
    """A Parquet file written a table at a time (one row group each; memory holds one), to a temporary
    name renamed into place when the block ends without an error."""
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        yield writer


def read_parquet(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(path, columns=columns)


class FileRefused(OSError):
    """An input file that is not read: `reason` is a short code (not_a_file, too_large, outside_root)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def read_regular_file(path: str | os.PathLike, max_bytes: int, offset: int = 0,
                      length: int | None = None) -> bytes:
    """The bytes of a regular file (or `length` bytes from `offset`), refusing anything else before reading.

    A FIFO, a device (/dev/zero), a socket or a folder is FileRefused("not_a_file") without blocking on
    it (opened non-blocking, checked with fstat); more than `max_bytes` is FileRefused("too_large")
    before a byte is read. FileNotFoundError when absent, EOFError when the file ends early."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileRefused("not_a_file", f"{path} is a {_kind(info.st_mode)}, not a regular file")
        wanted = max(0, info.st_size - offset) if length is None else length
        if wanted > max_bytes:
            raise FileRefused("too_large", f"{path}: {wanted} bytes exceed the limit of {max_bytes}")
        os.lseek(fd, offset, os.SEEK_SET)
        chunks, left = [], wanted
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 24))):
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
    finally:
        os.close(fd)
    if len(data) != wanted:
        raise EOFError(f"{path}: {len(data)} of {wanted} bytes at offset {offset}: the file ends early")
    return data


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | os.PathLike) -> dict:
    """Size and checksum of an output file, as stored in stage stats for `regionclip verify`."""
    path = Path(path)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


# The names atomic_path gives its temporaries: `.tmp-<pid>-<name>`.
TMP_NAME = re.compile(rf"{re.escape(TMP_PREFIX)}\d+-.")


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temporaries a killed run left in `folder` and below (files named as atomic_path names
    them); returns how many were removed. Links are never followed: a linked folder is not entered (nor
    is `folder` itself when it is a link), and a link named like a temporary is removed as a link."""
    if os.path.islink(folder) or not os.path.isdir(folder):
        return 0
    removed = 0
    for parent, _, names in os.walk(folder):        # followlinks=False
        for name in names:
            if TMP_NAME.match(name):
                os.unlink(os.path.join(parent, name))
                removed += 1
    return removed


# What a file can be found to be, against its record (file_record).
MISSING, SIZE, CHECKSUM = "missing", "size mismatch", "checksum mismatch"


def check_file(path: Path, record: dict, full: bool = True) -> Optional[str]:
    """None if `path` matches its record {bytes, sha256}; else the problem."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return MISSING
    if record.get("bytes") is not None and size != record["bytes"]:
        return f"{SIZE}: {size} bytes, recorded {record['bytes']}"
    if full and record.get("sha256") and sha256_file(path) != record["sha256"]:
        return CHECKSUM
    return None
