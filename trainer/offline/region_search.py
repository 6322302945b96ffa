"""Region search: a FAISS inner-product index over region embeddings, built by a CLIP model's region
encoder over stored proposals, and searched with text or picture embeddings.

An index file comes with a Parquet of (key, region) whose row i names index row i: region `region`
(proposal order) of sample `key` (pipeline/sidecars.py write_region_ids). The label stage writes one
from its stored codes (trainer/offline/region_index.py, label.region_index); `build_region_index` makes
one with any CLIP, e.g. the pretrained student, or a teacher whose codec keeps no embeddings.

    embedder = Teacher(clip_model, concept_embeddings, min_size=256, max_size=384)   # labels.py
    rows = build_region_index(embedder, [(tar, iter_proposals(...)), ...], "x.faiss", "x.parquet")
    index = RegionIndex.read("x.faiss", "x.parquet")   # a flat index goes to the GPUs with GPU FAISS
    hits = index.search(query_embeddings, k=16)        # per query: [RegionHit(key, region, score), ...]

Building streams the shards (a bounded number of decoded images in memory); the index itself holds
every region's embedding (float32, D values each), as any flat FAISS index does.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from pipeline.io import atomic_path
from pipeline.sidecars import Proposals, read_region_ids, write_region_ids
from trainer.offline.faiss_gpu import index_on_gpus
from trainer.offline.labels import Teacher
from trainer.offline.streaming import shard_batches


@dataclass(frozen=True)
class RegionHit:
    key: str
    region: int          # position in the sample's proposals
    score: float         # cosine similarity to the query


def build_region_index(embedder: Teacher, shards: Iterable[tuple[Path, Iterable[Proposals]]], index_path: Path,
                       ids_path: Path, *, dim: int, batch_size: int = 8, threads: int = 1) -> int:
    """Embed every proposal of every (tar, proposals in shard order) pair with `embedder` (region
    embeddings, L2-normalized), write an IndexFlatIP and its (key, region) rows; returns the rows."""
    import faiss

    index = faiss.IndexFlatIP(dim)
    keys: list[str] = []
    regions: list[int] = []
    for tar, proposals in shards:
        for batch in shard_batches(tar, proposals, batch_size=batch_size, threads=threads, key_of=lambda p: p.key,
                                   resize=embedder.resize, pin=embedder.device.type == "cuda"):
            out = embedder.embed_pixels(batch.pixels, batch.sizes, [p.boxes for p in batch.items])
            for item, embeddings in zip(batch.items, out.regions):
                keys += [item.key] * len(embeddings)
                regions += range(len(embeddings))
            if any(len(r) for r in out.regions):
                index.add(np.ascontiguousarray(torch.cat(out.regions).float().cpu().numpy()))
    Path(index_path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(index_path) as tmp:
        faiss.write_index(index, str(tmp))
    write_region_ids(ids_path, keys, regions)
    return index.ntotal


class RegionIndex:
    """A region index read back: `search` returns the best regions per query embedding."""

    def __init__(self, index, ids):
        self.index, self.ids = index, ids
        if index.ntotal != ids.num_rows:
            raise ValueError(f"the region index holds {index.ntotal} rows but its region list {ids.num_rows}: "
                             "one of the two files is stale; delete both to rebuild them")

    @classmethod
    def read(cls, index_path: Path, ids_path: Path) -> "RegionIndex":
        import faiss

        index = faiss.read_index(str(index_path))
        if isinstance(index, faiss.IndexFlat):      # FAISS has no GPU form of IndexPQ: it stays on the CPU
            index = index_on_gpus(index)
        return cls(index, read_region_ids(ids_path))

    def __len__(self) -> int:
        return self.index.ntotal

    @property
    def dim(self) -> int:
        return self.index.d

    def search(self, queries: np.ndarray, k: int) -> list[list[RegionHit]]:
        """The `k` regions most like each query (rows of `queries`, L2-normalized), best first."""
        queries = np.ascontiguousarray(np.asarray(queries, np.float32).reshape(-1, self.dim))
        scores, rows = self.index.search(queries, min(k, len(self)))
        keys, regions = self.ids.column("key"), self.ids.column("region")
        return [[RegionHit(keys[int(r)].as_py(), int(regions[int(r)].as_py()), float(s))
                 for s, r in zip(query_scores, query_rows) if r >= 0]
                for query_scores, query_rows in zip(scores, rows)]


def picture_embedding(embedder: Teacher, pictures: Sequence) -> np.ndarray:
    """Whole-picture embeddings [N, D] (the picture as one region), the query for regions like it."""
    out = embedder.embed(list(pictures), [np.zeros((0, 4), np.float32) for _ in pictures])
    return out.images.float().cpu().numpy()
