"""Hostile manifest values (round three): a key written twice is refused (YAML would silently keep the
last), aliases that expand without end are refused before validation, and every number is checked
(no nan or inf, nothing negative, nothing beyond 2**53, seeds within numpy's range, anchors positive,
workers and CPUs bounded); each error names the field."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import MAX_SEED, ManifestError, load_manifest

REPO = Path(__file__).resolve().parents[1]


def manifest(tmp_path, text: str, overrides=()):
    path = tmp_path / "m.yaml"
    path.write_text("name: t\noutput_dir: out\n" + text)
    return load_manifest(path, list(overrides))


@pytest.mark.parametrize("text,named", [
    ("shard: {max_side: 640}\npretrain: {steps: 5}\nshard: {min_side: 4}\n", "shard is written twice (lines 3 and 5)"),
    ("shard:\n  max_side: 640\n  max_side: 320\n", "shard.max_side is written twice (lines 4 and 5)"),
    ("name: u\n", "name is written twice (lines 1 and 3)"),
    ("transfer: {init: [pretrain], init: [teacher]}\n", "transfer.init is written twice"),
    ("evaluate: {detectors: {a: x.pt, a: y.pt}}\n", "evaluate.detectors.a is written twice"),
])
def test_a_key_written_twice_is_refused_naming_it(tmp_path, text, named):
    with pytest.raises(ManifestError, match=named.replace("(", r"\(").replace(")", r"\)")):
        manifest(tmp_path, text)


def test_a_key_written_twice_in_an_override_is_refused(tmp_path):
    with pytest.raises(ManifestError, match="override 'shard={max_side: 1, max_side: 2}': max_side is written twice"):
        manifest(tmp_path, "", ["shard={max_side: 1, max_side: 2}"])


def test_yaml_merge_keys_may_override_what_they_merge(tmp_path):
    m = manifest(tmp_path, "pretrain: &p {steps: 5, lr: 0.01}\ntransfer: {<<: *p, lr: 0.03}\n")
    assert (m.transfer.steps, m.transfer.lr) == (5, 0.03)


def test_aliases_that_expand_without_end_are_refused_at_once(tmp_path):
    levels = ["a: &a [l, l, l, l, l, l, l, l, l]"]
    for i, name in enumerate("bcdefghi"):
        previous = "abcdefghi"[i]
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    for text, message in (("\n".join(levels) + "\nconcepts: {stopwords: *i}\n", "once its aliases"),
                          ("concepts: {stopwords: &s [*s]}\n", "holds itself through an alias")):
        path = tmp_path / "m.yaml"
        path.write_text("name: t\noutput_dir: out\n" + text)
        # in a process of its own: validating 387 million values would not stop at a signal
        loaded = subprocess.run([sys.executable, "-c", "import sys; from pipeline.config import load_manifest; "
                                 "load_manifest(sys.argv[1])", str(path)], cwd=REPO, capture_output=True,
                                text=True, timeout=60)
        assert loaded.returncode == 1 and f"ManifestError: {path}: " in loaded.stderr and message in loaded.stderr


@pytest.mark.parametrize("override,field", [
    ("seed=18446744073709551616", "seed"),                       # 2**64: "Overflow when unpacking long long"
    (f"pretrain.seed={MAX_SEED + 1}", "pretrain.seed"),
    ("transfer.seed=-1", "transfer.seed"),
    ("synth.seed=18446744073709551616", "synth.seed"),
    ("train_rpn.anchor_sizes=[32, 0, 128]", "train_rpn.anchor_sizes.1"),
    ("train_rpn.anchor_sizes=[-16]", "train_rpn.anchor_sizes.0"),
    ("pretrain.loss_region_concept=.nan", "pretrain.loss_region_concept"),
    ("pretrain.momentum=.inf", "pretrain.momentum"),
    ("transfer.momentum=1.5", "transfer.momentum"),
    ("pretrain.loss_distill=-1", "pretrain.loss_distill"),
    ("pretrain.grad_clip=0", "pretrain.grad_clip"),
    ("evaluate.score_threshold=-0.5", "evaluate.score_threshold"),
    ("evaluate.detections_per_image=0", "evaluate.detections_per_image"),
    ("transfer.max_size=0", "transfer.max_size"),
    ("transfer.min_sizes=[]", "transfer.min_sizes"),
    ("transfer.focal_gamma=-2", "transfer.focal_gamma"),
    ("pretrain.lr_steps=[100, -5]", "pretrain.lr_steps"),
    ("pretrain.num_workers=5000", "pretrain.num_workers"),
    ("transfer.num_workers=5000", "transfer.num_workers"),
    ("train_teacher.num_workers=5000", "train_teacher.num_workers"),
    ("ray.num_cpus=100000", "ray.num_cpus"),
    ("label.num_actors=100000", "label.num_actors"),
    ("proposals.cpus_per_actor=100000", "proposals.cpus_per_actor"),
    ("label.num_gpus_per_actor=1000", "label.num_gpus_per_actor"),
    ("shard.samples_per_shard=100000000000000000000", "shard.samples_per_shard"),
    ("corpus.max_rows=100000000000000000000000", "corpus.max_rows"),
])
def test_every_number_is_checked_and_the_error_names_the_field(tmp_path, override, field):
    with pytest.raises(ManifestError) as err:
        manifest(tmp_path, "", [override])
    assert f"\n  {field}: " in str(err.value), str(err.value)


def test_numbers_in_range_still_load(tmp_path):
    m = manifest(tmp_path, "", ["seed=4294967295", "train_rpn.anchor_sizes=[16, 32, 64]", "pretrain.num_workers=8",
                                "ray.num_cpus=64", "pretrain.momentum=0", "evaluate.score_threshold=1"])
    assert (m.seed, m.train_rpn.anchor_sizes, m.pretrain.num_workers) == (MAX_SEED, [16, 32, 64], 8)
