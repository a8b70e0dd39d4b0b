"""Post-processing of anomaly scores and maps: normalisation, masks, outlines, thresholds.

Small pure functions on floats and numpy arrays; no torch, no drawing. Raw scores are the
detector's own units (larger = more anomalous); a pixel or image is above a threshold when its
value is strictly greater than it (the verdicts: ``anomaly.calibration.verdict``).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .image_io import resize_image


def normalize(x, threshold: float, lo: float, hi: float):
    """Raw scores -> [0, 1], piecewise linear: lo -> 0, threshold -> 0.5, hi -> 1, clipped.

    ``x`` is a float (a float comes back) or an array of any shape (a float array of the same
    shape comes back; float32 stays float32). Requires lo <= threshold <= hi; where two of them
    are equal, values below the threshold map to 0 and values above it to 1.
    """
    for name, value in (("threshold", threshold), ("lo", lo), ("hi", hi)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
    if not lo <= threshold <= hi:
        raise ValueError(f"need lo <= threshold <= hi, got lo={lo}, threshold={threshold}, hi={hi}")
    arr = np.asarray(x)
    dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.float64
    v = arr.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        below = np.where(threshold > lo, 0.5 * (v - lo) / (threshold - lo), 0.0)
        above = np.where(hi > threshold, 0.5 + 0.5 * (v - threshold) / (hi - threshold), 1.0)
    out = np.where(v < threshold, below, np.where(v > threshold, above, 0.5))
    out = np.clip(out, 0.0, 1.0)
    if np.ndim(x) == 0 and not isinstance(x, np.ndarray):
        return float(out)
    return out.astype(dtype)


def resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) float32 map -> (H, W) float32 by Pillow's bilinear resize (``size`` is PIL's
    (W, H)): when enlarging, torch's bilinear interpolation (align_corners=False) to ~3e-5; when
    shrinking, antialiased. In Pillow (``image_io.resize_image``), not torch: no OpenMP threads left
    spinning (see ``FeatureExtractor.unnormalised``)."""
    if amap.shape == (size[1], size[0]):
        return amap
    return np.asarray(resize_image(Image.fromarray(np.asarray(amap, dtype=np.float32)), size),
                      dtype=np.float32)


def binary_mask(anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
    """(H, W) map -> (H, W) bool mask, True where the map is strictly above the threshold."""
    return np.asarray(anomaly_map) > threshold


def region_outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """(H, W) bool mask -> (H, W) bool band ``width`` px wide along every region's boundary.

    The band straddles the boundary: ``width - width // 2`` px inside the region and
    ``width // 2`` px outside it (all inside for width 1). Regions that touch the image border
    get an outline along the border too. An all-False mask gives an all-False outline.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1:
        raise ValueError(f"width must be an integer >= 1, got {width!r}")
    if not mask.any():
        return np.zeros_like(mask)
    from scipy import ndimage       # here, not at import: the torch-free runner (anomaly.edge) needs
                                    # ``normalize`` without scipy

    square = ndimage.generate_binary_structure(2, 2)              # 3 x 3, 8-connected
    inside, outside = width - width // 2, width // 2
    inner = ndimage.binary_erosion(mask, square, iterations=inside, border_value=0)
    outer = ndimage.binary_dilation(mask, square, iterations=outside) if outside else mask
    return outer & ~inner


def _check_scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite numbers")
    if y.all() or not y.any():
        raise ValueError(f"need both good (False) and defect (True) labels, got "
                         f"{int((~y).sum())} good and {int(y.sum())} defect")
    return s, y


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores (N,) and labels (N,) bool (True = defect) -> (fpr, tpr, thresholds).

    One point per distinct score, from (0, 0) to (1, 1); point i counts ``score >= thresholds[i]``
    as defect (thresholds[0] is +inf).
    """
    s, y = _check_scores_labels(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]      # last index of each distinct score
    tp = np.cumsum(y)[last]
    fp = np.cumsum(~y)[last]
    tpr = np.r_[0.0, tp / y.sum()]
    fpr = np.r_[0.0, fp / (~y).sum()]
    return fpr, tpr, np.r_[np.inf, s[last]]


def auroc(scores, labels) -> float:
    """Area under the ROC curve (ties count half), in [0, 1]."""
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))     # trapezoids


def best_threshold(scores, labels) -> float:
    """Threshold that maximises Youden's J = TPR - FPR for the rule ``score > threshold``.

    The threshold lies midway between the two neighbouring distinct scores it separates, so a
    separable set gets a threshold strictly between its highest good and lowest defect score.
    Where calling everything a defect is best, it lies below the lowest score, and never below
    0 when the scores are non-negative (anomaly scores), so it is always usable as a threshold.
    """
    s, y = _check_scores_labels(scores, labels)
    fpr, tpr, thresholds = roc_curve(s, y)
    distinct = thresholds[1:]                                 # descending distinct scores
    j = tpr[1:] - fpr[1:]
    i = int(np.argmax(j))                                     # first (highest) cut with max J
    if i + 1 < distinct.size:
        below = distinct[i + 1]
    else:                                                     # everything is a defect
        below = distinct[i] - ((distinct[0] - distinct[-1]) or 1.0)
        if distinct[i] >= 0:                                  # stay a valid (>= 0) threshold
            below = max(below, -distinct[i])
    return float((distinct[i] + below) / 2.0)


JUST_BELOW = 1e-6      # relative step below a score: it survives rounding to float32


def thresholds_with_labels(threshold: float, defect_threshold: float, good_scores,
                           defect_scores) -> tuple[float, float]:
    """The (OK, DEFECT) boundaries moved by the user's marks -> (threshold, defect_threshold).

    ``good_scores`` (n,) and ``defect_scores`` (m,) are the scores of the results marked good
    and marked defective. Where the lowest defective score s is not above ``defect_threshold``,
    the DEFECT boundary moves just below s, so that the parts marked defective are DEFECT, but
    never below the highest good score (where the marks overlap the good ones win) nor above
    where it was; the OK boundary is then at most the DEFECT boundary. Without defective marks
    nothing moves."""
    defects = np.asarray(defect_scores, dtype=np.float64).ravel()
    goods = np.asarray(good_scores, dtype=np.float64).ravel()
    if not defects.size:
        return float(threshold), float(defect_threshold)
    lowest = float(defects.min())
    if lowest <= defect_threshold:
        below = math.nextafter(lowest - abs(lowest) * JUST_BELOW, -math.inf)
        floor = float(goods.max()) if goods.size else -math.inf
        defect_threshold = min(float(defect_threshold), max(below, floor))
    return min(float(threshold), float(defect_threshold)), float(defect_threshold)
