"""A FAISS index over the teacher's region embeddings (label.region_index), for region search.

`labels/regions.faiss`: inner product over L2-normalized embeddings decoded from the stored codes
(pq: an IndexPQ with the label run's own codebook, so the index holds exactly the stored codes;
fp16: a flat index). Row i is described by row i of `labels/regions.parquet` (pipeline/sidecars.py: key, region): region
`region` of sample `key`, in proposal order. The topk codec keeps no embedding and cannot be indexed.

    index, ids = read_region_index(layout)
    sims, rows = index.search(query_embeddings, 10)      # ids.slice(rows[0][0], 1) -> key, region

With a GPU build of FAISS (`pip install .[gpu]`) that supports the machine's GPUs
(trainer/offline/faiss_gpu.py) a flat (fp16-codec) index is searched on them, sharded (each GPU holds a
part); FAISS has no GPU form of IndexPQ, so a pq index is searched on the CPU (its codes are what is
stored).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.io import atomic_path
from pipeline.sidecars import read_labels, read_region_ids, write_region_ids
from trainer.offline.codecs import PQCodec, load_codec
from trainer.offline.faiss_gpu import index_on_gpus


def write_region_index(layout, shard_ids: list[int]) -> list[Path]:
    import faiss

    codec = load_codec(layout.labels.root)
    if codec.kind == "topk":
        raise ValueError("label.region_index needs the pq or fp16 codec (topk stores no embeddings)")
    if isinstance(codec, PQCodec):
        index = faiss.IndexPQ(codec.dim, codec.m, codec.nbits, faiss.METRIC_INNER_PRODUCT)
        index.pq = codec.pq
        index.is_trained = True
    else:
        index = faiss.IndexFlatIP(codec.dim)
    keys, regions = [], []
    for s in shard_ids:
        table = read_labels(layout.labels, s, ["key", "num_regions", "region_codes"])
        for key, n, blob in zip(*(table.column(c).to_pylist() for c in ("key", "num_regions", "region_codes"))):
            if not n:
                continue
            codes = np.frombuffer(blob, np.uint8).reshape(n, codec.code_size)
            if isinstance(codec, PQCodec):
                # Exact reconstructions: the IndexPQ re-encodes them to the stored codes.
                index.add(codec.pq.decode(np.ascontiguousarray(codes)))
            else:
                index.add(codec.decode_embeddings(torch.from_numpy(codes.copy())).numpy())
            keys.extend([key] * n)
            regions.extend(range(n))
    with atomic_path(layout.labels_region_index) as tmp:
        faiss.write_index(index, str(tmp))
    write_region_ids(layout.labels_region_ids, keys, regions)
    return [layout.labels_region_index, layout.labels_region_ids]


def read_region_index(layout):
    import faiss

    index = faiss.read_index(str(layout.labels_region_index))
    if isinstance(index, faiss.IndexFlat):
        index = index_on_gpus(index)
    return index, read_region_ids(layout.labels_region_ids)
