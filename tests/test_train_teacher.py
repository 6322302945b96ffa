"""train-teacher: the streaming image+caption reader, the CLIP loop, the stage, open_clip compatibility."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch

from pipeline.layout import RunLayout
from pipeline.stage import StageInputError

WORLD = """
corpus: {format: synthetic}
synth: {seed: 5, num_images: 48, num_val_images: 4}
shard: {samples_per_shard: 16}
concepts: {parser: lookups, min_count: 1}
teacher: {arch: RN50-tiny}
train_teacher: {enabled: true, epochs: 4, batch_size: 16, lr: 0.002, warmup_steps: 2, device: cpu}
"""


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A 48-image world in 3 shards (the last one is held out) and its concepts, written by the shard
    and concepts stages' own code run serially in this process (no Ray: this test is about what reads
    the shards)."""
    from pipeline.config import load_manifest
    from stages import concepts, shard, synth

    folder = tmp_path_factory.mktemp("teacher")
    path = folder / "m.yaml"
    path.write_text("name: t\noutput_dir: out\nray: {num_cpus: 2}\n" + WORLD)
    manifest = load_manifest(path)
    synth.run(manifest)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shard, "init_ray", lambda cfg: None)
        patch.setattr(shard, "run_tasks", lambda fn, tasks, **kwargs: (fn(*args) for args in tasks))
        shard.run(manifest)
        patch.setattr(concepts, "init_ray", lambda cfg: None)
        patch.setattr(concepts, "run_tasks", lambda fn, tasks, **kwargs: (fn(*args) for args in tasks))
        concepts.run(manifest)
    return manifest


def test_reader_streams_decoded_pairs_in_order_and_seeded_shuffle(sharded):
    from trainer.models.clip import create_clip
    from trainer.tasks.teacher import clip_transforms
    from trainer.data.image_text import image_text_batches, read_image_text

    layout = RunLayout.of(sharded)
    tars = sorted(layout.shards.root.glob("*.tar"))
    samples = list(read_image_text(tars))
    assert len(samples) == 48 and [s["key"] for s in samples] == sorted(s["key"] for s in samples)
    assert samples[0]["image"].mode == "RGB" and isinstance(samples[0]["text"], str) and samples[0]["text"]

    model, tokenizer = create_clip("RN50-tiny")
    train_tf, _ = clip_transforms(model)
    def first_batch(seed, epoch):
        images, texts = next(iter(image_text_batches(tars, train_tf, tokenizer, batch_size=8, seed=seed,
                                                     epoch=epoch, shuffle_buffer=32)))
        return images, texts
    images, texts = first_batch(0, 0)
    assert images.shape == (8, 3, 64, 64) and texts.shape == (8, 32) and texts.dtype == torch.long
    assert torch.equal(first_batch(0, 0)[1], texts)            # same seed and epoch: same order
    assert not torch.equal(first_batch(0, 1)[1], texts)        # another epoch: another order
    batches = list(image_text_batches(tars, train_tf, tokenizer, batch_size=10, drop_last=True))
    assert len(batches) == 4                                   # 48 // 10, partial batch dropped


