"""Hostile input for every stage: each gets a clear error or a counted skip; nothing runs code from data.

(The shard stage's hostile rows are in tests/test_hostile_corpus.py, tests/test_shard.py and
tests/test_images.py; names read back from a run folder in tests/test_hostile_run_folder.py.)"""
from __future__ import annotations

import json
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.layout import RunLayout

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this *calls* open(marker, "w"): the marker file appearing means code ran from data."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_files(tmp_path: Path) -> tuple[list[Path], Path]:
    """Checkpoint-like files that each execute code when unpickled, and the marker they would create."""
    marker = tmp_path / "PWNED"
    payload = Payload(marker)
    files = []
    for name, obj in [("state_dict.pt", {"state_dict": {"w": payload}}),
                      ("whole.pt", payload),
                      ("trainer_state.pt", {"version": 1, "step": payload}),
                      ("rpn.pt", {"state_dict": {}, "config": {"backbone": payload}})]:
        path = tmp_path / name
        torch.save(obj, path)
        files.append(path)
    raw = tmp_path / "raw_pickle.pt"
    raw.write_bytes(pickle.dumps({"state_dict": payload}))
    files.append(raw)
    assert not marker.exists()
    return files, marker


# -- manifests ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tag", ["!!python/object/apply:builtins.open", "!!python/object/new:builtins.open",
                                 "!!python/name:builtins.open"])
def test_yaml_object_tags_are_refused_and_construct_nothing(tmp_path, tag):
    from pipeline.config import ManifestError, load_manifest

    marker = tmp_path / "PWNED"
    path = tmp_path / "m.yaml"
    value = f"{tag} ['{marker}', 'w']" if "name:" not in tag else tag
    path.write_text(f"name: {value}\noutput_dir: out\ncorpus: {{format: synthetic}}\n")
    with pytest.raises(ManifestError, match="no object tags"):
        load_manifest(path)
    assert not marker.exists()


def test_a_yaml_override_with_an_object_tag_is_refused(tmp_path):
    from pipeline.config import ManifestError, load_manifest

    marker = tmp_path / "PWNED"
    path = tmp_path / "m.yaml"
    path.write_text("name: t\noutput_dir: out\ncorpus: {format: synthetic}\n")
    with pytest.raises(ManifestError):
        load_manifest(path, [f"shard.max_side=!!python/object/apply:builtins.open ['{marker}', 'w']"])
    assert not marker.exists()


# -- checkpoints that pickle code --------------------------------------------------------------------------

def test_every_checkpoint_loader_refuses_files_that_pickle_code(tmp_path):
    from trainer.engine.checkpoint import load_state
    from trainer.models.clip import load_clip
    from trainer.models.detector import build_detector, read_checkpoint_kind
    from trainer.models.rpn import load_rpn

    files, marker = evil_files(tmp_path)
    classes = torch.nn.functional.normalize(torch.randn(3, 64), dim=-1)
    loaders = {"load_clip": lambda p: load_clip("RN50-tiny", p),
               "load_rpn": lambda p: load_rpn(p),
               "load_state (pretrain resume)": lambda p: load_state(p),
               "build_detector": lambda p: build_detector("RN50-tiny", p, classes)}
    for path in files:
        assert read_checkpoint_kind(path) == "clip"  # unreadable as a detector: handed to load_clip
        for name, load in loaders.items():
            with pytest.raises(Exception) as err:  # noqa: PT011 - each loader has its own error type
                load(path)
            assert not marker.exists(), f"{name} ran code from {path.name}"
            assert "Payload" not in type(err.value).__name__
    assert not marker.exists()


