"""The demo end to end on manifests/demo-small.yaml (a smaller world than the demo, few steps): every real
stage, then the results table must be complete, and the region-pretrained student must recognise
novel-category regions (ground-truth boxes, top-1 over all classes) better than the image-level teacher:
the demo's claim, in its direction, so a regression cannot land silently.

The small world shows it for the same reason as the demo: the teacher labels regions at about its own
scale (64 px) and the student learns them at the evaluation scale (README "The paper in miniature").
"""
from __future__ import annotations

import json
import math
import subprocess

import pytest

pytestmark = pytest.mark.slow   # runs whole stages or kills processes: not in the fast tier


def test_demo_small_end_to_end_and_direction(demo_small_run):
    from trainer.evaluation import headline_figures

    # `regionclip run manifests/demo-small.yaml` (every stage in a fresh process, as users run it) was
    # started in the background with the session (tests/conftest.py) and this test runs last.
    try:
        code = demo_small_run.wait(timeout=1800)
    except subprocess.TimeoutExpired:
        pytest.fail("demo-small still running after 30 minutes:\n" + demo_small_run.log_tail())
    assert code == 0, f"regionclip run demo-small exited with {code}:\n" + demo_small_run.log_tail()
    summary = json.loads((demo_small_run.output_dir / "eval" / "summary.json").read_text())
    assert "student - teacher" in summary["results_table"]
    f = headline_figures(summary["evaluate"])
    print(json.dumps(f))
    # every figure of the table is there and is a percentage (both inits transferred, both models zero-shot)
    for key, value in f.items():
        assert value is not None and math.isfinite(value), key
        if not key.startswith("margin_"):
            assert 0.0 <= value <= 100.0, (key, value)
    assert f["region_top1_novel_pretrain"] > f["region_top1_novel_teacher"], (
        f"student {f['region_top1_novel_pretrain']} <= teacher {f['region_top1_novel_teacher']} on "
        "novel-region top-1: region pretraining no longer beats the image-level teacher on novel classes")
