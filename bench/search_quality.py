"""Region search quality on the synthetic world: precision@K per novel class, the teacher's index
against the student's.

    python bench/search_quality.py [--manifest manifests/demo.yaml] [--k 16] [--write-results]

Needs the manifest's run complete through pretrain (`make demo`). Each novel class's name is a query,
through `regionclip search`'s own path (the 81 templates, the teacher's text encoder, each index as
`search` builds or finds it). A hit is right when its box overlaps an object of that class drawn in
that image with IoU >= 0.5. The truth comes from the generator itself: pipeline.synth.render_scene
re-draws each corpus image with its objects in memory, here and nowhere else (no stage reads it; the
corpus has no boxes of novel classes at all, only captions). Chance is the share of the index's
regions that are right for the class: what a random ranking scores; "reached" is the share of the
class's drawn objects that some proposal covers (the proposals bound any index). The contact sheets, right hits
framed green and wrong ones red, go to <output_dir>/search/quality_<class>_<index>.png.

Prints one line per class and index, the means, then (last line) one JSON object. With
`--write-results` the table replaces this script's section of docs/results.md (between its markers;
the rest of the page, e.g. bench/demo_seeds.py's section, is kept), with the machine, commit and date.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._machine import cpu_model  # noqa: E402

from pipeline.config import load_manifest  # noqa: E402
from pipeline.io import read_parquet  # noqa: E402
from pipeline.layout import RunLayout  # noqa: E402
from pipeline.sidecars import iter_proposals, shard_of_key, sidecar_shards  # noqa: E402

RESULTS_MD = REPO / "docs" / "results.md"
BEGIN, END = "<!-- bench/search_quality.py: begin -->", "<!-- bench/search_quality.py: end -->"
IOU = 0.5


def image_index_of_keys(layout: RunLayout) -> dict[str, int]:
    """Sample key -> index of its synthetic corpus image (images/NNNNNN.jpg), from the shards' rows."""
    found = {}
    for s in sidecar_shards(layout.shards):
        rows = read_parquet(layout.shards.parquet(s), columns=["key", "url", "status"]).to_pydict()
        found.update((k, int(Path(u).stem)) for k, u, st in zip(rows["key"], rows["url"], rows["status"])
                     if st == "success")
    return found


