"""Evaluation metrics for anomaly detection: image/pixel AUROC, AUPRO and F1-max.

Pure numpy/scipy. Scores are "higher = more anomalous"; labels and masks are True for defects.
Shapes: N images, H x W maps. AUROC follows the Mann-Whitney statistic with average ranks for
ties; AUPRO follows the MVTec AD definition (Bergmann et al., IJCV 2021).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

# 8-connectivity for ground-truth regions, as in the MVTec AD evaluation code.
_REGION_STRUCTURE = np.ones((3, 3), dtype=int)


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of image scores (N,) against labels (N,) bool.

    Equals the probability that a random defective image scores above a random good one, ties
    counting one half (the rank statistic with average ranks). Raises ValueError on mismatched
    shapes, non-finite scores, or labels of a single class.
    """
    scores, labels = _check_scores_labels(scores, labels, ndim=1)
    return _auroc(scores, labels)


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float | None:
    """AUROC over all pixels of anomaly maps (N, H, W) against masks (N, H, W) bool.

    Exact rank statistic, not a histogram: one sort of the normal pixels (float32 sorts fast)
    and a search of the sorted distinct defect scores in them, small next to computing the
    maps; a binned approximation would
    lose resolution in the long upper tail where the defects are. None when no pixel is
    defective (e.g. a test set of good images only).
    """
    maps, masks = _check_scores_labels(maps, masks, ndim=3)
    if not masks.any():
        return None
    return _auroc(maps.ravel(), masks.ravel())


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3,
          num_thresholds: int = 1000) -> float | None:
    """Area under the per-region-overlap curve up to ``fpr_limit``, divided by ``fpr_limit``.

    maps (N, H, W) float, masks (N, H, W) bool. A ground-truth region is a connected component
    (8-connectivity) of one mask. At a threshold t, PRO(t) is the mean over all regions of all
    images of the fraction of the region's pixels scoring >= t, and FPR(t) the fraction of all
    normal pixels scoring >= t. The curve (0, 0) -> ... -> (1, 1) is integrated with the
    trapezoid rule and interpolated exactly at ``fpr_limit``, as in the MVTec AD evaluation
    code. Thresholds: ``num_thresholds`` normal-pixel scores evenly spaced in rank over FPR
    [0, fpr_limit] (quantiles of the top of the normal scores), each evaluated just above and
    at its value, with vectorised counting (one sort of the top normal scores, one histogram
    per image). Exact when every normal pixel within the limit is a threshold; otherwise the
    result is off by at most 0.5 / (num_thresholds - 1) (PRO is monotone between thresholds).
    None when no pixel is defective; ValueError when no pixel is normal.
    """
    maps, masks = _check_scores_labels(maps, masks, ndim=3)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit={fpr_limit}; allowed range is (0, 1]")
    if num_thresholds < 2:
        raise ValueError(f"num_thresholds={num_thresholds}; must be at least 2")
    if not masks.any():
        return None
    normal = maps[~masks]                                            # (P,)
    if normal.size == 0:
        raise ValueError("aupro needs at least one normal pixel; every mask pixel is a defect")
    thresholds, fpr_gt, fpr_ge = _normal_rates(normal, fpr_limit, num_thresholds)  # (T,) each
    n_bins = thresholds.size + 1
    # Per region: histogram of "how many thresholds lie strictly below (gt) / at or below (ge)
    # each pixel's score"; a pixel counts at threshold j with ">" when its gt-bin > j, with
    # ">=" when its ge-bin > j.
    region_gt, region_ge, region_sizes = [], [], []
    for image_map, mask in zip(maps, masks):
        regions, n_regions = ndimage.label(mask, structure=_REGION_STRUCTURE)  # (H, W) int
        if n_regions == 0:
            continue
        ids = regions[mask] - 1                      # (D,) region index per defect pixel
        values = image_map[mask]                     # (D,)
        region_sizes.append(np.bincount(ids, minlength=n_regions))
        for side, out in (("left", region_gt), ("right", region_ge)):
            flat = ids * n_bins + np.searchsorted(thresholds, values, side)
            out.append(np.bincount(flat, minlength=n_regions * n_bins).reshape(n_regions, n_bins))
    sizes = np.concatenate(region_sizes)[:, None]   # (R, 1)
    pro_gt = (_count_above(np.concatenate(region_gt)) / sizes).mean(axis=0)   # (T,)
    pro_ge = (_count_above(np.concatenate(region_ge)) / sizes).mean(axis=0)   # (T,)
    # Descending thresholds; at each, first ">" (just above the value) then ">=".
    fpr = np.concatenate([[0.0], np.stack([fpr_gt, fpr_ge], 1)[::-1].ravel(), [1.0]])
    pro = np.concatenate([[0.0], np.stack([pro_gt, pro_ge], 1)[::-1].ravel(), [1.0]])
    return _partial_area(fpr, pro, fpr_limit) / fpr_limit


