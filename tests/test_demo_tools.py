"""`regionclip search` and `regionclip report` on the demo-small run (started in the background with the
session, tests/conftest.py; these tests run after tests/test_demo_direction.py's): K JSON lines and a
contact sheet, a picture as the query, the other index, and the run's page with every picture showing
in a real browser."""
from __future__ import annotations

import json
import subprocess

import pytest
from PIL import Image

from tests.browser import loaded_images
from tests.conftest import REPO

pytestmark = pytest.mark.slow   # reads a whole run: not in the fast tier

MANIFEST = str(REPO / "manifests" / "demo-small.yaml")


def finished_run(demo_small_run):
    try:
        code = demo_small_run.wait(timeout=1800)
    except subprocess.TimeoutExpired:
        pytest.fail("demo-small still running after 30 minutes:\n" + demo_small_run.log_tail())
    if code != 0:
        pytest.fail(f"the demo-small run failed (exit {code}); see test_demo_direction:\n" + demo_small_run.log_tail())
    return demo_small_run.output_dir


def regionclip(capsys, *args) -> tuple[int, str, str]:
    """`regionclip ARGS` in this process (torch is loaded already): exit code, stdout, stderr."""
    from stages.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_search_prints_k_json_lines_and_draws_the_contact_sheet(demo_small_run, capsys):
    run = finished_run(demo_small_run)
    where = f"output_dir={run}"
    code, out, err = regionclip(capsys, "search", MANIFEST, "umbrella", "--top", "5", "--set", where)
    assert code == 0, err
    hits = [json.loads(line) for line in out.splitlines()]          # stdout holds the hits and nothing else
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    for h in hits:
        assert set(h) == {"rank", "score", "shard", "key", "region", "box", "caption"}
        assert h["key"].startswith(h["shard"]) and h["caption"]
        x1, y1, x2, y2 = h["box"]
        assert 0 <= x1 < x2 and 0 <= y1 < y2
    sheet = run / "search" / "umbrella_student.png"
    assert Image.open(sheet).size[0] > 400
    assert [json.loads(line) for line in sheet.with_suffix(".jsonl").read_text().splitlines()] == hits
    assert "building the student's region index" in err
    assert err.count("trained by train-teacher on the synthetic world") == 1        # said once

    # a picture as the query, on the teacher's index: K hits from the run's shards, best first (which image
    # ranks first is the tiny teacher's judgement of a whole picture against regions, not asserted here)
    picture = run / "synth" / "images" / "000003.jpg"
    code, out, err = regionclip(capsys, "search", MANIFEST, "--image", str(picture), "--index", "teacher",
                                "--top", "3", "--set", where)
    assert code == 0, err
    hits = [json.loads(line) for line in out.splitlines()]
    assert len(hits) == 3 and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert all(h["key"].startswith(h["shard"]) for h in hits)
    assert (run / "search" / "image-000003_teacher.png").is_file()

    # the index is built once: a second search reads it
    code, _, err = regionclip(capsys, "search", MANIFEST, "a red kite", "--set", where)
    assert code == 0 and "building" not in err


def test_report_of_the_demo_small_run_shows_every_picture_in_a_browser(demo_small_run, capsys, tmp_path):
    run = finished_run(demo_small_run)
    code, out, err = regionclip(capsys, "report", MANIFEST, "--search", "umbrella,cup", "--set", f"output_dir={run}")
    assert code == 0, err
    page = (run / "report.html").read_text(encoding="utf-8")
    for text in ("Pseudo-labels", "Training curves", "student - teacher", "95% interval", "detections.png",
                 "umbrella (student)", "cup (teacher)"):
        assert text in page, text
    images = loaded_images(run / "report.html", tmp_path / "chromium")
    # 4 pseudo-label examples, the curves of train-teacher, train-rpn, pretrain and transfer, evaluate's
    # pictures (side by side and one per model), 2 concepts x 2 indexes of search examples
    assert len(images) == page.count("<img ") >= 4 + 4 + 1 + 6 + 4
    assert all(complete and width > 0 for complete, width, _ in images), [i for i in images if not i[1]]