def overlaps(boxes: np.ndarray, box: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(IoU, intersection over each box's own area) of boxes [N, 4] with one box (x1 y1 x2 y2 all)."""
    x1, y1 = np.maximum(boxes[:, 0], box[0]), np.maximum(boxes[:, 1], box[1])
    x2, y2 = np.minimum(boxes[:, 2], box[2]), np.minimum(boxes[:, 3], box[3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    own = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = own + (box[2] - box[0]) * (box[3] - box[1]) - inter
    return inter / np.maximum(union, 1e-9), inter / np.maximum(own, 1e-9)


def iou(boxes: np.ndarray, box: tuple) -> np.ndarray:
    return overlaps(boxes, box)[0]


class WorldTruth:
    """The objects the generator drew in each corpus image (re-drawn on demand, kept per image)."""

    def __init__(self, synth_cfg):
        self.cfg, self.cache = synth_cfg, {}

    def objects(self, index: int) -> list[tuple[str, tuple]]:
        from pipeline.synth import render_scene

        if index not in self.cache:
            self.cache[index] = [(o.name, (o.box[0], o.box[1], o.box[0] + o.box[2], o.box[1] + o.box[3]))
                                 for o in render_scene(self.cfg, "train", index).objects]
        return self.cache[index]

    def right(self, index: int, boxes: np.ndarray, name: str, on: bool = False) -> np.ndarray:
        """Which of `boxes` overlap a drawn `name` object with IoU >= 0.5 (`on`: lie at least half on one,
        a region inside the object counting too)."""
        hit = np.zeros(len(boxes), bool)
        for drawn, box in self.objects(index):
            if drawn == name and len(boxes):
                hit |= overlaps(boxes, box)[1 if on else 0] >= IOU
        return hit


def chance_and_reach(layout: RunLayout, truth: WorldTruth, image_of: dict[str, int],
                     names: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Per class: the share of all indexed regions (every proposal) that are right for it (chance), and
    the share of its drawn objects that some proposal covers with IoU >= 0.5 (what any index can reach:
    the proposals bound the search)."""
    right, total, drawn, covered = Counter(), 0, Counter(), Counter()
    for s in sidecar_shards(layout.proposals):
        for p in iter_proposals(layout.proposals, s):
            total += len(p.boxes)
            for name in names:
                right[name] += int(truth.right(image_of[p.key], p.boxes, name).sum())
            for name, box in truth.objects(image_of[p.key]):
                if name in names:
                    drawn[name] += 1
                    covered[name] += bool(len(p.boxes)) and bool((iou(p.boxes, box) >= IOU).any())
    return ({name: right[name] / max(total, 1) for name in names},
            {name: covered[name] / max(drawn[name], 1) for name in names})


def measure(manifest, k: int) -> dict:
    from pipeline.synth import split_categories
    from stages.search import hit_records, region_index, search_regions, write_results
    from trainer.engine.device import resolve_device

    layout = RunLayout.of(manifest)
    novel = split_categories(manifest.synth.num_novel)[1]
    image_of = image_index_of_keys(layout)
    truth = WorldTruth(manifest.synth)
    chance, reach = chance_and_reach(layout, truth, image_of, novel)
    result = {"k": k, "classes": novel, "chance": chance, "reach": reach, "indexes": {}}
    for which in ("teacher", "student"):
        index, _ = region_index(manifest, which, resolve_device(manifest.evaluate.device))
        hits = search_regions(manifest, which, texts=novel, top=k)
        per_class, per_class_on = {}, {}
        for name, found in zip(novel, hits):
            records = hit_records(layout, found)
            boxes = [np.array([r["box"]], np.float32) for r in records]
            good = [bool(truth.right(image_of[r["key"]], b, name)[0]) for r, b in zip(records, boxes)]
            on = [bool(truth.right(image_of[r["key"]], b, name, on=True)[0]) for r, b in zip(records, boxes)]
            per_class[name], per_class_on[name] = sum(good) / k, sum(on) / k
            write_results(manifest, f"quality_{name}_{which}", f'"{name}": top {k}, {which} index '
                          f"({sum(good)} right at IoU >= {IOU}: green)", records, good=good)
        result["indexes"][which] = {"rows": len(index), "precision": per_class, "precision_on": per_class_on,
                                    "mean": float(np.mean(list(per_class.values()))),
                                    "mean_on": float(np.mean(list(per_class_on.values())))}
    return result


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + (" (with local changes)" if dirty else "")
    except OSError:
        return "?"


def markdown(result: dict, manifest_path: str) -> str:
    t, s = result["indexes"]["teacher"], result["indexes"]["student"]
    k = result["k"]
    lines = [BEGIN, "", "## Region search on the synthetic world (`bench/search_quality.py`)", "",
             f"Precision@{k} of `regionclip search MANIFEST CLASS` for each novel class of {manifest_path}'s run: "
             f"the share of the top {k} regions that overlap an object of that class (IoU >= {IOU}), the truth "
             "being what the generator drew (the corpus has no boxes of these classes). Chance: the share of "
             "all indexed regions that are right. Reached: the share of the class's drawn objects that some "
             f"proposal covers at IoU >= {IOU} (no index can find the others). Teacher index: {t['rows']} "
             f"regions, student index: {s['rows']}.", "",
             f"\"On the object\": the share of the top {k} that lie at least half on an object of the class (a "
             "region inside the object counts; the proposals rarely fit the small world's objects).", "",
             f"| novel class | teacher P@{k} | student P@{k} | teacher, on the object | student, on the object "
             "| chance (IoU) | reached |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in result["classes"]:
        lines.append(f"| {name} | {t['precision'][name]:.2f} | {s['precision'][name]:.2f} | "
                     f"{t['precision_on'][name]:.2f} | {s['precision_on'][name]:.2f} | "
                     f"{result['chance'][name]:.3f} | {result['reach'][name]:.2f} |")
    lines += [f"| mean | {t['mean']:.2f} | {s['mean']:.2f} | {t['mean_on']:.2f} | {s['mean_on']:.2f} | "
              f"{np.mean(list(result['chance'].values())):.3f} | {np.mean(list(result['reach'].values())):.2f} |",
              "",
              f"Measured {time.strftime('%Y-%m-%d')} at commit {commit()} on {cpu_model()} "
              f"({os.cpu_count()} CPUs).", "", END]
    return "\n".join(lines)


def write_results(text: str, path: Path = RESULTS_MD) -> None:
    """Replace this script's section of docs/results.md (between its markers), keeping the rest."""
    page = path.read_text(encoding="utf-8") if path.is_file() else "# Results\n"
    if BEGIN in page and END in page:
        head, rest = page.split(BEGIN, 1)
        page = head + text + rest.split(END, 1)[1]
    else:
        page = page.rstrip() + "\n\n" + text + "\n"
    path.write_text(page, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", default=str(REPO / "manifests" / "demo.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--k", type=int, default=16, help="hits per query (default 16)")
    parser.add_argument("--write-results", action="store_true", help="write the table into docs/results.md")
    args = parser.parse_args()
    manifest = load_manifest(args.manifest, args.overrides)
    if manifest.corpus.format != "synthetic":
        raise SystemExit("search_quality needs a synthetic-world run (corpus.format: synthetic)")
    started = time.time()
    result = measure(manifest, args.k)
    for which in ("teacher", "student"):
        figures = result["indexes"][which]
        print(f"{which}: " + ", ".join(f"{n} {p:.2f}" for n, p in figures["precision"].items())
              + f"; mean P@{args.k} {figures['mean']:.3f} (on the object {figures['mean_on']:.3f}) over "
              f"{figures['rows']} regions")
    print("chance: " + ", ".join(f"{n} {p:.3f}" for n, p in result["chance"].items()))
    print("objects reached by a proposal: " + ", ".join(f"{n} {p:.2f}" for n, p in result["reach"].items()))
    name = Path(args.manifest).name
    if args.write_results:
        write_results(markdown(result, f"manifests/{name}"))
        print(f"wrote {RESULTS_MD}")
    t, s = result["indexes"]["teacher"], result["indexes"]["student"]
    print(json.dumps({"manifest": name, "k": args.k, "precision_at_k_teacher_mean": round(t["mean"], 4),
                      "precision_at_k_student_mean": round(s["mean"], 4),
                      "on_object_at_k_teacher_mean": round(t["mean_on"], 4),
                      "on_object_at_k_student_mean": round(s["mean_on"], 4),
                      "precision_at_k_teacher": t["precision"], "precision_at_k_student": s["precision"],
                      "chance": {n: round(c, 5) for n, c in result["chance"].items()},
                      "reached": {n: round(c, 4) for n, c in result["reach"].items()},
                      "regions_teacher": t["rows"], "regions_student": s["rows"],
                      "seconds": round(time.time() - started, 1)}))


if __name__ == "__main__":
    main()
