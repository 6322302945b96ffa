"""The three pretraining losses against values computed by hand (numpy, written out term by term)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.losses import (concept_logits, distillation_loss, gather_with_grad, image_caption_loss,
                            keep_mask, region_concept_loss)

T = 0.01


def test_concept_logits_are_cosines_over_temperature():
    v = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    lc = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    got = concept_logits(v, lc, T).numpy()
    # cos([3,4],[1,0]) = 0.6, cos([3,4],[0,1]) = 0.8, cos([3,4],[1,1]) = 7/(5*sqrt2)
    expected = np.array([[0.6, 0.8, 7 / (5 * math.sqrt(2))], [1.0, 0.0, 1 / math.sqrt(2)]]) / T
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_region_concept_three_regions_four_concepts():
    # s[i, c] = student logit of region i for concept c (already cos/T); pseudo labels y = [0, 0, 2].
    s = np.array([[1.0, 0.5, -0.2, 0.3],
                  [0.2, 0.1, 0.4, -1.0],
                  [-0.5, 0.7, 1.5, 0.0]])
    y = [0, 0, 2]
    # Row i sees columns j = 0, 1, 2 with logits s[i, y_j] = (s[i,0], s[i,0], s[i,2]); positives M_ij = [y_i == y_j].
    def row(i):
        cols = np.array([s[i, 0], s[i, 0], s[i, 2]])
        soft = np.exp(cols) / np.exp(cols).sum()
        pos = np.array([y[i] == yj for yj in y], float)
        return -math.log((pos * soft).sum())
    # region 0: -log(2e^1 / (2e^1 + e^-0.2)); region 2: -log(e^1.5 / (2e^-0.5 + e^1.5))
    assert row(0) == pytest.approx(-math.log(2 * math.e / (2 * math.e + math.exp(-0.2))))
    assert row(2) == pytest.approx(-math.log(math.exp(1.5) / (2 * math.exp(-0.5) + math.exp(1.5))))
    expected = (row(0) + row(1) + row(2)) / 3
    got = region_concept_loss(torch.tensor(s), torch.tensor(y))
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_region_concept_keeps_confident_regions_only():
    s = np.array([[1.0, 0.5, -0.2, 0.3],
                  [0.2, 0.1, 0.4, -1.0],
                  [-0.5, 0.7, 1.5, 0.0]])
    y = torch.tensor([0, 1, 2])
    probs = torch.tensor([0.05, 0.5, 0.2])  # region 0 is below 0.1: dropped
    keep = keep_mask(probs, 0.1)
    assert keep.tolist() == [False, True, True]
    # kept regions 1 (y=1) and 2 (y=2): row 1 -> -log softmax([0.1, 0.4])[0], row 2 -> -log softmax([0.7, 1.5])[1]
    r1 = -math.log(math.exp(0.1) / (math.exp(0.1) + math.exp(0.4)))
    r2 = -math.log(math.exp(1.5) / (math.exp(0.7) + math.exp(1.5)))
    got = region_concept_loss(torch.tensor(s), y, keep)
    assert float(got) == pytest.approx((r1 + r2) / 2, rel=1e-6)
    # none passes: all are kept
    assert keep_mask(torch.tensor([0.01, 0.02]), 0.1).tolist() == [True, True]


def test_distillation_kl_teacher_to_student():
    st = np.array([[1.0, 0.0, -1.0, 0.5], [0.3, 0.3, 0.3, 0.3], [2.0, -2.0, 0.0, 1.0]])
    te = np.array([[2.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, -1.0], [0.5, 0.5, 3.0, 0.0]])
    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()
    kl = []
    for i in range(3):
        p, q = softmax(te[i]), softmax(st[i])
        kl.append(sum(p[c] * (math.log(p[c]) - math.log(q[c])) for c in range(4)))
    got = distillation_loss(torch.tensor(st), torch.tensor(te))
    assert float(got) == pytest.approx(np.mean(kl), rel=1e-6)
    # equal distributions: zero
    assert float(distillation_loss(torch.tensor(te), torch.tensor(te))) == pytest.approx(0.0, abs=1e-7)


def test_distillation_is_over_kept_regions_only():
    # Three regions, three concepts. Teacher logits are log-probabilities, so p_t is read off directly;
    # student logits (0, 0, 0) give q = (1/3, 1/3, 1/3) and (ln 2, 0, 0) give q = (1/2, 1/4, 1/4).
    #   region 0: p = (0.8, 0.1, 0.1),  q uniform:      KL = 0.8 ln 2.4 + 0.2 ln 0.3        = 0.4595804
    #   region 1: p = (1/2, 1/4, 1/4),  q uniform:      KL = 1/2 ln 1.5 + 1/2 ln 0.75 = 1/2 ln 1.125 = 0.0588915
    #   region 2: p uniform,            q = (1/2, 1/4, 1/4): KL = 1/3 (ln 2/3 + 2 ln 4/3) = 1/3 ln 32/27 = 0.0566330
    # Teacher max probabilities 0.8, 0.5, 1/3: at threshold 0.4 regions 0 and 1 are kept, so the loss
    # is (0.4595804 + 0.0588915) / 2 = 0.2592360 (the mean over all three would be 0.1917017).
    te = torch.log(torch.tensor([[0.8, 0.1, 0.1], [0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]))
    st = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0]])
    keep = keep_mask(te.softmax(-1).max(-1).values, 0.4)
    assert keep.tolist() == [True, True, False]
    assert float(distillation_loss(st, te, keep)) == pytest.approx(0.2592360, abs=1e-6)
    # without a mask every region counts
    assert float(distillation_loss(st, te)) == pytest.approx(0.1917017, abs=1e-6)


def test_image_caption_symmetric_contrastive():
    img = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 2.0]])
    cap = np.array([[0.8, 0.6], [0.0, 1.0], [-1.0, 1.0]])
    ni = img / np.linalg.norm(img, axis=1, keepdims=True)
    nc = cap / np.linalg.norm(cap, axis=1, keepdims=True)
    logits = np.array([[ni[i] @ nc[j] / T for j in range(3)] for i in range(3)])
    def ce_rows(m):
        return np.mean([-(m[i, i] - (m[i].max() + math.log(np.exp(m[i] - m[i].max()).sum())))
                        for i in range(3)])
    expected = 0.5 * (ce_rows(logits) + ce_rows(logits.T))
    got = image_caption_loss(torch.tensor(img), torch.tensor(cap), T)
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_gather_without_distributed_is_identity():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x


def test_losses_are_float32_under_half_inputs():
    s = torch.randn(5, 7).to(torch.bfloat16)
    assert distillation_loss(s, s.float()).dtype == torch.float32
    assert region_concept_loss(s, torch.tensor([0, 1, 0, 2, 2])).dtype == torch.float32
