"""Corpus readers: turn each supported input format into one table of rows to shard.

A row is (`source_id`, `captions` as a list of raw bytes, `image_ref`, `error`): one image with its
captions. Rows of the same image (COCO captions: one per caption; a caption table naming an image twice)
are merged into the first one's `captions` by `read_corpus`, so that an image is one sample, never
two in one batch. `image_ref` is a local path or
`tar://<path>#<offset>:<size>` for a member of an img2dataset tar (read later by offset, never
extracted, so a member named `../x` cannot write anywhere). A row the reader already knows is bad
(a remote URL, an image without a caption, a symlink member, a truncated tar) keeps its place with
`error` set, so it is counted and reported in the shard's Parquet rather than dropped.
"""
from __future__ import annotations

import csv
import hashlib
import json
import tarfile
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.parquet as pq

ROW_SCHEMA = pa.schema([("source_id", pa.string()), ("captions", pa.list_(pa.binary())),
                        ("image_ref", pa.string()), ("error", pa.string())])
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _row(source_id: str, caption, image_ref: str, error: Optional[str] = None) -> dict:
    """`caption`: one caption (str or bytes) or a list of them (a table's list column)."""
    captions = list(caption) if isinstance(caption, (list, tuple)) else [caption]
    captions = [c.encode("utf-8", errors="surrogateescape") if isinstance(c, str) else c for c in captions]
    return {"source_id": source_id, "captions": captions, "image_ref": image_ref, "error": error}


def _local_ref(url: str, base: Path) -> tuple[str, Optional[str]]:
    """A path or file:// URL made absolute; any other URL scheme is a reason, not a download."""
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

def read_img2dataset(folder: Path) -> Iterator[dict]:
    """An img2dataset output folder: webdataset tars, or the `files` format (NNNNN/key.jpg + .txt)."""
    tars = sorted(folder.glob("*.tar"))
    if tars:
        for tar_path in tars:
            yield from _read_tar_members(tar_path)
        return
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        yield _image_with_sidecar_caption(image, folder)


def _read_tar_members(tar_path: Path) -> Iterator[dict]:
    samples: dict[str, dict] = {}
    order: list[str] = []
    truncated = None
    end_of_last_member = 0
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for member in tar:
                end_of_last_member = member.offset_data + -(-member.size // 512) * 512
                name = member.name
                key, _, ext = Path(name).name.partition(".")
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                if not member.isfile() or name.startswith(("/", "..")) or "/../" in name:
                    samples[key]["unsafe"] = f"unsafe_tar_member: {name!r} is not a plain file inside the tar"
                    continue
                if ext in ("jpg", "jpeg", "png", "webp"):
                    samples[key]["image"] = f"tar://{tar_path}#{member.offset_data}:{member.size}"
                elif ext == "txt":
                    samples[key]["caption"] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as err:
        truncated = str(err) or type(err).__name__
    # tarfile stops quietly at a cut-off header; a complete tar ends with two zero blocks.
    if truncated is None and tar_path.stat().st_size < end_of_last_member + 1024:
        truncated = "the file ends before the end-of-archive marker"
    for key in order:
        s = samples[key]
        sid = f"{tar_path.name}:{key}"
        error = s.get("unsafe") or (None if "image" in s else "missing_image: no image member") \
            or (None if "caption" in s else "missing_caption: no .txt member")
        yield _row(sid, s.get("caption", b""), s.get("image", ""), error)
    if truncated is not None:
        yield _row(f"{tar_path.name}:<end>", b"", str(tar_path),
                   f"truncated_tar: reading stopped early ({truncated}); later samples are lost")


def _image_with_sidecar_caption(image: Path, root: Path) -> dict:
    caption_file = image.with_suffix(".txt")
    sid = str(image.relative_to(root))
    if not caption_file.is_file():
        return _row(sid, b"", str(image), "missing_caption: no same-name .txt file")
    return _row(sid, caption_file.read_bytes().strip(), str(image))


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

def read_folder(folder: Path) -> Iterator[dict]:
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        yield _image_with_sidecar_caption(image, folder)


# -- dispatch ------------------------------------------------------------------------------------

def read_corpus(manifest) -> pa.Table:
    """All input rows of the manifest's corpus, in a deterministic order, as an Arrow table."""
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
        rows = read_img2dataset(path)
    elif corpus.format == "coco_captions":
        rows = read_coco_captions(path, images_root)
    else:
        rows = read_folder(path)
    # Rows become Arrow in batches and images and captions are known by 16-byte digests, so the reading
    # holds the table (about 1 GB for CC3M's 3.3M rows) rather than a Python dict per row and every
    # caption twice; one chunk in the end, as the corpus fingerprint's bytes depend on the chunking.
    batches, pending, written, count = [], [], 0, 0
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
            pending.append(row)
            written += 1
        if len(pending) == BATCH_ROWS:
            batches.append(pa.Table.from_pylist(pending, schema=ROW_SCHEMA))
            pending = []
        if corpus.max_rows and count >= corpus.max_rows:
            break
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


def read_image_bytes(image_ref: str) -> bytes:
    """The bytes behind an image reference (raises FileNotFoundError / EOFError)."""
    if image_ref.startswith("tar://"):
        tar_path, _, span = image_ref[len("tar://"):].rpartition("#")
        offset, size = (int(x) for x in span.split(":"))
        with open(tar_path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise EOFError(f"tar member truncated: {len(data)} of {size} bytes")
        return data
    if not image_ref:
        raise FileNotFoundError("no image reference")
    return Path(image_ref).read_bytes()
