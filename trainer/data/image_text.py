"""A small streaming reader of the shards' image + caption pairs (WebDataset), for image-level CLIP
training (train-teacher) and anything else that needs (image, caption) batches straight from the tars.

    loader = image_text_batches(layout_tars, preprocess, tokenizer, batch_size=64, seed=0, epoch=3)
    for images, texts in loader: ...     # images [B,3,S,S] float, texts [B, context_length] long

Reads `{key}.jpg` + `{key}.txt` members (pipeline.sidecars.shard_samples, the one shard-tar reader; a
`.txt` with several captions, one per line, gives one of them per (seed, epoch): `one_caption`),
decodes them as every stage does (pipeline.images.load_rgb), applies open_clip's preprocess transform
and tokenizer. Shards are split
across nodes (torch.distributed rank) and data-loader workers (wds.split_by_node / split_by_worker);
shard order and a sample shuffle buffer are seeded by (seed, epoch), so an epoch is reproducible.
The pretrain loader that joins the Parquet sidecars is trainer/data/pretrain_stream.py; this one reads the tars only.
"""
from __future__ import annotations

import functools
import random
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import webdataset as wds

from pipeline.images import load_rgb
from pipeline.sidecars import shard_samples


def _tar_samples(shards: Iterable[dict]) -> Iterator[dict]:
    """A pipeline stage: WebDataset's shard dicts {'url'} -> samples {'__key__', ext: bytes, ...}."""
    for shard in shards:
        for key, members in shard_samples(shard["url"]):
            yield {"__key__": key, **members}


def one_caption(text: str, key: str, seed: int, epoch: int) -> str:
    """A sample's caption: its `.txt` holds one caption per line (several for COCO-style corpora);
    one of them is drawn from (seed, epoch, key), so it changes with the epoch and a rerun repeats it."""
    lines = text.split("\n")
    if len(lines) == 1:
        return text
    return lines[int(np.random.default_rng([seed, epoch, zlib.crc32(key.encode())]).integers(len(lines)))]


def _decode_sample(sample: dict, seed: int = 0, epoch: int = 0) -> Optional[dict]:
    """{'__key__', 'jpg': bytes, 'txt': bytes} -> {'key', 'image': PIL RGB, 'text': str}; None if incomplete."""
    if "jpg" not in sample or "txt" not in sample:
        return None
    text = sample["txt"].decode("utf-8") if isinstance(sample["txt"], bytes) else sample["txt"]
    return {"key": sample["__key__"], "image": load_rgb(sample["jpg"]),
            "text": one_caption(text, sample["__key__"], seed, epoch)}


def image_text_samples(tars: Sequence[str | Path], *, shuffle_buffer: int = 0, seed: int = 0,
                       epoch: int = 0, split: bool = True) -> wds.DataPipeline:
    """A WebDataset pipeline of decoded samples {'key', 'image' (PIL RGB), 'text'} from `tars`.

    `shuffle_buffer` 0 keeps the tars' order (evaluation); >0 shuffles shards and samples, seeded by
    (seed, epoch). `split`: spread shards over distributed ranks and loader workers.
    """
    urls = [str(t) for t in tars]
    if not urls:
        raise FileNotFoundError("no shards to read; the shard stage writes them")
    stages: list = [wds.SimpleShardList(urls)]
    if shuffle_buffer:
        stages.append(wds.detshuffle(bufsize=len(urls), initial=len(urls), seed=seed, epoch=epoch))
    if split:
        stages += [wds.split_by_node, wds.split_by_worker]
    stages.append(_tar_samples)
    if shuffle_buffer:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100),
                                  rng=random.Random(seed * 1_000_003 + epoch)))
    stages += [wds.map(functools.partial(_decode_sample, seed=seed, epoch=epoch)),
               wds.select(lambda s: s is not None)]
    return wds.DataPipeline(*stages)


def image_text_batches(tars: Sequence[str | Path], preprocess: Callable, tokenizer: Callable, *,
                       batch_size: int, shuffle_buffer: int = 1000, seed: int = 0, epoch: int = 0,
                       num_workers: int = 0, drop_last: bool = True,
                       split: bool = True) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Batches (images [B,3,S,S], tokens [B,L]) for contrastive training, streamed from the tars."""
    pipeline = image_text_samples(tars, shuffle_buffer=shuffle_buffer, seed=seed, epoch=epoch, split=split)
    pipeline.append(wds.map(lambda s: (preprocess(s["image"]), tokenizer([s["text"]])[0])))
    pipeline.append(wds.batched(batch_size, partial=not drop_last))
    if num_workers > 0:
        return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=num_workers,
                                           persistent_workers=False)
    return pipeline


def read_image_text(tars: Sequence[str | Path]) -> Iterator[dict]:
    """Every decoded sample of `tars` in order (no shuffling, no splitting): for evaluation."""
    return iter(image_text_samples(tars, shuffle_buffer=0, split=False))
