"""Command `report`: the run on one page, <output_dir>/report.html (pictures inline, no script, no
network): what each stage did (rows in / out / rejected, rejected rows by reason, time), the concept
pool, pseudo-label examples, training curves, the results tables with their 95% intervals, the
detection pictures, and search examples for a few concepts.

    regionclip report MANIFEST [--search "umbrella,cup"] [--examples 4]

It reads what is there: a stage not run yet is a line saying so. The search examples use `regionclip
search`'s indexes (built on first use, stages/search.py); their contact sheets are also in search/.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from pipeline.config import RunManifest
from pipeline.layout import RunLayout

COMMAND = "report"
HELP = "one HTML page of the run: stages, rejects, concepts, pseudo-labels, curves, results, pictures, search"
HOLDS_RUN_LOCK = True        # its search examples may build an index inside the run folder
SEARCH_HITS = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--search", default=None,
                        help="concepts for the search examples, comma-separated (default: the synthetic "
                             "world's novel classes, else the 4 most frequent concepts); '' for none")
    parser.add_argument("--examples", type=int, default=4, help="pseudo-labelled images to show (default 4)")


def run(manifest: RunManifest, args: argparse.Namespace) -> dict:
    from pipeline.io import write_bytes
    from pipeline.report import page

    layout = RunLayout.of(manifest)
    sections = [stages_section(manifest, layout), concepts_section(layout),
                pseudo_labels_section(layout, args.examples), curves_section(layout), results_section(layout),
                pictures_section(layout), search_section(manifest, layout, search_concepts(manifest, layout, args))]
    subtitle = f"{manifest.name}: {layout.root} - {time.strftime('%Y-%m-%d %H:%M')}"
    write_bytes(layout.report_html, page(f"RegionCLIP run: {manifest.name}", sections, subtitle).encode("utf-8"))
    print(f"report: {layout.report_html}")
    return {"path": str(layout.report_html)}


def stages_section(manifest: RunManifest, layout: RunLayout):
    from pipeline.report import Section, shard_rejects, table
    from pipeline.stage import read_stage_manifest
    from stages.status import status

    def counts(stage: str) -> str:
        found = (read_stage_manifest(layout.stage(stage)) or {}).get("counts") or {}
        return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in found.items() if not isinstance(v, (dict, list)))

    columns = ["stage", "status", "shards", "seconds"]
    body = table([*columns, "counts"], [[r[c] for c in columns] + [counts(r["stage"])] for r in status(manifest)])
    rejects = shard_rejects(layout)
    if rejects:
        body += "<p>Rejected input rows (shard stage) by reason:</p>" + table(
            ["status", "reason", "rows"], [[s, r, n] for (s, r), n in rejects.most_common()])
    elif layout.shards.root.is_dir():
        body += "<p>No input row was rejected.</p>"
    return Section("Stages", body)


def concepts_section(layout: RunLayout, top: int = 30):
    from pipeline.report import Section, concept_pool, escape, table

    pool = concept_pool(layout)
    if not pool:
        return Section("Concept pool", '<p class="note">The concepts stage has not run.</p>')
    concept_rows = sorted(pool, key=lambda r: (-r["count"], r["name"]))[:top]
    return Section("Concept pool", f"<p>{len(pool)} concepts; the {len(concept_rows)} most frequent (captions "
                                   f"naming each):</p>" + table(["concept", "captions", "source"],
                                   [[r["name"], r["count"], r["source"]] for r in concept_rows])
                   + ("" if len(pool) <= top else f"<p>and {escape(len(pool) - top)} more.</p>"))


def pseudo_labels_section(layout: RunLayout, examples: int):
    from pipeline.report import Section, figure
    from pipeline.sidecars import read_labels, sidecar_shards
    from stages.show import pseudo_label_picture

    shards = sidecar_shards(layout.labels)
    if not shards or examples < 1:
        return Section("Pseudo-labels", '<p class="note">The label stage has not run.</p>')
    keys = read_labels(layout.labels, shards[0], ["key"]).column("key").to_pylist()[:examples]
    pictures = [figure(pseudo_label_picture(layout, key, 5, min_side=360)[0]) for key in keys]
    return Section("Pseudo-labels", "<p>The teacher's concept for the top proposals of a few images "
                   "(its probability, and the proposal's objectness).</p>"
                   f'<div class="row">{"".join(pictures)}</div>')


def curves_section(layout: RunLayout):
    from pipeline.report import Section, figure, training_curves

    curves = training_curves(layout)
    if not curves:
        return Section("Training curves", '<p class="note">No training stage has finished.</p>')
    return Section("Training curves", "".join(figure(p, f"{p.parent.name}: {p.name}") for p in curves))


def results_section(layout: RunLayout):
    from pipeline.report import Section, escape, markdown_tables, table
    from trainer.evaluation import headline_figures

    if not layout.summary_json.is_file():
        return Section("Results", '<p class="note">The evaluate stage has not run.</p>')
    summary = json.loads(layout.summary_json.read_text(encoding="utf-8"))
    body = markdown_tables(summary["results_table"]) if isinstance(summary.get("results_table"), str) else ""
    evaluation = summary.get("evaluate") or {}
    figures = headline_figures(evaluation) if evaluation else {}
    margins = [[name[len("margin_"):], f"{value:+.1f}", _interval(figures.get(f"{name}_ci95"))]
               for name, value in figures.items()
               if name.startswith("margin_") and not name.endswith("_ci95") and value is not None]
    if margins:
        rests = ", ".join(f"{figures[k]} {k.replace('_', ' ')}" for k in ("images", "novel_regions", "base_regions")
                          if figures.get(k) is not None)
        body += (f"<p>Student - teacher margins with their 95% intervals (paired bootstrap over the held-out "
                 f"images){': ' + escape(rests) if rests else ''}.</p>"
                 + table(["margin", "student - teacher", "95% interval"], margins))
    return Section("Results", body or '<p class="note">eval/summary.json holds no results table.</p>')


def _interval(value) -> str:
    return "" if not value else f"[{value[0]:+.1f}, {value[1]:+.1f}]"


def pictures_section(layout: RunLayout):
    from pipeline.report import Section, evaluation_pictures, figure

    pictures = evaluation_pictures(layout)
    if not pictures:
        return Section("Detections", '<p class="note">The evaluate stage has not run.</p>')
    return Section("Detections", "".join(figure(p, p.name) for p in pictures))


def search_concepts(manifest: RunManifest, layout: RunLayout, args) -> list[str]:
    """--search, else the synthetic world's novel classes, else the 4 most frequent concepts."""
    from pipeline.report import concept_pool

    if args.search is not None:
        return [c.strip() for c in args.search.split(",") if c.strip()]
    if manifest.corpus.format == "synthetic":
        from pipeline.synth import split_categories

        return split_categories(manifest.synth.num_novel)[1][:4]
    return [r["name"] for r in concept_pool(layout)[:4]]


