"""Text embeddings: templates and ensembling against a direct computation, the embed stage, vocab files."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.layout import RunLayout
from pipeline.sidecars import read_caption_embeddings
from tests.test_concepts import CAPTIONS, make_caption_folder
from trainer.models.clip import EmbeddingDimError, create_clip, save_clip_checkpoint
from trainer.offline.text_embed import (TEMPLATES, embed_captions, embed_names, load_concept_embeddings,
                                        load_vocabulary)

# The COCO open-vocabulary split's 65 classes (48 base + 17 novel, docs/method.md §6).
COCO65 = ("person bicycle car motorcycle train truck boat bench bird horse sheep bear zebra giraffe "
          "backpack handbag suitcase frisbee skis kite surfboard bottle fork spoon bowl banana apple "
          "sandwich orange broccoli carrot pizza donut chair bed toilet tv laptop mouse remote microwave "
          "oven toaster refrigerator book clock vase toothbrush airplane bus cat dog cow elephant "
          "umbrella tie snowboard skateboard cup knife cake couch keyboard sink scissors").split()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    model, tokenizer = create_clip("RN50-tiny")
    path = save_clip_checkpoint(model, tmp_path_factory.mktemp("teacher") / "teacher.pt")
    return model.eval(), tokenizer, path


def test_81_templates_are_clips_80_plus_the_bare_name():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    assert len(TEMPLATES) == 81 and TEMPLATES[-1] == "{}."
    assert list(TEMPLATES[:80]) == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


@torch.no_grad()
def test_ensembling_matches_a_direct_computation(teacher):
    model, tokenizer, _ = teacher
    names = ["dog", "hot_dog", "bow_(weapon)"]
    cleaned = ["dog", "hot dog", "bow weapon"]
    direct = {}
    for name in cleaned:
        e = model.encode_text(tokenizer([t.format(name) for t in TEMPLATES]))
        assert e.shape == (81, 64)
        direct.setdefault("mean_unnormalized", []).append(torch.nn.functional.normalize(e.mean(0), dim=0))
        unit = e / e.norm(dim=1, keepdim=True)
        direct.setdefault("normalize_mean_normalize", []).append(unit.mean(0) / unit.mean(0).norm())
    for mode, rows in direct.items():
        expected = torch.stack(rows).numpy()
        for batch_size in (81, 1000):     # one name per batch, all names in one batch
            got = embed_names(model, tokenizer, names, mode, batch_size=batch_size, progress=False)
            assert got.dtype == np.float32 and got.shape == (3, 64)
            np.testing.assert_allclose(got, expected, atol=2e-6)
            np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    a, b = (torch.stack(direct[k]).numpy() for k in ("mean_unnormalized", "normalize_mean_normalize"))
    assert np.abs(a - b).max() > 1e-6       # the two modes are different computations


@torch.no_grad()
def test_caption_embeddings_are_the_end_of_text_feature_in_fp16(teacher):
    model, tokenizer, _ = teacher
    captions = ["two dogs", "a cat on a sofa " * 20]      # the second is truncated by the tokenizer
    got = embed_captions(model, tokenizer, captions, batch_size=1)
    expected = torch.nn.functional.normalize(model.encode_text(tokenizer(captions)), dim=-1).numpy()
    assert got.dtype == np.float16 and got.shape == (2, 64)
    np.testing.assert_allclose(got.astype(np.float32), expected, atol=2e-3)


@pytest.mark.slow
def test_vocab_command_on_a_coco_categories_file(teacher, tmp_path, write_manifest):
    from stages.cli import main

    model, tokenizer, checkpoint = teacher
    coco = tmp_path / "coco65.json"
    coco.write_text(json.dumps({"categories": [{"id": i + 1, "name": n} for i, n in enumerate(COCO65)]}))
    m = write_manifest(f"teacher: {{arch: RN50-tiny, checkpoint: {checkpoint}}}\n")
    out = tmp_path / "coco65.npz"
    assert main(["vocab", m.source_path, "--classes", str(coco), "--out", str(out)]) == 0
    vocab = load_vocabulary(out, expected_dim=64, model_name="RN50-tiny")
    assert vocab["names"] == COCO65 and vocab["category_ids"] == list(range(1, 66))
    assert vocab["embeddings"].shape == (65, 64) and vocab["embeddings"].dtype == np.float32
    assert vocab["arch"] == "RN50-tiny" and vocab["dim"] == 64
    np.testing.assert_allclose(vocab["embeddings"][[0, 47, 64]],
                               embed_names(model, tokenizer, ["person", "toothbrush", "scissors"],
                                           progress=False), atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(vocab["embeddings"], axis=1), 1.0, atol=1e-6)

    # A consumer whose model is 1024 wide refuses the file before doing anything with it.
    with pytest.raises(EmbeddingDimError) as err:
        load_vocabulary(out, expected_dim=1024, model_name="RN50")
    message = str(err.value)
    assert "64" in message and "1024" in message and "vocab command" in message and "RN50" in message

    # A comma list works too; a missing teacher checkpoint is a clear error, not a download.
    assert main(["vocab", m.source_path, "--classes", "cat,hot dog", "--out", str(tmp_path / "two.npz")]) == 0
    assert load_vocabulary(tmp_path / "two.npz")["names"] == ["cat", "hot dog"]
    bad = write_manifest(f"teacher: {{arch: RN50-tiny, checkpoint: {tmp_path / 'none.pt'}}}\n", name="bad")
    assert main(["vocab", bad.source_path, "--classes", "cat", "--out", str(tmp_path / "x.npz")]) == 1
    assert not (tmp_path / "x.npz").exists()


def test_embed_stage_outputs_and_what_reruns(ray_local, teacher, tmp_path, write_manifest):
    import faiss

    from stages import concepts, embed, shard

    model, tokenizer, checkpoint = teacher
    make_caption_folder(tmp_path / "corpus", CAPTIONS)

    def manifest(extra: str = ""):
        return write_manifest(f"corpus: {{format: folder, path: {tmp_path / 'corpus'}}}\n"
                              f"shard: {{samples_per_shard: 4}}\n"
                              f"teacher: {{arch: RN50-tiny, checkpoint: {checkpoint}}}\n{extra}")

    m = manifest("concepts: {min_count: 2}\n")
    layout = RunLayout.of(m)
    shard.run(m)
    concepts.run(m)
    first = embed.run(m)
    assert first["work"] == {"concepts": True, "caption_shards": 3}
    names = pq.read_table(layout.concepts_parquet)["name"].to_pylist()
    emb = load_concept_embeddings(layout, expected_dim=64)
    np.testing.assert_allclose(emb, embed_names(model, tokenizer, names, progress=False), atol=2e-6)
    index = faiss.read_index(str(layout.concepts_faiss))
    assert index.ntotal == len(names) == 6
    _, ids = index.search(emb, 1)
    assert ids[:, 0].tolist() == list(range(6))
    keys, caps = [], []
    for s in range(3):
        k, e = read_caption_embeddings(layout.caption_embeddings, s)
        assert e.dtype == np.float16 and e.shape == (len(k), 64)
        shard_rows = pq.read_table(layout.shards.parquet(s)).to_pylist()
        assert k == [r["key"] for r in shard_rows if r["status"] == "success"]
        keys += k
        caps.append(e)
    np.testing.assert_allclose(np.concatenate(caps).astype(np.float32),
                               embed_captions(model, tokenizer, CAPTIONS).astype(np.float32), atol=2e-3)
    with pytest.raises(EmbeddingDimError, match="1024"):
        load_concept_embeddings(layout, expected_dim=1024, model_name="RN50")

    # Same settings: nothing. Another ensemble mode: concept embeddings only, concepts untouched.
    assert embed.run(m)["work"] == {"concepts": False, "caption_shards": 0}
    concepts_manifest = layout.stage("concepts").manifest.stat().st_mtime_ns
    other = manifest("concepts: {min_count: 2}\nembed: {ensemble: normalize_mean_normalize}\n")
    assert concepts.run(other)["work"]["pool"] is False
    assert embed.run(other)["work"] == {"concepts": True, "caption_shards": 0}
    assert layout.stage("concepts").manifest.stat().st_mtime_ns == concepts_manifest
    np.testing.assert_allclose(np.load(layout.concept_embeddings),
                               embed_names(model, tokenizer, names, "normalize_mean_normalize",
                                           progress=False), atol=2e-6)

    # min_count: concepts redone, then the concept embeddings (one row per new concept).
    lower = manifest("concepts: {min_count: 1}\nembed: {ensemble: normalize_mean_normalize}\n")
    assert concepts.run(lower)["work"]["pool"] is True
    assert embed.run(lower)["work"] == {"concepts": True, "caption_shards": 0}
    assert np.load(layout.concept_embeddings).shape == (8, 64)
