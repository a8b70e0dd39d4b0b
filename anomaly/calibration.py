"""How good parts score, estimated from good images the detector did not learn from, and the
thresholds and expected false-alarm rates that follow from it.

The evidence is two kinds of calibration scores gathered during a fit: the augmented views of
the held-out references (scored by nets trained without them and a bank without their
vectors), and every reference's original image scored against the bank without its own
vectors (leave-one-out). Their logarithms are modelled as a normal distribution:

- location: the mean of all of them;
- spread: the larger of their pooled spread and the spread between original images plus the
  spread among one image's views (a new part differs from the references as they differ from
  each other, and in pose as their views do), shrunk towards ``PRIOR_LOG_SD`` with the weight
  of ``PRIOR_REFERENCES`` images: scores are in units of a good part's own level, so their
  spread carries over from part to part, and with 1-3 references the data alone cannot tell it;
- widened by sqrt(1 + 1/k) for the uncertainty of the location (a predictive distribution).

The threshold for a false-alarm budget is that distribution's quantile.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from .verdicts import VERDICTS, verdict  # noqa: F401 (the rule, re-exported beside the model)


@dataclass(frozen=True)
class GoodScoreModel:
    """The distribution of a good part's image score: log(score) ~ Normal(log_mean, log_sd)."""

    log_mean: float
    log_sd: float

    @classmethod
    def fit(cls, view_scores, reference_scores, references: int, view_groups: int = 1) -> "GoodScoreModel":
        """Calibration scores -> the model.

        ``view_scores`` (n,): augmented views of ``view_groups`` images, grouped image by image
        (n a multiple of view_groups, each group's first view its original image unless it has
        none); ``reference_scores`` (m,): references' original images, leave-one-out (may be
        empty); ``references``: how many good images the estimate rests on (k)."""
        views = np.log(np.asarray(view_scores, np.float64).ravel())
        loo = np.log(np.asarray(reference_scores, np.float64).ravel())
        pooled = np.concatenate([views, loo])
        if not len(pooled) or not np.all(np.isfinite(pooled)):
            raise ValueError("calibration needs positive, finite scores of good images")
        if view_groups < 1 or len(views) % view_groups:
            raise ValueError(f"{len(views)} view scores do not split into {view_groups} groups")
        k = max(int(references), 1)
        groups = views.reshape(view_groups, -1) if len(views) else views.reshape(0, 1)
        variance = pooled.var(ddof=1) if len(pooled) > 1 else 0.0
        originals = np.concatenate([loo, groups[:, 0]]) if len(loo) else loo
        if len(originals) > 1:
            within = groups.var(axis=1, ddof=1).mean() if groups.shape[1] > 1 else 0.0
            variance = max(variance, originals.var(ddof=1) + within)
        variance = (PRIOR_REFERENCES * PRIOR_LOG_SD ** 2 + (k - 1) * variance) / (PRIOR_REFERENCES + k - 1)
        return cls(float(pooled.mean()), math.sqrt(variance * (1.0 + 1.0 / k)))

    def false_alarm_rate(self, threshold):
        """Expected share of good parts whose score is above ``threshold`` (float or array)."""
        t = np.asarray(threshold, np.float64)
        with np.errstate(divide="ignore"):
            z = (np.log(np.maximum(t, 0.0)) - self.log_mean) / self.log_sd
        rate = stats.norm.sf(z)
        return float(rate) if np.ndim(threshold) == 0 else rate

    def threshold_for(self, rate: float) -> float:
        """The score above which an expected ``rate`` of good parts lie, 0 < rate < 1."""
        if not 0.0 < rate < 1.0:
            raise ValueError(f"a false-alarm rate must lie strictly between 0 and 1, got {rate}")
        return float(math.exp(self.log_mean + self.log_sd * stats.norm.isf(rate)))

    def as_array(self) -> np.ndarray:
        """(2,) float64: what a detector file keeps to rebuild the model."""
        return np.array([self.log_mean, self.log_sd], np.float64)

    @classmethod
    def from_array(cls, values) -> "GoodScoreModel":
        values = [float(v) for v in values]
        if len(values) != 2 or not all(math.isfinite(v) for v in values) or not values[1] > 0:
            raise ValueError(f"not a good-score model: {values}")
        return cls(*values)


PRIOR_LOG_SD = 0.1         # the spread of good parts' log scores that carries over between parts
PRIOR_REFERENCES = 2       # ... weighted as this many references' worth of evidence
