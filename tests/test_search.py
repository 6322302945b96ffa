"""Region search: the index a CLIP's region encoder builds over stored proposals, its search, the hits'
contact sheet. (The command on a whole run: tests/test_demo_tools.py.)"""
from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.pictures import RegionTile, contact_sheet
from pipeline.sidecars import Proposals, write_region_ids
from tests.corpora import jpeg_bytes
from trainer.data.images import image_tensor


class BoxEmbedder:
    """A region embedder that needs no weights (a random tiny CLIP gives every region nearly the same
    embedding): a region is its mean colour and its place in the image, L2-normalized."""
    device = torch.device("cpu")

    @staticmethod
    def resize(image):
        return image

    def embed_pixels(self, pixels, sizes, boxes):
        regions = []
        for p, (w, h), b in zip(pixels, sizes, boxes):
            rows = []
            for x1, y1, x2, y2 in np.asarray(b).reshape(-1, 4):
                colour = p[:, int(y1):int(y2), int(x1):int(x2)].float().mean((1, 2)) / 255
                rows.append(torch.cat([colour, torch.tensor([x1 / w, y1 / h, x2 / w])]))
            stacked = torch.stack(rows) if rows else torch.zeros(0, 6)
            regions.append(torch.nn.functional.normalize(stacked, dim=-1))
        return SimpleNamespace(regions=regions)


@pytest.fixture
def embedder():
    return BoxEmbedder()


def write_tar(path, images: dict[str, bytes]) -> None:
    with open(path, "wb") as stream, wds.TarWriter(stream) as sink:
        for key, jpg in images.items():
            sink.write({"__key__": key, "jpg": jpg})


def proposals_of(keys: list[str], boxes_per_image: int) -> list[Proposals]:
    rng = np.random.default_rng(0)
    rows = []
    for key in keys:
        xy = rng.uniform(0, 60, (boxes_per_image, 2))
        wh = rng.uniform(16, 40, (boxes_per_image, 2))
        rows.append(Proposals(key, 120, 100, np.concatenate([xy, xy + wh], 1).astype(np.float32),
                              np.zeros(boxes_per_image, np.float32)))
    return rows


def test_index_holds_every_proposal_and_finds_a_region_by_its_own_embedding(tmp_path, embedder):
    from trainer.offline.region_search import RegionIndex, build_region_index

    shards = []
    for s in range(2):
        keys = [f"{s:05d}{i:04d}" for i in range(3)]
        write_tar(tmp_path / f"{s}.tar", {k: jpeg_bytes(120, 100, seed=1000 * s + i) for i, k in enumerate(keys)})
        shards.append((tmp_path / f"{s}.tar", proposals_of(keys, 1 + s * 3)))   # 1 box each, then 4
    rows = build_region_index(embedder, shards, tmp_path / "x.faiss", tmp_path / "x.parquet", dim=6, batch_size=2)
    assert rows == 3 * 1 + 3 * 4
    index = RegionIndex.read(tmp_path / "x.faiss", tmp_path / "x.parquet")
    assert len(index) == 15 and index.dim == 6

    # the query: region 2 of the second shard's first image, embedded on its own
    image = Image.open(io.BytesIO(jpeg_bytes(120, 100, seed=1000))).convert("RGB")
    box = shards[1][1][0].boxes[2:3]
    query = embedder.embed_pixels([image_tensor(image)], [image.size], [box]).regions[0].numpy()
    (hits,) = index.search(query, 5)
    assert (hits[0].key, hits[0].region) == ("000010000", 2)
    assert hits[0].score == pytest.approx(1.0, abs=1e-3)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True) and len(hits) == 5
    assert len(index.search(np.concatenate([query, query]), 100)[1]) == 15      # k above the size: every row


def test_an_index_and_a_region_list_that_disagree_are_refused(tmp_path, embedder):
    from trainer.offline.region_search import RegionIndex, build_region_index

    keys = ["000000000", "000000001"]
    write_tar(tmp_path / "0.tar", {k: jpeg_bytes(120, 100, seed=i) for i, k in enumerate(keys)})
    build_region_index(embedder, [(tmp_path / "0.tar", proposals_of(keys, 2))], tmp_path / "x.faiss",
                       tmp_path / "x.parquet", dim=6)
    write_region_ids(tmp_path / "x.parquet", keys[:1], [0])                    # a stale region list
    with pytest.raises(ValueError, match="4 rows but its region list 1.*delete both"):
        RegionIndex.read(tmp_path / "x.faiss", tmp_path / "x.parquet")


def test_contact_sheet_puts_each_crop_in_rank_order_with_its_text():
    image = Image.new("RGB", (200, 100), "white")
    image.paste((255, 0, 0), (20, 20, 60, 60))           # a red square at the first box
    image.paste((0, 0, 255), (120, 30, 180, 90))         # a blue one at the second
    tiles = [RegionTile(image, (20, 20, 60, 60), ["#1  0.900", "key a"]),
             RegionTile(image, (120, 30, 180, 90), ["#2  0.800", "key b"], good=False)]
    sheet = contact_sheet(tiles, title="red things", columns=4, cell=100)
    assert sheet.width == 2 * 108 + 8                     # two columns of 100 px cells and 8 px gaps
    pixels = np.asarray(sheet).astype(int)
    first, second = pixels[:, 8:108], pixels[:, 116:216]
    assert ((first[..., 0] > 200) & (first[..., 2] < 60)).sum() > 1000       # the red region fills the first
    assert ((second[..., 2] > 200) & (second[..., 0] < 60)).sum() > 1000     # the blue one the second
    frame = (np.abs(pixels[:, 113:116] - [220, 40, 40]).sum(-1) < 30).sum(0)  # a known-wrong hit: red frame
    unframed = (np.abs(pixels[:, 3:6] - [220, 40, 40]).sum(-1) < 30).sum()
    assert frame.min() >= 100 and unframed == 0
