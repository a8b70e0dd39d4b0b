"""From the two unsmoothed anomaly maps (PFM's mapping error, the memory bank's distance) to one
smoothed map per image and its image score.

Each map is divided by its own scale, the mean value it takes on good images the detector did
not learn from (the held-out references), so that both speak in "times a normal part's level"
and neither dominates by its units; the weighted sum is smoothed and the image score is its
maximum.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

SCORES = {"hybrid": (0.3, 0.7), "pfm": (1.0, 0.0), "knn": (0.0, 1.0)}   # weights of (PFM, kNN)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, H, W) maps, reflect padding, radius 4 sigma."""
    if sigma <= 0:
        return maps
    radius = max(1, int(4 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = maps[:, None]                                                  # (B, 1, H, W)
    pad_h, pad_w = min(radius, out.shape[2] - 1), min(radius, out.shape[3] - 1)
    out = F.pad(out, (pad_w, pad_w, 0, 0), mode="reflect") if pad_w > 0 else out
    out = F.conv2d(out, kernel[radius - pad_w: radius + pad_w + 1].view(1, 1, 1, -1))
    out = F.pad(out, (0, 0, pad_h, pad_h), mode="reflect") if pad_h > 0 else out
    out = F.conv2d(out, kernel[radius - pad_h: radius + pad_h + 1].view(1, 1, -1, 1))
    return out[:, 0]


def combine(components: list[torch.Tensor], weights: tuple[float, ...], scales: torch.Tensor) -> torch.Tensor:
    """Unsmoothed maps [(B, h, w)] of the same size, weights and scales (len(components),)
    -> (B, h, w) weighted sum of each map divided by its scale. Weight-0 maps are skipped."""
    total = sum(w * (m / s) for m, w, s in zip(components, weights, scales.tolist()) if w)
    return total / sum(weights)


def smooth(maps: torch.Tensor, sigma: float, size: int) -> torch.Tensor:
    """(B, h, w) maps -> (B, size, size): Gaussian-smoothed (sigma in pixels at 256 px) at their
    own resolution, then upsampled; the same map as smoothing at full size, at a fraction of
    the cost."""
    maps = gaussian_blur(maps, sigma * maps.shape[1] / 256)
    return F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


@functools.lru_cache(maxsize=16)
def smoothing_operators(h: int, w: int, sigma: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``smooth`` for (h, w) maps as two float32 matrices: rows (size, h) and cols (size, w) with
    smooth(m) == rows @ m @ cols.T. Both steps are separable and each output row of either
    step sums to 1, so smoothing a map that is constant along one axis gives the other axis'
    operator (computed in float64)."""
    rows = smooth(torch.eye(h, dtype=torch.float64)[:, :, None].expand(h, h, w), sigma, size)
    cols = smooth(torch.eye(w, dtype=torch.float64)[:, None, :].expand(w, h, w), sigma, size)
    return (rows[:, :, 0].T.numpy().astype(np.float32).copy(),
            cols[:, 0, :].T.numpy().astype(np.float32).copy())


def smooth_array(maps: np.ndarray, sigma: float, size: int) -> np.ndarray:
    """(B, h, w) float32 maps -> (B, size, size) float32: ``smooth`` in NumPy, in float32 whatever
    precision the maps were computed in, so that scores keep float32 resolution."""
    rows, cols = smoothing_operators(maps.shape[1], maps.shape[2], float(sigma), int(size))
    return np.matmul(np.matmul(rows, maps.astype(np.float32, copy=False)), cols.T)


def image_scores(maps: torch.Tensor) -> torch.Tensor:
    """(B, S, S) smoothed maps -> (B,) image scores: each map's maximum."""
    return maps.flatten(1).amax(1)