@pytest.mark.parametrize("error", [MemoryError, KeyboardInterrupt])
def test_running_out_of_memory_or_an_interrupt_while_loading_a_checkpoint_is_no_damaged_file(
        tmp_path, monkeypatch, error):
    from trainer.models.checkpoint import CheckpointError
    from trainer.models.clip import load_clip
    from trainer.models.detector import build_detector, read_checkpoint_kind
    from trainer.models.reference_weights import read_reference_checkpoint
    from trainer.models.rpn import load_rpn

    good = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:-10])
    classes = torch.nn.functional.normalize(torch.randn(3, 64), dim=-1)
    loaders = {"load_clip": lambda p: load_clip("RN50-tiny", p), "load_rpn": load_rpn,
               "build_detector": lambda p: build_detector("RN50-tiny", p, classes),
               "read_reference_checkpoint": read_reference_checkpoint}
    for load in loaders.values():   # a damaged file is a CheckpointError ...
        with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
            load(cut)

    def torch_load(*args, **kwargs):
        raise error("raised inside torch.load")

    monkeypatch.setattr(torch, "load", torch_load)
    loaders["read_checkpoint_kind"] = read_checkpoint_kind
    for load in loaders.values():   # ... but nothing else torch.load raises is
        with pytest.raises(error, match="inside torch.load"):
            load(good)


def test_numpy_files_that_pickle_objects_are_refused(tmp_path):
    from trainer.offline.codecs import load_codec
    from trainer.offline.text_embed import load_concept_embeddings, load_vocabulary

    marker = tmp_path / "PWNED"
    layout = RunLayout(tmp_path / "run")
    layout.concepts.root.mkdir(parents=True)
    np.save(layout.concept_embeddings, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        load_concept_embeddings(layout)
    with pytest.raises(ValueError, match="pickle"):
        np.load(layout.concept_embeddings)  # what the label and pretrain stages call: numpy's safe default
    vocab = tmp_path / "v.npz"
    np.savez(vocab, names=np.array([Payload(marker)], dtype=object), embeddings=np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError):
        load_vocabulary(vocab)
    layout.labels.root.mkdir(parents=True)
    np.save(layout.labels.root / "codec_concepts.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    (layout.labels_codec).write_text(json.dumps({"codec": "topk", "dim": 4, "params": {"k": 2, "temperature": 0.01},
                                                 "files": {"concepts": "codec_concepts.npy"}}))
    with pytest.raises(ValueError, match="pickle"):
        load_codec(layout.labels.root)
    assert not marker.exists()


UNSAFE = [(re.compile(r"\bpickle\.loads?\("), "pickle.load"),
          (re.compile(r"\byaml\.(unsafe_)?load\((?![^)]*SafeLoader)"), "yaml.load without SafeLoader"),
          (re.compile(r"allow_pickle\s*=\s*True"), "np.load(allow_pickle=True)"),
          (re.compile(r"(?<![\w.])(?<!def )(eval|exec)\("), "eval/exec"),
          (re.compile(r"\bmarshal\.loads?\(|\bdill\.|\bcloudpickle\.loads?\("), "other unpicklers")]


def test_no_module_reads_data_with_an_unsafe_loader():
    """A guard for modules still to come: every torch.load says weights_only=True, no pickle/yaml.load."""
    problems = []
    for folder in ("pipeline", "trainer", "stages"):
        for path in sorted((REPO / folder).rglob("*.py")):
            text = path.read_text()
            for match in re.finditer(r"torch\.load\(", text):
                call = text[match.start(): text.find(")", match.end()) + 1]
                depth, end = 0, match.end() - 1
                for end in range(match.end() - 1, len(text)):
                    depth += {"(": 1, ")": -1}.get(text[end], 0)
                    if depth == 0:
                        break
                call = text[match.start(): end + 1]
                if "weights_only=True" not in call:
                    problems.append(f"{path.relative_to(REPO)}: {call}")
            for pattern, what in UNSAFE:
                for m in pattern.finditer(text):
                    line = text[: m.start()].count("\n") + 1
                    problems.append(f"{path.relative_to(REPO)}:{line}: {what}")
    assert not problems, "\n".join(problems)


# -- tars ------------------------------------------------------------------------------------------------

