"""Mask metrics against independent computations: pairwise IoU by pixel loops + scipy's Hungarian solver on a cost
matrix, and DiffSeg's confusion-histogram formulation for label maps."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from services.evaluator.masks import score_mask_set, score_masks


def reference(pred: list[np.ndarray], gt: list[np.ndarray]):
    """Per-GT (iou, recall, precision) and {gt: pred} written straight from the proto's definitions."""
    n_g, n_p = len(gt), len(pred)
    iou = np.zeros((n_g, n_p))
    for g in range(n_g):
        for p in range(n_p):
            union = np.logical_or(gt[g], pred[p]).sum()
            iou[g, p] = np.logical_and(gt[g], pred[p]).sum() / union if union else 0.0
    pairs = {}
    if n_p:
        rows, cols = linear_sum_assignment(-iou)  # minimise the negated IoU
        pairs = {g: p for g, p in zip(rows, cols, strict=True) if np.logical_and(gt[g], pred[p]).any()}
    out = np.zeros((n_g, 3))
    for g, p in pairs.items():
        tp = np.logical_and(pred[p], gt[g]).sum()
        fp = np.logical_and(pred[p], ~gt[g]).sum()
        fn = np.logical_and(gt[g], ~pred[p]).sum()
        out[g] = tp / (tp + fp + fn), tp / (tp + fn), tp / (tp + fp)
    return out, pairs


def blob(shape, rng, max_side=12) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    h, w = rng.integers(2, max_side, size=2)
    y, x = rng.integers(0, shape[0] - h), rng.integers(0, shape[1] - w)
    m[y : y + h, x : x + w] = True
    return m


def check(pred, gt):
    got = score_masks(pred, gt)
    want, pairs = reference(pred, gt)
    np.testing.assert_allclose(got.iou, want[:, 0], atol=1e-12)
    np.testing.assert_allclose(got.recall, want[:, 1], atol=1e-12)
    np.testing.assert_allclose(got.precision, want[:, 2], atol=1e-12)
    assert {m.ground_truth_index: m.predicted_index for m in got.matches} == pairs
    assert got.miou == pytest.approx(want[:, 0].mean())
    return got


@pytest.mark.parametrize("n_pred,n_gt", [(3, 3), (6, 2), (2, 5), (1, 1), (8, 4)])
def test_random_overlapping_masks_match_reference(n_pred, n_gt):
    rng = np.random.default_rng(n_pred * 10 + n_gt)
    for _ in range(5):
        gt = [blob((32, 40), rng) for _ in range(n_gt)]
        pred = [blob((32, 40), rng) for _ in range(n_pred)]
        check(pred, gt)


def test_more_predictions_than_ground_truth_extra_ones_cost_nothing():
    rng = np.random.default_rng(1)
    gt = [blob((24, 24), rng) for _ in range(2)]
    pred = [g.copy() for g in gt] + [blob((24, 24), rng) for _ in range(4)]
    got = check(pred, gt)
    assert got.miou == got.mean_recall == got.mean_precision == 1.0
    assert sorted(m.predicted_index for m in got.matches) == [0, 1]


def test_empty_predicted_masks_and_zero_predictions_score_zero():
    rng = np.random.default_rng(2)
    gt = [blob((20, 20), rng) for _ in range(3)]
    empty = [np.zeros((20, 20), bool) for _ in range(3)]
    got = check(empty, gt)
    assert got.miou == 0.0 and got.matches == []
    got = check([], gt)
    assert (got.miou, got.mean_recall, got.mean_precision) == (0.0, 0.0, 0.0)


def test_no_overlap_leaves_everything_unmatched():
    gt = [np.zeros((16, 16), bool)]
    gt[0][:4, :4] = True
    pred = [np.zeros((16, 16), bool)]
    pred[0][10:, 10:] = True
    got = check(pred, gt)
    assert got.matches == [] and got.miou == 0.0


def test_partial_overlap_known_values():
    g = np.zeros((10, 10), bool)
    g[:, :4] = True  # 40 px
    p = np.zeros((10, 10), bool)
    p[:, 2:8] = True  # 60 px, 20 shared
    got = score_masks([p], [g])
    assert got.iou[0] == pytest.approx(20 / 80)
    assert got.recall[0] == pytest.approx(20 / 40)
    assert got.precision[0] == pytest.approx(20 / 60)


def test_empty_ground_truth_is_left_out_of_the_means():
    g = np.zeros((10, 10), bool)
    g[:5] = True
    got = score_masks([g], [g, np.zeros((10, 10), bool)])
    assert np.isnan(got.iou[1]) and got.miou == 1.0


def test_intersection_objective_equals_diffseg_confusion_histogram_on_label_maps():
    rng = np.random.default_rng(3)
    for _ in range(5):
        gt_labels = rng.integers(0, 4, size=(6, 8)).repeat(4, 0).repeat(4, 1)  # blocky partitions
        pred_labels = rng.integers(0, 6, size=(12, 16)).repeat(2, 0).repeat(2, 1)
        gt_ids, pred_ids = np.unique(gt_labels), np.unique(pred_labels)
        hist = np.zeros((len(gt_ids), len(pred_ids)))
        for i, a in enumerate(gt_ids):
            for j, b in enumerate(pred_ids):
                hist[i, j] = np.sum((gt_labels == a) & (pred_labels == b))
        rows, cols = linear_sum_assignment(hist, maximize=True)
        tp = np.zeros(len(gt_ids))
        fp = np.zeros(len(gt_ids))
        fn = hist.sum(1).copy()
        for r, c in zip(rows, cols, strict=True):
            if hist[r, c] > 0:
                tp[r], fp[r], fn[r] = hist[r, c], hist[:, c].sum() - hist[r, c], hist[r].sum() - hist[r, c]
        got = score_masks([pred_labels == b for b in pred_ids], [gt_labels == a for a in gt_ids], objective="intersection")
        np.testing.assert_allclose(got.iou, tp / (tp + fp + fn))
        np.testing.assert_allclose(got.recall, tp / (tp + fn))


def test_set_scores_pool_every_ground_truth_mask():
    rng = np.random.default_rng(4)
    images = []
    per_gt = []
    for n_gt in (1, 3, 2):
        gt = [blob((20, 20), rng) for _ in range(n_gt)]
        pred = [blob((20, 20), rng) for _ in range(3)]
        images.append(score_masks(pred, gt))
        per_gt.append(reference(pred, gt)[0])
    want = np.concatenate(per_gt).mean(axis=0)
    np.testing.assert_allclose(score_mask_set(images), want)
