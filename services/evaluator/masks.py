"""Mask metrics: mIoU, recall and precision of predicted masks against ground truth after Hungarian matching.

Each mask is a binary pixel set and is scored as such: masks are never collapsed into one label map, so
overlapping masks (which the localizer's per-concept masks may be) each keep all their pixels, and a pixel
covered by two predictions can count for both.

Matching (the evaluator proto; docs/method.md#evaluation): ground-truth and predicted masks are paired one-to-one by
`scipy.optimize.linear_sum_assignment`, maximising the total IoU (`objective="iou"`, the service's choice) or the
total intersection (`objective="intersection"`, DiffSeg's confusion-histogram variant). A pair that does not
overlap at all is not a match. For a ground-truth mask g matched to p: TP = |p ∩ g|, FP = |p \\ g|,
FN = |g \\ p|, and IoU = TP / (TP + FP + FN), recall = TP / (TP + FN), precision = TP / (TP + FP); an unmatched g
scores 0 on all three. Predictions beyond the ground truth stay unmatched and cost nothing (they are not in any
ground-truth mean). An empty ground-truth mask has undefined scores (NaN) and is left out of the means (nanmean).

Image-level scores are means over that image's ground-truth masks; set-level scores (`score_mask_set`) are
means over every ground-truth mask of the set, so each object counts once whatever image it is in.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

OBJECTIVES = ("iou", "intersection")


@dataclass(frozen=True)
class MaskMatch:
    predicted_index: int
    ground_truth_index: int
    iou: float


@dataclass
class MaskScores:
    iou: np.ndarray  # [G] per ground-truth mask (NaN for an empty one)
    recall: np.ndarray  # [G]
    precision: np.ndarray  # [G]
    matches: list[MaskMatch]  # by ground-truth index

    @property
    def miou(self) -> float:
        return _nanmean(self.iou)

    @property
    def mean_recall(self) -> float:
        return _nanmean(self.recall)

    @property
    def mean_precision(self) -> float:
        return _nanmean(self.precision)


def _nanmean(values: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN -> NaN, on purpose
        return float(np.nanmean(values)) if values.size else float("nan")


def _stack(masks: Sequence[np.ndarray] | np.ndarray, shape: tuple[int, int] | None) -> np.ndarray:
    if len(masks) == 0:
        return np.zeros((0, *(shape or (0, 0))), dtype=bool)
    return np.stack([np.asarray(m, dtype=bool) for m in masks])


def intersections(predicted: np.ndarray, ground_truth: np.ndarray) -> np.ndarray:
    """|p ∩ g| for every pair: [P, G] int64, by one matrix product over flattened masks."""
    pixels = int(np.prod(ground_truth.shape[1:]))
    p = predicted.reshape(len(predicted), pixels)
    g = ground_truth.reshape(len(ground_truth), pixels)
    # float32 sums of 0/1 products are exact integers below 2**24 pixels; beyond, use float64
    dtype = np.float32 if p.shape[1] < 2**24 else np.float64
    return np.rint(p.astype(dtype) @ g.astype(dtype).T).astype(np.int64)


def score_masks(
    predicted: Sequence[np.ndarray] | np.ndarray,
    ground_truth: Sequence[np.ndarray] | np.ndarray,
    objective: str = "iou",
) -> MaskScores:
    """Match and score predicted bool masks [H, W] against ground-truth ones of the same size."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} not in {OBJECTIVES}")
    gt = _stack(ground_truth, None)
    pred = _stack(predicted, gt.shape[1:])
    if pred.shape[1:] != gt.shape[1:]:
        raise ValueError(f"predicted masks {pred.shape[1:]} and ground truth {gt.shape[1:]} differ in size")
    n_gt = len(gt)
    gt_area = gt.sum(axis=(1, 2))
    pred_area = pred.sum(axis=(1, 2))
    inter = intersections(pred, gt).T  # [G, P]
    union = gt_area[:, None] + pred_area[None, :] - inter
    iou_matrix = np.divide(inter, union, out=np.zeros(inter.shape), where=union > 0)

    iou = np.zeros(n_gt)
    recall = np.zeros(n_gt)
    precision = np.zeros(n_gt)
    matches: list[MaskMatch] = []
    if inter.size:
        rows, cols = linear_sum_assignment(iou_matrix if objective == "iou" else inter, maximize=True)
        for g, p in zip(rows, cols, strict=True):
            tp = inter[g, p]
            if tp == 0:
                continue  # no overlap: not a match
            iou[g] = iou_matrix[g, p]
            recall[g] = tp / gt_area[g]
            precision[g] = tp / pred_area[p]
            matches.append(MaskMatch(int(p), int(g), float(iou_matrix[g, p])))
    empty = gt_area == 0
    iou[empty] = recall[empty] = precision[empty] = np.nan
    matches.sort(key=lambda m: m.ground_truth_index)
    return MaskScores(iou, recall, precision, matches)


def score_mask_set(images: Sequence[MaskScores]) -> tuple[float, float, float]:
    """(mIoU, recall, precision) over every ground-truth mask of a set of images."""
    def pooled(attr: str) -> float:
        return _nanmean(np.concatenate([getattr(s, attr) for s in images])) if images else float("nan")

    return pooled("iou"), pooled("recall"), pooled("precision")
