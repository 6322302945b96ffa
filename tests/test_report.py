"""`regionclip report` on a small hand-made run folder (the whole demo-small run: tests/test_demo_tools.py),
checked in a real headless browser; and the detection pictures' grid."""
from __future__ import annotations

import argparse
import re

import numpy as np
from PIL import Image

from pipeline.io import write_json
from pipeline.layout import RunLayout
from pipeline.pictures import LabelledBox, Panel, _place_label, detection_grid, save_png
from pipeline.sidecars import write_concept_pool, write_shard_rows
from tests.browser import loaded_images


def make_run(layout: RunLayout) -> None:
    """What a run folder holds after shard, concepts, pretrain and evaluate: stage manifests, a shard's
    rows (two rejected), the concept pool, a training curve, eval/summary.json and a picture."""
    from trainer.evaluation import results_table

    rows = [{"key": f"00000000{i}", "status": "success", "caption": f"a cat {i}"} for i in range(3)]
    rows += [{"key": "000000003", "status": "failed_to_decode", "reason": "not_an_image"},
             {"key": "000000004", "status": "failed_caption", "reason": "empty_caption"}]
    write_shard_rows(layout.shards, 0, rows)
    write_json(layout.stage("shard").manifest, {"stage": "shard", "status": "done", "fingerprint": "f0",
                                                "counts": {"in": 5, "written": 3, "rejected": 2}, "seconds": 1.5,
                                                "shards": {"00000": {"status": "done"}}})
    write_concept_pool(layout.concepts_parquet, [{"concept_id": i, "name": n, "count": c, "source": "corpus"}
                                                 for i, (n, c) in enumerate([("umbrella", 40), ("cat", 25)])])
    curve = layout.checkpoints("pretrain") / "last.png"
    curve.parent.mkdir(parents=True)
    Image.new("RGB", (300, 120), (200, 220, 240)).save(curve)
    evaluation = {"images": 150, "regions": {"novel": 61, "base": 240},
                  "region_recognition_top1": {"teacher": {"novel": 30.0, "base": 60.0, "all": 54.0},
                                              "pretrain": {"novel": 45.0, "base": 62.0, "all": 58.6}},
                  "intervals": {"region_top1_novel": [4.2, 26.1]}}
    write_json(layout.summary_json, {"evaluate": evaluation, "results_table": results_table(evaluation)})
    picture = Image.new("RGB", (120, 90), "white")
    save_png(detection_grid([[Panel(picture, [LabelledBox((10, 10, 60, 60), "cat", 0.9)])]]),
             layout.eval_detections_picture)


def test_report_page_shows_every_section_and_every_picture_in_a_browser(tmp_path, write_manifest):
    from stages import report

    manifest = write_manifest("corpus: {format: synthetic}\n")
    layout = RunLayout.of(manifest)
    make_run(layout)
    report.run(manifest, argparse.Namespace(search=None, examples=4))

    page = layout.report_html.read_text(encoding="utf-8")
    sections = re.findall(r'<h2 id="s\d+">([^<]+)</h2>', page)
    assert sections == ["Stages", "Concept pool", "Pseudo-labels", "Training curves", "Results", "Detections",
                        "Search"]
    assert "<td>not_an_image</td>" in page and "<td>empty_caption</td>" in page      # rejects by reason
    assert "<td>umbrella</td><td class=\"num\">40</td>" in page                       # the concept pool
    assert "[+4.2, +26.1]" in page and "+15.0" in page                                # a margin, its interval
    assert "The label stage has not run." in page                                     # what is missing says so
    assert 'src="data:image/png;base64,' in page and "src=\"eval" not in page          # pictures inline

    images = loaded_images(layout.report_html, tmp_path / "chromium")
    assert len(images) == page.count("<img ") == 2                                    # the curve, the detections
    assert all(complete and width > 0 for complete, width, _ in images), images


def test_labels_of_detections_never_overlap():
    taken: list = []
    for _ in range(6):        # six boxes in the same place: each label finds a free place, or none
        rect = _place_label((50, 14), (20, 20, 120, 120), taken, (200, 200))
        if rect is not None:
            assert not any(r[0] < rect[2] and rect[0] < r[2] and r[1] < rect[3] and rect[1] < r[3] for r in taken)
            taken.append(rect)
    assert len(taken) >= 5


def test_detection_grid_gives_each_class_one_colour_and_a_legend():
    from pipeline.pictures import CLASS_COLOURS

    image = Image.new("RGB", (160, 120), (128, 128, 128))
    detections = [LabelledBox((10, 10, 70, 70), "cat", 0.9), LabelledBox((80, 20, 150, 100), "dog", 0.8),
                  LabelledBox((5, 5, 150, 110), "dog", 0.1)]                  # below the threshold: not drawn
    truth = [LabelledBox((12, 12, 68, 72), "cat")]
    grid = detection_grid([[Panel(image, detections, truth), Panel(image, detections[:1], truth)]],
                          column_titles=["a", "b"], cell=200, marked=["dog"])
    pixels = np.asarray(grid).reshape(-1, 3)
    cat, dog = CLASS_COLOURS[0], CLASS_COLOURS[1]                          # classes in name order
    assert (pixels == cat).all(1).sum() > 200 and (pixels == dog).all(1).sum() > 100   # boxes and swatches
    assert grid.width == 2 * 206 + 6
