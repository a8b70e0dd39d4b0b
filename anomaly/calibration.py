"""The decision threshold, from the scores of good images the detector did not learn from."""
from __future__ import annotations

import torch


def calibrated_threshold(good_scores: torch.Tensor, margin: float) -> float:
    """(n,) float32 scores of held-out good images -> threshold: their maximum raised by
    ``margin``, computed in float32 so that a saved detector gives back the same number."""
    return float(good_scores.max() * (1.0 + margin))