def search_section(manifest: RunManifest, layout: RunLayout, concepts: list[str]):
    from pipeline.report import Section, figure
    from pipeline.stage import StageInputError
    from stages.search import hit_records, search_regions, slug, write_results

    if not concepts:
        return Section("Search", '<p class="note">No search examples asked for.</p>')
    parts = []
    for which in [w for w in ("student", "teacher") if _model_exists(manifest, w)]:
        try:
            hits = search_regions(manifest, which, texts=concepts, top=SEARCH_HITS)
        except (StageInputError, FileNotFoundError) as err:
            print(f"report: no {which} search examples: {err}", file=sys.stderr)
            continue
        for concept, found in zip(concepts, hits):
            records = hit_records(layout, found)
            sheet = write_results(manifest, f"{slug(concept)}_{which}",
                                  f'"{concept}": top {len(records)} regions, {which} index', records)
            parts.append(figure(sheet, f"{concept} ({which})", width=700))
    if not parts:
        return Section("Search", '<p class="note">No region index can be built yet (proposals and a model '
                                 'are needed).</p>')
    return Section("Search", "<p>The regions most like each concept's text embedding "
                   "(`regionclip search MANIFEST TEXT`), for the student's and the teacher's region embeddings."
                   f"</p>{''.join(parts)}")


def _model_exists(manifest: RunManifest, which: str) -> bool:
    from stages.search import index_model_files

    try:
        return index_model_files(manifest, which)[0].is_file()
    except FileNotFoundError:
        return False
