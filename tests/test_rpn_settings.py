"""Each RPN purpose proposes with its own settings (stages.resolve.rpn_inference), and the shipped
manifests give each the reference's: pretraining's FPN RPN 1000 per level before NMS 0.5 and 300
after; COCO transfer's C4 RPN 6000 before NMS 0.7 and 1000 after; zero-shot 1000 per level, NMS 0.9."""
from __future__ import annotations

import pytest

from pipeline.config import ManifestError, load_manifest
from stages.resolve import rpn_inference
from tests.conftest import REPO

PRETRAINING = {"pre_nms_top_n": 1000, "post_nms_top_n": 300, "nms_thresh": 0.5}
ZERO_SHOT = {"pre_nms_top_n": 1000, "post_nms_top_n": 1000, "nms_thresh": 0.9}
PAPER = {   # manifest -> purpose -> settings (transfer: its training images; the test-time ones are the same)
    "cc3m-rn50": {"proposals": PRETRAINING, "zero_shot": ZERO_SHOT,
                  "transfer": {"pre_nms_top_n": 6000, "post_nms_top_n": 1000, "nms_thresh": 0.7}},
    "coco-ovd": {"proposals": PRETRAINING, "zero_shot": ZERO_SHOT,
                 "transfer": {"pre_nms_top_n": 6000, "post_nms_top_n": 1000, "nms_thresh": 0.7}},
    "lvis": {"proposals": PRETRAINING, "zero_shot": ZERO_SHOT,      # LVIS transfer's RPN is an FPN one
             "transfer": {"pre_nms_top_n": 1000, "post_nms_top_n": 1000, "nms_thresh": 0.7}},
}


def settings(manifest, purpose: str, training: bool = False) -> dict:
    s = rpn_inference(manifest, purpose, training=training)
    return {k: s[k] for k in ("pre_nms_top_n", "post_nms_top_n", "nms_thresh")}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_manifests_give_each_rpn_purpose_the_reference_settings(name):
    manifest = load_manifest(REPO / "manifests" / f"{name}.yaml")
    for purpose, expected in PAPER[name].items():
        assert settings(manifest, purpose) == expected, purpose
        assert (rpn_inference(manifest, purpose)["min_size"], rpn_inference(manifest, purpose)["max_size"]) \
            == (800, 1333)
    assert settings(manifest, "transfer", training=True) == PAPER[name]["transfer"]


@pytest.mark.parametrize("name", ["demo", "demo-small"])
def test_demo_manifests_keep_one_pre_nms_setting_for_every_purpose(name):
    """The demos set no per-purpose pre-NMS count: every RPN keeps proposals.pre_nms_top_n, as before
    the settings were split, with the demos' own NMS and top-n after NMS."""
    manifest = load_manifest(REPO / "manifests" / f"{name}.yaml")
    pre = manifest.proposals.pre_nms_top_n
    assert manifest.transfer.rpn_pre_nms_top_n is None and manifest.evaluate.zero_shot_rpn_pre_nms_top_n is None
    assert settings(manifest, "proposals") == {
        "pre_nms_top_n": pre, "post_nms_top_n": manifest.proposals.post_nms_top_n, "nms_thresh": 0.5}
    assert settings(manifest, "transfer", training=True) == {
        "pre_nms_top_n": pre, "post_nms_top_n": manifest.transfer.proposals_per_image, "nms_thresh": 0.7}
    assert settings(manifest, "transfer") == {
        "pre_nms_top_n": pre, "post_nms_top_n": manifest.evaluate.proposals_per_image, "nms_thresh": 0.7}
    assert settings(manifest, "zero_shot") == {
        "pre_nms_top_n": pre, "post_nms_top_n": manifest.evaluate.proposals_per_image, "nms_thresh": 0.9}


def test_each_purpose_takes_its_own_setting_and_a_bad_one_names_its_field(write_manifest):
    m = write_manifest("""
        proposals: {pre_nms_top_n: 500, min_size: 400, max_size: 600}
        transfer: {rpn_pre_nms_top_n: 6000, proposals_per_image: 900, rpn_nms_thresh: 0.6}
        evaluate: {zero_shot_rpn_pre_nms_top_n: 2000, proposals_per_image: 700, rpn_nms_thresh: 0.65}
    """)
    assert rpn_inference(m, "proposals") == {"min_size": 400, "max_size": 600, "pre_nms_top_n": 500,
                                             "post_nms_top_n": 300, "nms_thresh": 0.5}
    assert settings(m, "transfer", training=True) == {"pre_nms_top_n": 6000, "post_nms_top_n": 900, "nms_thresh": 0.6}
    assert settings(m, "transfer") == {"pre_nms_top_n": 6000, "post_nms_top_n": 700, "nms_thresh": 0.65}
    assert settings(m, "zero_shot") == {"pre_nms_top_n": 2000, "post_nms_top_n": 700, "nms_thresh": 0.9}
    with pytest.raises(ValueError, match="only the transfer RPN"):
        rpn_inference(m, "zero_shot", training=True)
    with pytest.raises(ManifestError, match=r"transfer\.rpn_pre_nms_top_n: .*greater than or equal to 1"):
        write_manifest("transfer: {rpn_pre_nms_top_n: 0}\n", name="bad")
    with pytest.raises(ManifestError, match=r"evaluate\.zero_shot_rpn_pre_nms_top_n: .*valid integer"):
        write_manifest("evaluate: {zero_shot_rpn_pre_nms_top_n: many}\n", name="bad2")