def test_the_trainer_and_sidecar_readers_never_follow_unsafe_tar_members(tmp_path):
    from pipeline.sidecars import read_shard_images
    from tests.corpora import add_tar_member, jpeg_bytes
    from pipeline.sidecars import ShardIndex

    work = tmp_path / "work"
    work.mkdir()
    tar_path = work / "00000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(2):
            add_tar_member(tar, f"00000000{i}.jpg", jpeg_bytes(16, 16, seed=i))
            add_tar_member(tar, f"00000000{i}.txt", b"a kite")
        add_tar_member(tar, "../x.jpg", jpeg_bytes(16, 16))
        link = tarfile.TarInfo("000000009.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    index = ShardIndex(tar_path)
    samples = [(k, index.sample(i)) for i, k in enumerate(index.keys)]
    images = read_shard_images(tar_path)
    passwd = Path("/etc/passwd").read_bytes() if Path("/etc/passwd").exists() else b"root:"
    for _, members in samples:
        assert all(v != passwd for v in members.values())
    assert "000000009" not in images and all(v != passwd for v in images.values())
    assert not (tmp_path / "x.jpg").exists() and not (work.parent / "x.jpg").exists()
    assert {"0000000000", "0000000001"} <= {k for k, _ in samples} or len(images) >= 2


# -- sidecars: missing rows, NaN/inf embeddings, zero / degenerate / outside / non-finite boxes -------------

def hostile_world(tmp_path: Path) -> dict:
    """One shard of 9 samples; samples 0-5 each carry one kind of hostile sidecar row."""
    from tests.pretrain_world import make_world

    w = make_world(tmp_path / "run", num_shards=1, per_shard=9, boxes=6, drop_rows=("000000000",))
    layout: RunLayout = w["layout"]
    keys = w["keys"]
    # captions: NaN (1) and inf (2) embeddings
    t = pq.read_table(layout.caption_embeddings.parquet(0)).to_pydict()
    emb = [np.asarray(e, np.float32) for e in t["embedding"]]
    emb[1][3], emb[2][0] = np.nan, np.inf
    dim = len(emb[0])
    pq.write_table(pa.table({"key": t["key"], "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(np.concatenate(emb).astype(np.float16)), dim)}), layout.caption_embeddings.parquet(0))
    # proposals: zero boxes (3), a NaN box (4), boxes outside the image and degenerate (5)
    p = pq.read_table(layout.proposals.parquet(0)).to_pydict()
    p["boxes"][3], p["num_boxes"][3] = [], 0
    p["objectness"][3] = []
    p["boxes"][4] = list(p["boxes"][4])
    p["boxes"][4][0] = float("nan")
    p["boxes"][5] = [-50, -40, 500, 400,  10, 10, 10, 10,  30, 30, 10, 10] + list(p["boxes"][5][12:])
    pq.write_table(pa.table(p, schema=pq.read_schema(layout.proposals.parquet(0))), layout.proposals.parquet(0))
    lab = pq.read_table(layout.labels.parquet(0)).to_pydict()
    i3 = lab["key"].index(keys[3])
    lab["num_regions"][i3], lab["pseudo_label"][i3], lab["pseudo_prob"][i3], lab["region_codes"][i3] = 0, [], [], b""
    pq.write_table(pa.table(lab, schema=pq.read_schema(layout.labels.parquet(0))), layout.labels.parquet(0))
    return {**w, "dim": dim}


def test_the_streaming_trainer_counts_and_skips_each_hostile_row(tmp_path):
    from trainer.data.pretrain_stream import DataOptions, PretrainStream, shard_sources

    w = hostile_world(tmp_path)
    layout, keys = w["layout"], w["keys"]
    opts = DataOptions(batch_size=1, min_size=64, max_size=96, regions_per_image=8, seed=0)
    stream = iter(PretrainStream(shard_sources(layout, [0]), opts))
    seen, last = [], None
    for _ in range(4):  # 4 good samples per epoch (5..8): the 5th batch comes from the 2nd epoch
        batch = next(stream)
        seen += batch["keys"]
        last = batch
        assert torch.isfinite(batch["boxes"]).all() and torch.isfinite(batch["captions"]).all()
    assert set(seen) == set(keys[5:9])
    assert set(last["_skipped"]) <= {"missing_labels", "missing_caption_embedding", "misaligned_sidecars",
                                     "missing_proposals"}


def test_each_hostile_sidecar_row_is_a_named_skip(tmp_path):
    from pipeline.sidecars import shard_samples
    from trainer.data.pretrain_stream import DataOptions, SkipSample, open_sidecars, prepare_sample, shard_sources

    w = hostile_world(tmp_path)
    layout, keys = w["layout"], w["keys"]
    src = shard_sources(layout, [0])[0]
    side = open_sidecars(src)
    samples = dict(shard_samples(src.tar))
    opts = DataOptions(batch_size=1, min_size=64, max_size=96, regions_per_image=8)
    reasons = {}
    for key in keys:
        try:
            out = prepare_sample(key, samples[key], side, opts, np.random.default_rng(0))
            reasons[key] = "ok" if np.isfinite(out["boxes"]).all() and np.isfinite(out["caption"]).all() else "NaN"
        except SkipSample as skip:
            reasons[key] = skip.reason
    assert [reasons[k] for k in keys] == [
        "missing_labels",              # 0: no labels row for the key
        "missing_caption_embedding",   # 1: NaN in the caption embedding
        "missing_caption_embedding",   # 2: inf in the caption embedding
        "misaligned_sidecars",         # 3: zero proposals
        "missing_proposals",           # 4: a NaN box: the row is refused
        "ok", "ok", "ok", "ok"]        # 5: boxes outside the image and degenerate: kept, finite


def test_outside_and_degenerate_boxes_pool_to_finite_region_features(tmp_path):
    from trainer.models.clip import create_clip
    from trainer.models.region_encoder import RegionEncoder

    torch.manual_seed(0)
    enc = RegionEncoder.from_clip(create_clip("RN50-tiny")[0]).eval()
    boxes = torch.tensor([[-50.0, -40, 500, 400], [10, 10, 10, 10], [30, 30, 10, 10], [0, 0, 64, 64]])
    with torch.no_grad():
        out = enc.pool_regions(enc.features(torch.randn(1, 3, 64, 64)), [boxes])
    assert out.shape[0] == 4 and torch.isfinite(out).all()


def test_label_stage_inputs_zero_boxes_ok_and_non_finite_boxes_a_clear_error(tmp_path):
    from pipeline.sidecars import read_proposals
    from trainer.offline.codecs import FP16Codec
    from trainer.models.clip import create_clip
    from trainer.offline.labels import Teacher, label_images
    from PIL import Image

    w = hostile_world(tmp_path)
    layout = w["layout"]
    with pytest.raises(ValueError, match=r"00000\.parquet: key 000000004: boxes are not 6 finite"):
        read_proposals(layout.proposals, 0)
    torch.manual_seed(0)
    model = create_clip("RN50-tiny")[0].eval()
    teacher = Teacher(model, w["concepts"], min_size=64, max_size=96, device="cpu")
    img = Image.new("RGB", (72, 56), (120, 30, 200))
    cols = label_images(teacher, FP16Codec(w["dim"]), [img, img],
                        [np.zeros((0, 4), np.float32), np.array([[-50, -40, 500, 400], [10, 10, 10, 10]], np.float32)], 2)
    assert cols["num_regions"] == [0, 2] and cols["region_codes"][0] == b""
    assert np.isfinite(cols["pseudo_prob"][1]).all()


def test_non_finite_concept_embeddings_are_a_clear_error_before_any_work(tmp_path):
    from pipeline.layout import RunLayout
    from trainer.offline.text_embed import load_concept_embeddings

    layout = RunLayout(tmp_path)
    layout.concept_embeddings.parent.mkdir(parents=True)
    emb = np.eye(4, dtype=np.float32)
    emb[2, 1] = np.nan
    np.save(layout.concept_embeddings, emb)
    with pytest.raises(ValueError, match="1 of 4 concept embeddings hold NaN or inf"):
        load_concept_embeddings(layout)
    emb[2, 1] = np.inf
    np.save(layout.concept_embeddings, emb)
    with pytest.raises(ValueError, match="rerun the embed stage"):
        load_concept_embeddings(layout)
    np.save(layout.concept_embeddings, np.eye(4, dtype=np.float32))
    assert load_concept_embeddings(layout, expected_dim=4).shape == (4, 4)
