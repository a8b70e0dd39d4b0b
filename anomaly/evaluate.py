"""Few-shot evaluation of the detector on folders in the MVTec AD layout.

One run = one (category, shots, seed): fit on the protocol's references, compute every test
image's map at the model's resolution, score with ``anomaly.metrics``. Rows are plain dicts
(JSON-ready); ``summarise`` and ``format_table`` average them over seeds.
"""
from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import metrics
from .calibration import verdict
from .datasets import Category, discover, load_mask, reference_paths, test_samples
from .detector import DetectorConfig, PFMDetector

log = logging.getLogger(__name__)

METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")
RATES = ("false_alarm_rate", "predicted_false_alarm_rate", "miss_rate", "review_rate",
         "defect_false_alarm_rate", "defect_miss_rate", "miss_rate_at_5pct_false_alarms")
ROW_KEYS = ("category", "shots", "seed", "backbone", *METRICS, "fit_seconds", "predict_ms",
            *RATES)
_MEAN_KEYS = (*METRICS, *RATES, "fit_seconds", "predict_ms")


def evaluate_category(category_dir: Category | str | Path, shots: int, seed: int,
                      config: DetectorConfig | None = None,
                      detector_factory: Callable[[DetectorConfig], PFMDetector] = PFMDetector,
                      *, batch_size: int = 16, timed_images: int = 10) -> dict:
    """Fit on ``shots`` references of ``seed`` and score every test image -> one result row.

    The references are sorted(train/good)[seed * shots:(seed + 1) * shots] and the detector's
    training seed is ``seed`` too. Row keys (ROW_KEYS): category, shots, seed, backbone;
    image_auroc, f1_max; pixel_auroc and aupro on masks resized (nearest) to config.image_size,
    None unless every defective image has a mask; fit_seconds (wall time of fit, features
    included); predict_ms (median wall time of ``predict`` on one image at its own resolution,
    over ``timed_images`` test images spread over the test set, after one warm-up call);
    at the detector's calibrated thresholds: false_alarm_rate (good test images not called OK,
    REVIEW counted as flagged), predicted_false_alarm_rate (what the detector expects that
    rate to be), miss_rate (defective images called OK), review_rate (test images called
    REVIEW), defect_false_alarm_rate and defect_miss_rate (REVIEW counted the other way: good
    images called DEFECT, defective ones not called DEFECT); miss_rate_at_5pct_false_alarms
    (misses at the threshold that flags 5 % of the good test images: the ranking's own limit).
    ``detector_factory(config)`` builds the detector (tests pass a fake).
    """
    config = replace(config or DetectorConfig(), seed=seed)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; must be at least 1")
    if timed_images < 1:
        raise ValueError(f"timed_images={timed_images}; must be at least 1")
    category = category_dir if isinstance(category_dir, Category) else discover(category_dir)
    references = reference_paths(category, shots, seed)
    samples = test_samples(category)
    size = config.image_size

    detector = detector_factory(config)
    start = time.perf_counter()
    detector.fit(references)
    fit_seconds = time.perf_counter() - start
    log.info("%s: fitted on %d references in %.1f s", category.name, shots, fit_seconds)

    paths = [s.path for s in samples]
    maps = np.empty((len(paths), size, size), np.float32)   # (N, S, S)
    scores = np.empty(len(paths), np.float64)                # (N,)
    for first in range(0, len(paths), batch_size):
        batch_maps, batch_scores = detector.anomaly_maps(paths[first:first + batch_size])
        if batch_maps.shape[1:] != (size, size):
            raise RuntimeError(f"detector returned maps of shape {batch_maps.shape}; "
                               f"expected (B, {size}, {size})")
        maps[first:first + len(batch_maps)] = batch_maps
        scores[first:first + len(batch_maps)] = batch_scores
    labels = np.array([s.label for s in samples])           # (N,) True = defective
    verdicts = np.array([verdict(s, detector.threshold, detector.defect_threshold) for s in scores])

    row = {"category": category.name, "shots": shots, "seed": seed, "backbone": config.backbone,
           "image_auroc": metrics.image_auroc(scores, labels), "pixel_auroc": None, "aupro": None,
           "f1_max": metrics.f1_max(scores, labels)}
    missing = [s.path.name for s in samples if s.label and s.mask_path is None]
    if missing:
        log.warning("%s: %d defective images have no mask (e.g. %s); skipping pixel metrics",
                    category.name, len(missing), missing[0])
    else:
        masks = np.zeros(maps.shape, bool)                  # (N, S, S)
        for i, sample in enumerate(samples):
            if sample.label:
                masks[i] = load_mask(sample.mask_path, size)
        row["pixel_auroc"] = metrics.pixel_auroc(maps, masks)
        row["aupro"] = metrics.aupro(maps, masks)
    row["fit_seconds"] = fit_seconds
    step = max(1, len(paths) // timed_images)
    row["predict_ms"] = _predict_ms(detector, paths[::step][:timed_images])
    good, defective = verdicts[~labels], verdicts[labels]
    row["false_alarm_rate"] = float((good != "OK").mean())
    row["predicted_false_alarm_rate"] = float(detector.expected_false_alarm_rate(detector.threshold))
    row["miss_rate"] = float((defective == "OK").mean())
    row["review_rate"] = float((verdicts == "REVIEW").mean())
    row["defect_false_alarm_rate"] = float((good == "DEFECT").mean())
    row["defect_miss_rate"] = float((defective != "DEFECT").mean())
    row["miss_rate_at_5pct_false_alarms"] = metrics.miss_rate_at_false_alarm_rate(scores, labels, 0.05)
    return row


def summarise(rows: Sequence[dict]) -> list[dict]:
    """Rows -> one row per (category, backbone, shots), in first-seen order, with the mean of
    each metric over seeds (None where every seed has None) and ``seeds`` (how many)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["category"], row["backbone"], row["shots"]), []).append(row)
    summary = []
    for (category, backbone, shots), members in groups.items():
        out = {"category": category, "backbone": backbone, "shots": shots, "seeds": len(members)}
        for key in _MEAN_KEYS:
            values = [r[key] for r in members if r.get(key) is not None]
            out[key] = float(np.mean(values)) if values else None
        summary.append(out)
    return summary


def format_table(rows: Sequence[dict]) -> str:
    """Rows -> markdown table of the means over seeds; with several categories, a "mean" row
    per (backbone, shots) averages the categories (n/a for a metric some category lacks)."""
    summary = summarise(rows)
    if len({r["category"] for r in summary}) > 1:
        by_setting: dict[tuple, list[dict]] = {}
        for r in summary:
            by_setting.setdefault((r["backbone"], r["shots"]), []).append(r)
        for (backbone, shots), members in by_setting.items():
            mean = {"category": "mean", "backbone": backbone, "shots": shots,
                    "seeds": min(r["seeds"] for r in members)}
            for key in _MEAN_KEYS:
                values = [r[key] for r in members]
                mean[key] = None if None in values else float(np.mean(values))
            summary.append(mean)
    header = ["category", "backbone", "shots", "seeds", "image AUROC", "pixel AUROC", "AUPRO",
              "F1-max", "false alarms", "predicted", "misses", "REVIEW", "false alarms (DEFECT)",
              "misses (not DEFECT)", "misses at 5 % f.a.", "fit s", "predict ms"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in summary:
        cells = [r["category"], r["backbone"], str(r["shots"]), str(r["seeds"]),
                 *(_fmt(r[k], ".3f") for k in METRICS), *(_fmt(r[k], ".1%") for k in RATES),
                 _fmt(r["fit_seconds"], ".1f"), _fmt(r["predict_ms"], ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _predict_ms(detector, paths: Sequence[Path]) -> float:
    """Median wall time in ms of ``predict`` on one image (batch of one), after a warm-up call."""
    detector.predict(paths[0])
    times = []
    for path in paths:
        start = time.perf_counter()
        detector.predict(path)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