@pytest.mark.slow
def test_stage_trains_reports_retrieval_and_checkpoint_loads_in_open_clip(sharded):
    from stages import train_teacher
    from trainer.models.clip import load_clip
    from trainer.tasks.teacher import clip_transforms

    assert train_teacher.enabled(sharded)
    result = train_teacher.run(sharded)
    layout = RunLayout.of(sharded)
    manifest = json.loads(layout.stage("train-teacher").manifest.read_text())
    assert manifest["status"] == "done" and manifest["fingerprint"] == result["fingerprint"]
    metrics = manifest["metrics"]
    heldout = metrics["heldout"]
    assert heldout["shard"] == "00002.tar" and heldout["num_images"] == 16 and not heldout["in_sample"]
    assert heldout["r1_chance"] == pytest.approx(1 / 16, abs=1e-4) and 0 <= heldout["r1"] <= 1
    # same-concepts R@1 counts at least the strict hits; its chance is at least the strict chance
    assert heldout["r1"] <= heldout["r1_same_group"] <= 1
    assert 1 / 16 <= heldout["r1_same_group_chance"] <= 1
    assert metrics["steps"] == 4 * 2                            # 32 training images / 16 per batch
    assert metrics["loss_last_epoch"] < metrics["loss_first_epoch"]
    assert (layout.teacher_checkpoint.parent / "training_curve.png").stat().st_size > 1000
    assert list((layout.tensorboard / "train-teacher").glob("events.out.tfevents.*"))
    assert torch.load(layout.teacher_state, weights_only=True)["step"] == 8   # the training state (resume)

    # The checkpoint loads in open_clip unchanged and gives the same image features as ours.
    ours, _ = load_clip("RN50-tiny", layout.teacher_checkpoint)
    theirs = open_clip.create_model("RN50-tiny", pretrained=str(layout.teacher_checkpoint)).eval()
    _, eval_tf = clip_transforms(ours)
    from trainer.data.image_text import read_image_text
    images = torch.stack([eval_tf(s["image"]) for s in list(read_image_text(
        [layout.shards.root / "00002.tar"]))[:4]])
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode_image(images), ours.encode_image(images))

    # A second run with the same settings is skipped; the checkpoint is untouched.
    stamp = layout.teacher_checkpoint.stat().st_mtime_ns
    train_teacher.run(sharded)
    assert layout.teacher_checkpoint.stat().st_mtime_ns == stamp


def test_same_concepts_recall_counts_captions_of_the_image_s_group():
    from trainer.tasks.teacher import retrieval_recall

    class Lookup(torch.nn.Module):
        """An image (a number r) and a caption (a token r) both embed as row r of the identity."""
        def encode_image(self, images, normalize=True):
            return torch.eye(4)[images[:, 0].long()]
        def encode_text(self, texts, normalize=True):
            return torch.eye(4)[texts[:, 0].long()]

    # images 0..3 look like rows 0, 0, 2, 3; captions are rows 1, 0, 2, 3: image 0 retrieves caption 1
    # (row 0) and image 1 retrieves its own; captions 0 and 1 share a group, so image 0 is a group hit.
    samples = [{"image": torch.full((1,), float(r)), "text": int(t)} for r, t in zip([0, 0, 2, 3], [1, 0, 2, 3])]
    out = retrieval_recall(Lookup(), lambda texts: torch.tensor([[t] for t in texts]), samples,
                           lambda image: image, groups=["cup", "cup", "key", "boat"])
    assert out["r1"] == 0.75 and out["r1_same_group"] == 1.0
    assert out["r1_same_group_chance"] == pytest.approx((2 + 2 + 1 + 1) / 16, abs=1e-4)
    with pytest.raises(ValueError, match="groups"):
        retrieval_recall(Lookup(), lambda texts: torch.tensor([[t] for t in texts]), samples,
                         lambda image: image, groups=["cup"])


def test_disabled_by_default_and_needs_shards(write_manifest):
    from stages import train_teacher

    assert not train_teacher.enabled(write_manifest(""))
    with pytest.raises(StageInputError, match="regionclip shard"):
        train_teacher.run(write_manifest("train_teacher: {enabled: true}"))


def test_a_sample_with_several_captions_gives_one_per_seed_and_epoch():
    from trainer.data.image_text import one_caption

    text = "a dog on a sofa\na puppy sleeping\na brown dog"
    chosen = [one_caption(text, "000000003", seed=0, epoch=e) for e in range(12)]
    assert set(chosen) == set(text.split("\n"))                                   # each comes up
    assert chosen == [one_caption(text, "000000003", seed=0, epoch=e) for e in range(12)]   # fixed per pair
    assert one_caption("a red kite", "000000004", seed=0, epoch=7) == "a red kite"
