"""CLIP loading (trainer/models/clip.py) and the region encoder (trainer/models/region_encoder.py). Random weights only."""
from __future__ import annotations

import json
import warnings
import zipfile

import open_clip
import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from pipeline.config import ModelRef
from trainer.models.checkpoint import (CheckpointError, CheckpointNotFoundError, TorchScriptRefusedError,
                                       read_torchscript_state_dict)
from trainer.models.clip import (MODEL_CONFIG_DIR, EmbeddingDimError, check_embedding_dim, create_clip, embedding_dim,
                                 load_clip, read_clip_state_dict, save_clip_checkpoint, uses_quick_gelu)
from trainer.models.constants import CLIP_MEAN, CLIP_STD
from stages.resolve import load_model_ref
from trainer.models.region_encoder import RegionEncoder


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """open_clip zero-initialises each block's last BN scale; random BN terms make the checks meaningful."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def tiny(seed: int = 0, arch: str = "RN50-tiny"):
    torch.manual_seed(seed)
    model, tokenizer = create_clip(arch)
    return randomize_batchnorm(model, seed).eval(), tokenizer


def same_weights(a: nn.Module, b: nn.Module, atol: float = 0.0) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.allclose(sa[k].float(), sb[k].float(), atol=atol) for k in sa
               if not k.endswith("num_batches_tracked"))


# -- the region encoder reproduces CLIP ------------------------------------------------------------

@pytest.mark.parametrize("arch, size, pooler", [("RN50", 224, 14), ("RN50x4", 288, 18),
                                                ("RN50-tiny", 64, 4), ("RN50-small", 96, 6)])
def test_whole_image_box_equals_clip_image_embedding(arch, size, pooler):
    torch.manual_seed(0)
    model, _ = create_clip(arch)
    model = randomize_batchnorm(model).eval()
    encoder = RegionEncoder.from_clip(model)
    assert encoder.pooler_size == pooler  # derived from the config, never hard-coded
    images = torch.randn(1 if size > 100 else 2, 3, size, size)  # the big ones take seconds on CPU
    with torch.no_grad():
        expected = model.encode_image(images)
        regions = encoder.image_embedding(images)
        dense = encoder.encode_image(images)
    assert regions.shape == (len(images), embedding_dim(model))
    torch.testing.assert_close(regions, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dense, expected, atol=1e-4, rtol=1e-4)


def test_regions_of_a_batch_are_pooled_per_image():
    model, _ = tiny()
    encoder = RegionEncoder.from_clip(model)
    images = torch.randn(2, 3, 128, 96)
    boxes = [torch.tensor([[0.0, 0.0, 50.0, 60.0], [10.0, 20.0, 90.0, 120.0]]),
             torch.tensor([[5.0, 5.0, 40.0, 40.0]])]
    with torch.no_grad():
        together = encoder(images, boxes)
        alone = encoder(images[1:], boxes[1:])
        empty = encoder(images, [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert together.shape == (3, 64)
    torch.testing.assert_close(together[2:], alone, atol=1e-5, rtol=1e-5)
    assert empty.shape == (0, 64)


def test_whole_image_at_another_size_interpolates_the_positional_embedding():
    model, _ = tiny()
    encoder = RegionEncoder.from_clip(model)
    native = encoder.native_grid
    assert encoder.positional_embedding(native, native) is model.visual.attnpool.positional_embedding
    assert encoder.positional_embedding(5, 7).shape == (5 * 7 + 1, model.visual.attnpool.positional_embedding.shape[1])
    with torch.no_grad():
        dense = encoder.encode_image(torch.randn(2, 3, 160, 224))  # res5 grid 5x7 instead of 2x2
        boxed = encoder.image_embedding(torch.randn(2, 3, 160, 224))  # RoIAlign to the native grid
    assert dense.shape == boxed.shape == (2, 64)
    assert torch.isfinite(dense).all() and torch.isfinite(boxed).all()


# -- freezing ----------------------------------------------------------------------------------------

def test_student_freezing_leaves_res3_to_attnpool_trainable():
    model, _ = tiny()
    encoder = RegionEncoder.from_clip(model, freeze_stem_res2=True, freeze_bn=True)
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable, "nothing left to train"
    assert not any(n.startswith(("visual.conv", "visual.bn", "visual.layer1.")) for n in trainable)
    assert all(n.startswith(("visual.layer2.", "visual.layer3.", "visual.layer4.", "visual.attnpool."))
               for n in trainable)
    assert "visual.attnpool.positional_embedding" in trainable
    assert "visual.layer2.0.conv1.weight" in trainable
    assert not any(isinstance(m, nn.BatchNorm2d) for m in encoder.modules())
    assert not any(".bn" in n or "downsample.1" in n for n in trainable)

    images, boxes = torch.randn(2, 3, 96, 96), [torch.tensor([[0.0, 0.0, 60.0, 60.0]])] * 2
    with torch.no_grad():
        in_eval = encoder.eval()(images, boxes)
    stats = {k: v.clone() for k, v in encoder.state_dict().items() if "running" in k}
    encoder.train()
    in_train = encoder(images, boxes)
    torch.testing.assert_close(in_train, in_eval)  # frozen BN: no batch statistics in train mode
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in stats.items())
    in_train.sum().backward()
    assert model.visual.layer3[0].conv1.weight.grad is not None
    assert model.visual.conv1.weight.grad is None


def test_freeze_stem_res2_alone_keeps_later_batchnorms_trainable():
    model, _ = tiny()
    RegionEncoder.from_clip(model, freeze_stem_res2=True)
    assert isinstance(model.visual.bn1, FrozenBatchNorm2d)
    assert isinstance(model.visual.layer1[0].bn1, FrozenBatchNorm2d)
    assert isinstance(model.visual.layer2[0].bn1, nn.BatchNorm2d)
    assert model.visual.layer2[0].bn1.weight.requires_grad
    assert not model.visual.conv1.weight.requires_grad
    assert not model.visual.layer1[0].conv1.weight.requires_grad


def test_region_encoder_refuses_a_vit():
    model, _ = create_clip("ViT-B-32")
    with pytest.raises(TypeError, match="CLIP ResNet"):
        RegionEncoder.from_clip(model)


# -- architectures ---------------------------------------------------------------------------------

def test_our_configs_are_registered_with_open_clip(tmp_path):
    assert "RN50-tiny" in open_clip.list_models()
    config = json.loads((MODEL_CONFIG_DIR / "RN50-tiny.json").read_text())
    config["embed_dim"] = 32
    path = tmp_path / "RN50-tiny-32.json"
    path.write_text(json.dumps(config))
    model, tokenizer = create_clip(str(path))
    assert embedding_dim(model) == 32
    assert tokenizer(["a dog"]).shape == (1, 32)
    with pytest.raises(ValueError, match="unknown CLIP architecture 'RN51'"):
        create_clip("RN51")


def test_normalisation_constants_are_clips():
    assert CLIP_MEAN == open_clip.OPENAI_DATASET_MEAN and CLIP_STD == open_clip.OPENAI_DATASET_STD


# -- loading weights ----------------------------------------------------------------------------------

def test_openai_key_state_dict_loads_with_quick_gelu(tmp_path):
    source, _ = tiny(1)
    state = {k: v.half() if v.dtype == torch.float32 and v.ndim > 1 else v for k, v in source.state_dict().items()}
    state.update(input_resolution=torch.tensor(64), context_length=torch.tensor(32), vocab_size=torch.tensor(49408))
    torch.save(state, tmp_path / "RN50-tiny-openai.pt")
    model, tokenizer = load_clip("RN50-tiny", tmp_path / "RN50-tiny-openai.pt")
    assert model.regionclip_load_report.format == "openai-state-dict"
    assert uses_quick_gelu(model)  # OpenAI trained with QuickGELU
    assert not model.training
    assert same_weights(model, source, atol=1e-2)


def test_open_clip_training_checkpoint_with_module_prefix_loads(tmp_path):
    source, _ = tiny(2)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"epoch": 3, "name": "RN50-tiny", "state_dict": state, "optimizer": {"lr": 0.1}}, tmp_path / "ep3.pt")
    model, _ = load_clip("RN50-tiny", tmp_path / "ep3.pt")
    assert model.regionclip_load_report.format == "open_clip-checkpoint"
    assert not uses_quick_gelu(model)
    assert same_weights(model, source)


def openai_torchscript(tmp_path, seed: int = 3):
    """OpenAI's release format: a TorchScript archive with OpenAI's key names and float16 weights (the
    layout of RN50.pt). A scripted tiny open_clip model stands in: for ResNet CLIPs open_clip's `CLIP`
    class has OpenAI's key names, and convert_weights_to_lp casts the same weights OpenAI's file keeps
    in float16 (convolutions, linear layers, attention, projections)."""
    source, _ = tiny(seed)
    open_clip.model.convert_weights_to_lp(source, dtype=torch.float16)
    path = tmp_path / "RN50-tiny-script.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated upstream; OpenAI's files are not
        torch.jit.script(source).save(str(path))
    return source, path


def test_torchscript_archive_is_refused_unless_trusted(tmp_path):
    source, path = openai_torchscript(tmp_path)
    assert source.visual.conv1.weight.dtype == torch.float16
    with pytest.raises(TorchScriptRefusedError) as err:
        load_clip("RN50-tiny", path)
    message = str(err.value)
    assert "teacher.trust_torchscript: true" in message and "regionclip convert-teacher" in message
    assert "RN50-tiny-script.safetensors" in message  # what convert-teacher would write
    with pytest.raises(TorchScriptRefusedError):
        load_model_ref(ModelRef(arch="RN50-tiny", checkpoint=str(path)))

    model, _ = load_clip("RN50-tiny", path, trust_torchscript=True)
    assert model.regionclip_load_report.format == "openai-torchscript"
    assert uses_quick_gelu(model)  # OpenAI trained with QuickGELU
    assert same_weights(model, source)  # float16 -> float32 is exact
    model, _ = load_model_ref(ModelRef(arch="RN50-tiny", checkpoint=str(path), trust_torchscript=True))
    assert same_weights(model, source)


def test_torchscript_is_refused_before_the_archive_is_parsed(tmp_path):
    # A zip laid out like a TorchScript archive whose code is not TorchScript at all: the refusal
    # comes first (torch.jit.load would fail to compile it, after unpickling its constants).
    path = tmp_path / "teacher.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("teacher/code/__torch__/evil.py", "import os\nos.system('touch pwned')\n")
        archive.writestr("teacher/constants.pkl", b"not a pickle")
    with pytest.raises(TorchScriptRefusedError, match="teacher.trust_torchscript"):
        read_clip_state_dict(path)


def test_convert_teacher_writes_safetensors_that_load_without_trust(tmp_path, capsys):
    from stages.cli import main

    source, script = openai_torchscript(tmp_path, seed=9)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"name: t\noutput_dir: out\nteacher: {{arch: RN50-tiny, checkpoint: {script.name}}}\n")
    out = tmp_path / "RN50-tiny-script.safetensors"

    assert main(["convert-teacher", str(manifest)]) == 1  # the manifest has not said the file is trusted
    assert "teacher.trust_torchscript: true" in capsys.readouterr().err and not out.exists()

    assert main(["convert-teacher", str(manifest), "--set", "teacher.trust_torchscript=true"]) == 0
    printed = capsys.readouterr().out
    assert f"-> {out}" in printed and "Set teacher.checkpoint" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RN50-tiny-script.pt", "RN50-tiny-script.safetensors",
                                                          "m.yaml"]  # no temporary left
    # The file holds the archive's tensors unchanged: same keys, dtypes and values.
    from safetensors.torch import load_file
    archived = read_torchscript_state_dict(script)
    stored = load_file(str(out))
    assert stored.keys() == archived.keys()
    assert all(stored[k].dtype == v.dtype and torch.equal(stored[k], v) for k, v in archived.items())

    trusted, _ = load_clip("RN50-tiny", script, trust_torchscript=True)
    converted, _ = load_clip("RN50-tiny", out)  # no trust needed
    assert converted.regionclip_load_report.format == "openai-state-dict"
    assert uses_quick_gelu(converted)  # read back as OpenAI's weights, like the archive
    assert same_weights(converted, trusted) and same_weights(converted, source)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(converted.encode_image(images), trusted.encode_image(images))


def test_trust_torchscript_is_a_strict_runtime_only_setting(write_manifest):
    from pipeline.config import ManifestError, fingerprinted_settings

    with pytest.raises(ManifestError, match="teacher.trust_torchscript"):
        write_manifest("teacher: {trust_torchscript: 'yes'}")
    manifest = write_manifest("teacher: {trust_torchscript: true}")
    assert manifest.teacher.trust_torchscript is True
    # Trusting a file changes whether it loads, never what a stage writes: no stage reruns for it.
    assert "trust_torchscript" not in fingerprinted_settings(manifest.teacher)


def test_missing_keys_are_refused_and_listed(tmp_path):
    source, _ = tiny(4)
    state = source.state_dict()
    dropped = [k for k in state if k.startswith(("visual.layer3.", "visual.layer4."))
               and not k.endswith("num_batches_tracked")][:25]
    assert len(dropped) == 25
    torch.save({k: v for k, v in state.items() if k not in dropped}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError) as err:
        load_clip("RN50-tiny", tmp_path / "partial.pt")
    message = str(err.value)
    assert "25 missing" in message and "missing from the checkpoint (25)" in message
    assert dropped[0] in message and dropped[19] in message and dropped[24] not in message
    assert "allow_partial" in message

    with pytest.warns(UserWarning, match="partial load"):
        model, _ = load_clip("RN50-tiny", tmp_path / "partial.pt", allow_partial=True)
    assert model.regionclip_load_report.missing == dropped
    assert torch.equal(model.visual.conv1.weight, source.visual.conv1.weight)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    source, _ = tiny(5)
    path = save_clip_checkpoint(source, tmp_path / "tiny.pt")
    with pytest.raises(CheckpointError, match=r"other shape(.|\n)*saved from 'RN50-tiny'"):
        load_clip("RN50-small", path)


def test_checkpoint_that_pickles_code_is_refused(tmp_path):
    source, _ = tiny(6)
    torch.save({"state_dict": source.state_dict(), "config": PickledThing()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_clip_state_dict(tmp_path / "evil.pt")


class PickledThing:
    """A custom class: torch.load(weights_only=True) must refuse to rebuild it."""


def test_missing_file_says_how_to_get_weights(tmp_path):
    with pytest.raises(CheckpointNotFoundError) as err:
        load_clip("RN50", tmp_path / "RN50.pt")
    message = str(err.value)
    assert "RN50.pt" in message and "download" in message and "train-teacher stage" in message
    assert isinstance(err.value, FileNotFoundError)


def test_saved_checkpoint_loads_in_open_clip_unchanged(tmp_path):
    source, _ = tiny(7)
    RegionEncoder.from_clip(source, freeze_stem_res2=True, freeze_bn=True)  # frozen BN saves fewer buffers
    path = save_clip_checkpoint(source, tmp_path / "ckpt" / "student.pt", step=10)
    assert [p.name for p in path.parent.iterdir()] == ["student.pt"]  # no temporary file left
    reloaded = open_clip.create_model("RN50-tiny", pretrained=str(path))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval().encode_image(images), source.encode_image(images),
                                   atol=1e-5, rtol=1e-5)
    ours, _ = load_clip("RN50-tiny", path)
    assert same_weights(ours, reloaded)
    assert torch.load(path, weights_only=True)["step"] == 10


def test_quick_gelu_survives_a_save(tmp_path):
    source, _ = create_clip("RN50-tiny", quick_gelu=True)
    path = save_clip_checkpoint(source, tmp_path / "teacher.pt")
    model, _ = load_clip("RN50-tiny", path)
    assert uses_quick_gelu(model)


def test_model_ref_uses_fallback_or_says_what_to_do(tmp_path):
    source, _ = tiny(8)
    path = save_clip_checkpoint(source, tmp_path / "teacher.pt")
    model, _ = load_model_ref(ModelRef(arch="RN50-tiny", checkpoint=None), fallback=path)
    assert same_weights(model, source)
    for fallback in (None, tmp_path / "not-trained-yet.pt"):
        with pytest.raises(CheckpointNotFoundError, match="train-teacher"):
            load_model_ref(ModelRef(arch="RN50-tiny", checkpoint=None), fallback=fallback)


# -- embedding widths ---------------------------------------------------------------------------------

def test_embedding_dim_check_explains_the_fix():
    model, _ = tiny()
    assert embedding_dim(model) == 64
    assert embedding_dim(RegionEncoder.from_clip(model)) == 64
    check_embedding_dim(64, 64, "concept embeddings")
    with pytest.raises(EmbeddingDimError) as err:
        check_embedding_dim(1024, 512, "concept embeddings", model_name="RN50")
    assert str(err.value).startswith("concept embeddings have dim 512 but the model RN50 outputs 1024; "
                                     "rerun the embed stage with the same teacher")
