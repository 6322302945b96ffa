"""The synthetic open-vocabulary world: images, CC3M-style captions and COCO boxes, made offline.

The project has no downloadable data or weights, so this generator makes a small world in which every
stage, and the paper's central claim, can be run on a CPU: a caption corpus whose captions teach all
categories, a detection train set with boxes of the *base* categories only, and a held-out set with
every category boxed.

Categories (24, ids 1..24 in this order; each is a shape x dominant colour x pattern):
    apple banana kite star heart umbrella cup tree house car fish ball clock bottle key flower
    mushroom boat bell hat cloud book carrot sun
Base/novel split: the first `num_novel` names of NOVEL_ORDER are novel; the order does not depend on
the seed. With the default `num_novel: 6` the novel categories are
    umbrella cup mushroom clock boat key
and the other 18 are base. Novel categories appear in the corpus images and captions (captions are
how an open-vocabulary model learns them) but never have boxes in `instances_train.json`.

The world folder's files are listed in pipeline/synth/world.py.

Images are min_side..max_side px on each side (landscape, portrait, square) with 1..max_objects
mostly non-overlapping objects (every box at least 24 px on its long side and 16 px on its short side)
over a cluttered background. Corpus images holding only novel objects stay in `instances_train.json`
with no annotations. Held-out images have no captions.

Every image is drawn from its own random generator seeded by (seed, split, index), so a world is
byte-identical for the same seed, a small world is a prefix of a larger one with the same seed, and
`render_scene(cfg, split, index)` re-creates any single image (with its objects, caption and clean
background) in memory.

Modules: `shapes` (the drawing of each category), `scene` (an image: background, placed objects),
`captions` (a caption naming the objects), `world` (the category split, writing the world folder,
its marker, a contact sheet).
"""
from pipeline.synth.captions import CAPTION_TEMPLATES, CATEGORY_ADJECTIVES, PLURALS, make_caption
from pipeline.synth.scene import Scene, SceneObject, render_scene
from pipeline.synth.shapes import CATEGORIES, CATEGORY_ASPECT, draw_object
from pipeline.synth.world import (GENERATOR_VERSION, NOVEL_ORDER, category_records, generate_world,
                                  split_categories, write_contact_sheet)

__all__ = ["CAPTION_TEMPLATES", "CATEGORIES", "CATEGORY_ADJECTIVES", "CATEGORY_ASPECT", "GENERATOR_VERSION",
           "NOVEL_ORDER", "PLURALS", "Scene", "SceneObject", "category_records", "draw_object",
           "generate_world", "make_caption", "render_scene", "split_categories", "write_contact_sheet"]
