"""transfer's training proposals are kept under a fingerprint: the same rows read back, a stale or damaged
file refused; the stage's second start (a resume after a kill) runs no RPN, a changed RPN setting or
checkpoint runs it again."""
from __future__ import annotations

import pytest
import torch

from tests.detection_helpers import StandInRPN, save_tiny_clip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from pipeline.config import SynthConfig
    from pipeline.synth import generate_world

    root = tmp_path_factory.mktemp("world")
    generate_world(SynthConfig(seed=2, num_images=6, num_val_images=2, min_side=64, max_side=96, max_objects=3),
                   root, progress=False)
    return root


def _compute(world, tmp_path, keep=None, fingerprint="", rpn=None):
    from trainer.data.detection import DetectionSet
    from trainer.tasks.transfer import compute_proposals, rpn_proposal_fn

    data = DetectionSet(world / "instances_train.json")
    ids = data.image_ids_with_boxes(data.vocabulary("base"))
    propose = rpn_proposal_fn(rpn or StandInRPN(), min_size=64, max_size=128, pre_nms_top_n=200,
                              post_nms_top_n=48, nms_thresh=0.7)
    return ids, compute_proposals(propose, data, ids, batch_size=4, progress=False, folder=tmp_path, keep=keep,
                                  fingerprint=fingerprint)


def test_kept_proposals_read_back_the_same_under_their_fingerprint_only(world, tmp_path):
    from trainer.tasks.transfer import load_proposals

    kept = tmp_path / "kept" / "train_proposals.parquet"
    ids, computed = _compute(world, tmp_path, keep=kept, fingerprint="abc")
    assert kept.is_file() and len(ids) >= 3
    assert not [p for p in kept.parent.iterdir() if p != kept]     # written under a temporary name, renamed
    loaded = load_proposals(kept, "abc", ids, folder=tmp_path)
    assert loaded is not None and len(loaded) == len(ids)
    for image_id in ids:
        (a, sa), (b, sb) = computed[image_id], loaded[image_id]
        assert len(a) > 0 and torch.equal(a, b) and torch.equal(sa, sb)
    assert load_proposals(kept, "other", ids, folder=tmp_path) is None           # other RPN or settings
    assert load_proposals(kept, "abc", [*ids, 10 ** 9], folder=tmp_path) is None  # an image it lacks
    assert load_proposals(tmp_path / "none.parquet", "abc", ids, folder=tmp_path) is None
    kept.write_bytes(kept.read_bytes()[: kept.stat().st_size // 2])              # cut off
    assert load_proposals(kept, "abc", ids, folder=tmp_path) is None


def test_a_failed_computation_leaves_no_kept_file(world, tmp_path):
    class Broken(StandInRPN):
        def propose(self, images, **kw):
            if self.calls:
                raise RuntimeError("killed")
            return super().propose(images, **kw)

    kept = tmp_path / "train_proposals.parquet"
    with pytest.raises(RuntimeError, match="killed"):
        _compute(world, tmp_path, keep=kept, fingerprint="abc", rpn=Broken())
    assert not list(tmp_path.glob("*.parquet"))


MANIFEST = """
synth: {num_images: 6, num_val_images: 2, min_side: 64, max_side: 96, max_objects: 3}
teacher: {arch: RN50-tiny, checkpoint: teacher.pt}
transfer: {init: [teacher], steps: 2, batch_size: 1, min_sizes: [64], max_size: 128, rpn_checkpoint: rpn.pt,
           rois_per_image: 16, proposals_per_image: 48, warmup_steps: 1, rpn_pre_nms_top_n: 600}
"""


@pytest.mark.slow
def test_transfer_restarts_reuse_the_training_proposals_until_the_rpn_changes(write_manifest, monkeypatch):
    import stages.resolve
    import trainer.tasks.transfer
    from pipeline.config import load_manifest
    from pipeline.layout import RunLayout
    from stages import synth, transfer

    manifest = write_manifest(MANIFEST)
    layout = RunLayout.of(manifest)
    synth.run(manifest)
    save_tiny_clip(manifest.resolve("teacher.pt"), seed=0)
    manifest.resolve("rpn.pt").write_bytes(b"an RPN")        # its content is fingerprinted; StandInRPN runs
    rpn = StandInRPN()
    monkeypatch.setattr(stages.resolve, "load_frozen_rpn", lambda m, purpose, device="cpu": rpn)
    real_train = trainer.tasks.transfer.train_detector

    def killed(*args, **kwargs):
        raise RuntimeError("killed while training")

    monkeypatch.setattr(trainer.tasks.transfer, "train_detector", killed)
    with pytest.raises(RuntimeError, match="killed"):
        transfer.run(manifest)                                 # proposals computed, then killed
    kept = layout.transfer_train_proposals
    computed_calls, kept_bytes = len(rpn.calls), kept.read_bytes()
    assert computed_calls > 0

    monkeypatch.setattr(trainer.tasks.transfer, "train_detector", real_train)
    first = transfer.run(manifest)                             # the restart: no RPN call
    assert len(rpn.calls) == computed_calls and kept.read_bytes() == kept_bytes
    assert first["train_proposals"] == "reused"
    detector = torch.load(layout.transfer_checkpoint("teacher"), weights_only=True)["state_dict"]

    layout.transfer_checkpoint("teacher").unlink()              # trained again from the kept proposals:
    layout.transfer_state("teacher").unlink()                   # the same detector
    again = transfer.run(manifest)
    assert len(rpn.calls) == computed_calls and again["work"]["trained"] == ["teacher"]
    retrained = torch.load(layout.transfer_checkpoint("teacher"), weights_only=True)["state_dict"]
    assert detector and all(torch.equal(v, retrained[k]) for k, v in detector.items())
    assert first["work"]["trained"] == ["teacher"]

    # another NMS threshold for the transfer RPN: computed again, with it
    changed = load_manifest(manifest.source_path, ["transfer.rpn_nms_thresh=0.6"])
    transfer.run(changed)
    assert len(rpn.calls) > computed_calls and rpn.calls[-1]["nms_thresh"] == 0.6
    # another RPN checkpoint (same settings): computed again
    calls = len(rpn.calls)
    changed.resolve("rpn.pt").write_bytes(b"another RPN")
    transfer.run(changed)
    assert len(rpn.calls) > calls
