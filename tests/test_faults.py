"""SIGKILL at seeded moments, then a rerun: the rows of an uninterrupted run, and no marker ever vouches
for an incomplete file. The cheap stages here (shard: tests/test_shard_faults.py); every stage with
five kills each: bench/faults.py (figures in docs/hardening.md)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.faultkit import kill_and_resume, markers_truthful
from tests.test_verify import make_run

pytestmark = pytest.mark.slow   # runs whole stages or kills processes: not in the fast tier

KILLS = 2  # CI budget; bench/faults.py does five per stage


def why_not_matched(report: dict) -> dict:
    """The parts of a report that say what differed (pytest cuts a long dict short)."""
    return {k: report[k] for k in ("differences", "untruthful_markers", "leftover_temporaries", "moments")}


def session_ray(ray_local) -> str:
    """The test session's Ray: each stage process joins it rather than starting its own (seconds each)."""
    return ray_local.get_runtime_context().gcs_address


def test_concepts_killed_then_resumed_matches_an_uninterrupted_run(ray_local, tmp_path):
    from pipeline.config import load_manifest
    from stages import shard

    path = make_run(tmp_path, n=16, per_shard=2)
    shard.run(load_manifest(path))
    report = kill_and_resume("concepts", path, kills=KILLS, seed=7, log=tmp_path / "log.txt",
                             ray_address=session_ray(ray_local), inline_reference=True)
    assert report["matched"], why_not_matched(report)
    assert report["compared"] >= 9  # 8 caption sidecars + the pool
    assert not report["leftover_temporaries"]


def test_proposals_killed_then_resumed_matches_an_uninterrupted_run(ray_local, tmp_path):
    """A model stage on a Ray Data actor pool: kills land while actors hold the RPN."""
    from pipeline.config import load_manifest
    from tests.labelkit import manifest_body, prepare_run

    path = tmp_path / "m.yaml"
    path.write_text("name: t\noutput_dir: out\nray: {num_cpus: 2}\n" + manifest_body(num_images=8, per_shard=2)
                    .replace("num_actors: 2", "num_actors: 1"))  # one actor: a cheaper start per kill
    prepare_run(load_manifest(path))
    report = kill_and_resume("proposals", path, kills=KILLS, seed=3, log=tmp_path / "log.txt",
                             ray_address=session_ray(ray_local), inline_reference=True)
    assert report["matched"], why_not_matched(report)
    assert report["compared"] == 4


def test_markers_truthful_flags_a_marker_whose_file_changed(tmp_path):
    import json

    (tmp_path / "00000.parquet").write_bytes(b"abc")
    (tmp_path / "00000_stats.json").write_text(json.dumps(
        {"files": {"00000.parquet": {"bytes": 3, "sha256": "0" * 64}}}))
    assert markers_truthful(Path(tmp_path)) == ["00000.parquet"]


def test_a_stream_resumed_exactly_at_the_end_of_an_epoch_goes_on(tmp_path):
    """A kill right after a checkpoint that fell on an epoch boundary (found by bench/faults.py: the
    resumed pretrain stopped with 'no usable sample in epoch 0')."""
    import torch

    from tests.pretrain_world import make_world
    from trainer.data.pretrain_stream import DataOptions, PretrainStream, shard_sources

    w = make_world(tmp_path / "run", num_shards=1, per_shard=8, boxes=4)
    sources = shard_sources(w["layout"], [0])
    opts = DataOptions(batch_size=4, min_size=64, max_size=96, regions_per_image=4, seed=0)
    it = iter(PretrainStream(sources, opts))
    batches = [next(it) for _ in range(3)]
    position = {"workers": {"0": list(batches[1]["_position"])}, "consumed_batches": 2}
    resumed = next(iter(PretrainStream(sources, opts, position=position)))
    assert resumed["keys"] == batches[2]["keys"]
    assert torch.equal(resumed["images"], batches[2]["images"])
