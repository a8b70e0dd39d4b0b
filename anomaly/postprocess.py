"""Post-processing of scores and maps: small pure functions."""
import numpy as np


def normalize(x, threshold, lo, hi):
    x = np.asarray(x, dtype=np.float64)
    below = 0.5 * (x - lo) / max(threshold - lo, 1e-12)
    above = 0.5 + 0.5 * (x - threshold) / max(hi - threshold, 1e-12)
    out = np.clip(np.where(x <= threshold, below, above), 0.0, 1.0)
    return float(out) if out.ndim == 0 else out
