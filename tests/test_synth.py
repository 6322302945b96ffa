"""The synthetic open-vocabulary world: determinism, the base/novel split, captions, boxes, layout."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import SynthConfig
from pipeline.synth import (CAPTION_TEMPLATES, CATEGORIES, PLURALS, draw_object, generate_world,
                            render_scene, split_categories, write_contact_sheet)

WORLD = SynthConfig(seed=3, num_images=60, num_val_images=100, min_side=160, max_side=320,
                    max_objects=4, num_novel=6)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("world")
    generate_world(WORLD, folder, progress=False)
    return folder


@pytest.fixture(scope="module")
def corpus_scenes():
    """The corpus images re-rendered in memory: what each picture holds, novel objects included."""
    return [render_scene(WORLD, "train", i) for i in range(WORLD.num_images)]


def _load(folder: Path, name: str):
    return json.loads((folder / name).read_text(encoding="utf-8"))


def _all_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    small = SynthConfig(seed=11, num_images=8, num_val_images=4)
    generate_world(small, tmp_path / "a", progress=False)
    generate_world(small, tmp_path / "b", progress=False)
    generate_world(small.model_copy(update={"seed": 12}), tmp_path / "c", progress=False)
    a, b, c = (_all_files(tmp_path / name) for name in "abc")
    assert len(a) == 8 + 4 + 5          # images, val images, 4 json/tsv files, world.json
    assert a == b
    assert a["images/000000.jpg"] != c["images/000000.jpg"]
    assert a["captions.tsv"] != c["captions.tsv"]
    assert not [name for name in a if ".tmp" in name]     # no temporary files left behind


def test_worker_processes_draw_the_same_world(tmp_path, monkeypatch):
    import pipeline.synth.world as synth

    cfg = SynthConfig(seed=5, num_images=24, num_val_images=8, min_side=64, max_side=96)
    generate_world(cfg, tmp_path / "here", progress=False)              # below PARALLEL_FROM: this process
    monkeypatch.setattr(synth, "PARALLEL_FROM", 1)
    monkeypatch.setattr(synth.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    generate_world(cfg, tmp_path / "pool", progress=False)              # two spawned workers
    assert _all_files(tmp_path / "here") == _all_files(tmp_path / "pool")


def test_categories_and_fixed_split(world):
    assert len(CATEGORIES) >= 24 and len(set(CATEGORIES)) == len(CATEGORIES)
    assert all(re.fullmatch(r"[a-z]+", name) for name in CATEGORIES)
    base, novel = split_categories(6)
    assert novel == ["umbrella", "cup", "clock", "key", "mushroom", "boat"]
    assert len(base) == len(CATEGORIES) - 6 and not set(base) & set(novel)
    records = _load(world, "categories.json")
    assert [r["id"] for r in records] == list(range(1, len(CATEGORIES) + 1))
    assert [r["name"] for r in records] == list(CATEGORIES)
    assert {r["name"] for r in records if r["split"] == "novel"} == set(novel)
    # The split does not depend on the seed, and fewer novel categories are a prefix of more.
    assert set(split_categories(3)[1]) < set(novel)
    with pytest.raises(ValueError, match="num_novel"):
        split_categories(len(CATEGORIES))


def test_train_boxes_only_base_and_val_boxes_all(world, corpus_scenes):
    train, val = _load(world, "instances_train.json"), _load(world, "instances_val.json")
    split_of = {c["id"]: c["split"] for c in train["categories"]}
    assert {split_of[a["category_id"]] for a in train["annotations"]} == {"base"}
    assert {a["category_id"] for a in val["annotations"]} == set(range(1, len(CATEGORIES) + 1))
    assert len(train["images"]) == WORLD.num_images and len(val["images"]) == WORLD.num_val_images

    # Novel objects are in the corpus pictures (and captions), just never boxed.
    scenes = corpus_scenes
    _, novel = split_categories(WORLD.num_novel)
    in_pictures = [o for s in scenes for o in s.objects]
    novel_in_pictures = [o for o in in_pictures if o.name in novel]
    assert len(novel_in_pictures) > 10
    assert len(train["annotations"]) == len(in_pictures) - len(novel_in_pictures)
    assert any(name in s.caption for s in scenes for name in novel)


def test_coco_records_are_complete(world):
    val = _load(world, "instances_val.json")
    for image in val["images"]:
        assert image["file_name"].startswith("val_images/")
        with Image.open(world / image["file_name"]) as picture:
            assert picture.size == (image["width"], image["height"])
    ids = [a["id"] for a in val["annotations"]]
    assert len(set(ids)) == len(ids)
    for ann in val["annotations"]:
        assert ann["iscrowd"] == 0
        assert 0 < ann["area"] <= ann["bbox"][2] * ann["bbox"][3]


def test_boxes_lie_inside_images_and_cover_the_drawn_objects(world):
    val = _load(world, "instances_val.json")
    images = {im["id"]: im for im in val["images"]}
    for ann in val["annotations"]:
        x, y, w, h = ann["bbox"]
        image = images[ann["image_id"]]
        assert x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"]

    inside_means, outside_means, outside_peaks, edge_peaks = [], [], [], []
    for index, image in enumerate(val["images"][:30]):
        written = np.asarray(Image.open(world / image["file_name"]).convert("RGB"), dtype=np.float32)
        background = np.asarray(render_scene(WORLD, "val", index).background, dtype=np.float32)
        change = np.abs(written - background).mean(axis=2)
        in_box = np.zeros(change.shape, bool)
        near_box = np.zeros(change.shape, bool)      # boxes grown by 2 px: JPEG ringing lives there
        for ann in (a for a in val["annotations"] if a["image_id"] == image["id"]):
            x, y, w, h = ann["bbox"]
            in_box[y:y + h, x:x + w] = True
            near_box[max(0, y - 2):y + h + 2, max(0, x - 2):x + w + 2] = True
            box_change = change[y:y + h, x:x + w]
            inside_means.append(box_change.mean())
            edge_peaks += [box_change[0].max(), box_change[-1].max(), box_change[:, 0].max(),
                           box_change[:, -1].max()]
        outside_means.append(change[~in_box].mean())
        outside_peaks.append(np.percentile(change[~near_box], 99.9))
    # Outside the boxes only JPEG noise changes the background: no object pixel lies outside a box.
    assert max(outside_means) < 5 and max(outside_peaks) < 30
    assert np.median(inside_means) > 10 * np.median(outside_means)
    assert min(inside_means) > 15
    # Tight boxes: the box edges touch the object (a few low-contrast objects blend into the clutter).
    edge_peaks = np.array(edge_peaks)
    assert np.mean(edge_peaks > 12) > 0.95 and np.median(edge_peaks) > 30


def test_object_counts_and_sizes_vary(world):
    val = _load(world, "instances_val.json")
    per_image = {im["id"]: 0 for im in val["images"]}
    for ann in val["annotations"]:
        per_image[ann["image_id"]] += 1
    assert set(per_image.values()) == set(range(1, WORLD.max_objects + 1))

    sizes = {(im["width"], im["height"]) for im in val["images"]}
    assert len(sizes) > 50
    assert all(WORLD.min_side <= side <= WORLD.max_side for size in sizes for side in size)
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)

    boxes = np.array([a["bbox"] for a in val["annotations"]], dtype=float)
    long_sides, short_sides = boxes[:, 2:].max(axis=1), boxes[:, 2:].min(axis=1)
    assert long_sides.min() >= 24 and short_sides.min() >= 16
    assert np.percentile(long_sides, 90) > 2 * np.percentile(long_sides, 10)


def test_captions_name_a_present_object(world, corpus_scenes):
    from spacy import lookups

    # the concept extractor's lemmatizer (spacy-lookups-data, a dependency): a plural we write must
    # map back to the category
    lemma = lookups.load_lookups("en", ["lemma_lookup"]).get_table("lemma_lookup")
    for name in CATEGORIES:
        assert lemma.get(PLURALS[name], PLURALS[name]) == name

    lines = (world / "captions.tsv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "caption\turl"
    rows = [line.split("\t") for line in lines[1:]]
    assert len(rows) == WORLD.num_images
    for index, (caption, url) in enumerate(rows):
        assert url == f"images/{index:06d}.jpg" and (world / url).is_file()
        present = {o.name for o in corpus_scenes[index].objects}
        words = {lemma.get(w, w) for w in re.findall(r"[a-z]+", caption.lower())}
        assert present & words, (caption, present)
        assert words & set(CATEGORIES) <= present, (caption, present)   # never names an absent one

    text = " ".join(caption for caption, _ in rows).lower()
    assert any(re.search(rf"\b(two|three|four|2|3|4) (\w+ )*{PLURALS[n]}\b", text) for n in CATEGORIES)
    assert sum(w in text for w in ("photo", "illustration", "background", "view", "stock")) >= 3
    assert len(CAPTION_TEMPLATES) >= 15
    assert len({caption for caption, _ in rows}) == len(rows)


def test_existing_world_is_reused_and_a_new_config_regenerates(tmp_path):
    small = SynthConfig(seed=5, num_images=6, num_val_images=2)
    first = generate_world(small, tmp_path, progress=False)
    assert first["counts"]["images"] == 6 and first["config"] == small.model_dump(mode="json")
    assert json.loads((tmp_path / "world.json").read_text()) == first
    image = tmp_path / "images" / "000000.jpg"
    image.write_bytes(b"not regenerated")
    assert generate_world(small, tmp_path, progress=False) == first
    assert image.read_bytes() == b"not regenerated"

    # A smaller world in the same folder: rewritten, and the surplus images removed.
    smaller = small.model_copy(update={"num_images": 3})
    assert generate_world(smaller, tmp_path, progress=False)["counts"]["images"] == 3
    assert image.read_bytes()[:2] == b"\xff\xd8"
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "000000.jpg", "000001.jpg", "000002.jpg"]


def test_categories_are_distinct_at_low_resolution():
    # A nearest-centroid classifier on 16x16 thumbnails tells the categories apart, so a tiny CNN can.
    rng = np.random.default_rng(0)

    def thumbnail(name):
        picture = draw_object(name, (48, 48), rng, angle=float(rng.uniform(-15, 15)))
        canvas = Image.new("RGBA", picture.size, (128, 128, 128, 255))
        canvas.alpha_composite(picture)
        return np.asarray(canvas.convert("RGB").resize((16, 16), Image.BILINEAR), np.float32).ravel()

    centroids = np.stack([np.mean([thumbnail(n) for _ in range(6)], axis=0) for n in CATEGORIES])
    correct = sum(int(np.argmin(((centroids - thumbnail(n)) ** 2).sum(axis=1)) == k)
                  for k, n in enumerate(CATEGORIES) for _ in range(4))
    assert correct / (4 * len(CATEGORIES)) > 0.9


def test_contact_sheet(world, tmp_path):
    out = write_contact_sheet(world, tmp_path / "sheet.png", n=9, cell=100)
    with Image.open(out) as sheet:
        assert sheet.size == (300, 300)
        colours = np.asarray(sheet.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(colours, axis=0)) > 500         # pictures, not an empty grid


def test_bad_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="min_side"):
        generate_world(SynthConfig(min_side=300, max_side=200), tmp_path, progress=False)
    with pytest.raises(ValueError, match="num_novel"):
        generate_world(SynthConfig(num_novel=30), tmp_path, progress=False)