def f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """Best F1 of "score >= t means defect" over all thresholds t; scores (N,), labels (N,) bool.

    Raises ValueError on mismatched shapes, non-finite scores or no defective label.
    """
    scores, labels = _check_scores_labels(scores, labels, ndim=1)
    n_pos = int(labels.sum())
    if n_pos == 0:
        raise ValueError("f1_max needs at least one defective label; F1 is undefined without")
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    tp = np.cumsum(labels[order])                    # (N,) true positives at each cut
    predicted = np.arange(1, scores.size + 1)        # (N,) images called defective
    last_of_tie = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    f1 = 2.0 * tp[last_of_tie] / (predicted[last_of_tie] + n_pos)
    return float(f1.max())


def miss_rate_at_false_alarm_rate(scores: np.ndarray, labels: np.ndarray, false_alarm_rate: float = 0.05) -> float:
    """Share of defective images at or below the lowest threshold t that flags at most
    ``false_alarm_rate`` of the good ones ("score > t means defect"): the misses that the
    ranking itself forces at that false-alarm rate, whatever threshold rule is used.
    scores (N,), labels (N,) bool; needs both kinds of label."""
    scores, labels = _check_scores_labels(scores, labels, ndim=1)
    if labels.all() or not labels.any():
        raise ValueError("miss_rate_at_false_alarm_rate needs both good and defective labels")
    good = np.sort(scores[~labels])
    allowed = int(np.floor(false_alarm_rate * good.size + 1e-9))     # good images that may lie above t
    t = good[good.size - 1 - allowed] if allowed < good.size else -np.inf
    return float((scores[labels] <= t).mean())


def _check_scores_labels(scores, labels, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """Shared input checks; returns (scores, labels as bool) of the same shape."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != ndim:
        raise ValueError(f"scores have shape {scores.shape}; expected {ndim} dimensions")
    if scores.shape != labels.shape:
        raise ValueError(f"scores of shape {scores.shape} and labels of shape {labels.shape} "
                         "must have the same shape")
    if scores.size == 0:
        raise ValueError("scores are empty")
    if scores.dtype.kind not in "iuf":
        raise ValueError(f"scores have dtype {scores.dtype}; expected real numbers")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    if labels.dtype != np.bool_:
        if not np.isin(labels, (0, 1)).all():
            raise ValueError("labels must be boolean (or 0/1), True = defect")
        labels = labels.astype(bool)
    return scores, labels


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUROC of flat scores (M,) and labels (M,) bool, ties counting one half.

    Exact: the negatives are sorted once and the distinct positive scores, in ascending order
    (numpy's searchsorted is fast for sorted keys), are located in them on both sides.
    """
    if labels.all() or not labels.any():
        raise ValueError(f"AUROC needs both classes; got {int(labels.sum())} defective and "
                         f"{int((~labels).sum())} good samples")
    positives, counts = np.unique(scores[labels], return_counts=True)   # (U,) ascending, (U,)
    negatives = np.sort(scores[~labels])                                 # (M - P,) ascending
    below = np.searchsorted(negatives, positives, "left")     # negatives < each positive
    tied = np.searchsorted(negatives, positives, "right") - below
    wins = np.dot(below, counts) + 0.5 * np.dot(tied, counts)
    return float(wins / (float(counts.sum()) * float(negatives.size)))


def _normal_rates(normal: np.ndarray, fpr_limit: float,
                  num: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normal scores (P,) -> thresholds (T,) ascending, FPR with ">" and with ">=" at each (T,).

    Thresholds are the normal scores at ranks floor(f * P) from the top, f evenly spaced in
    [0, fpr_limit]; only the top floor(fpr_limit * P) + 1 scores are sorted.
    """
    P = normal.size
    n_top = min(P, int(np.floor(fpr_limit * P)) + 1)
    top = np.sort(np.partition(normal, P - n_top)[P - n_top:])   # (n_top,) largest, ascending
    ranks = np.floor(np.linspace(0.0, fpr_limit, num) * P).astype(np.int64)   # 0 = the maximum
    thresholds = np.unique(top[n_top - 1 - np.minimum(ranks, n_top - 1)])
    above = n_top - np.searchsorted(top, thresholds, "right")     # every score > t is in top
    at_or_above = n_top - np.searchsorted(top, thresholds, "left")
    # Scores outside ``top`` can equal top[0]: count the lowest threshold's ties in full.
    at_or_above[thresholds == top[0]] = np.count_nonzero(normal >= top[0])
    return thresholds, above / P, at_or_above / P


def _count_above(hist: np.ndarray) -> np.ndarray:
    """hist (R, T+1) of bins -> (R, T) number of entries in bins > j, for each threshold j."""
    return np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]


def _partial_area(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the polyline (x, y), x non-decreasing, from x[0] to x_max."""
    inside = x <= x_max
    area = float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x) * inside[1:]))
    last = np.flatnonzero(inside)[-1]
    if x[last] < x_max:  # interpolate the segment that crosses x_max
        x0, x1, y0, y1 = x[last], x[last + 1], y[last], y[last + 1]
        y_cut = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_cut) * (x_max - x0)
    return area
