"""How well do threshold rules set from good references alone keep their false-alarm promise?

    python scripts/calibration_study.py ../shared/data/bottle ../shared/data/magnetic_tile \
        ../shared/data/screw --shots 2 4 8 --seeds 0 1 2 --json study.json
    python scripts/calibration_study.py --from study.json --budget 0.05     # rules only, no fits

Fits the default detector per (category, shots, seed) as ``evaluate`` does, keeps its
calibration evidence (held-out views, leave-one-out reference scores) and every test image's
score, then applies each rule in ``RULES`` to the same evidence: per category and shot count,
the false alarms (good test images above the rule's threshold), misses (defective ones at or
below it) and, for comparison, the misses at the threshold that flags 5 % of the good test images
(the ranking's own limit). Means over seeds.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def collect(categories: list[Path], shots: list[int], seeds: list[int]) -> list[dict]:
    from anomaly import DetectorConfig, PFMDetector
    from anomaly.datasets import discover, reference_paths, test_samples
    from anomaly.detector import held_out_count

    runs = []
    for folder in categories:
        category = discover(folder)
        samples = test_samples(category)
        for k in shots:
            for seed in seeds:
                det = PFMDetector(DetectorConfig(seed=seed))
                det.fit(reference_paths(category, k, seed))
                scores = []
                for first in range(0, len(samples), 16):
                    scores += det.anomaly_maps([s.path for s in samples[first:first + 16]])[1].tolist()
                runs.append(dict(category=category.name, shots=k, seed=seed,
                                 views=det.calibration_scores.tolist(), groups=max(1, held_out_count(k)),
                                 loo=det.reference_scores.tolist(), scores=scores,
                                 labels=[bool(s.label) for s in samples]))
                print(f"{category.name} shots={k} seed={seed}: threshold {det.threshold:.4f}", flush=True)
    return runs


def _max_margin(run, budget):
    """The rule before the good-score model: the held-out views' maximum + 5 %."""
    return max(run["views"]) * 1.05


def _normal(values, budget, widen=1.0):
    logs = np.log(values)
    return math.exp(logs.mean() + widen * logs.std(ddof=1) * stats.norm.isf(budget))


def _views_normal(run, budget):
    """Log-normal on the held-out views alone."""
    return _normal(run["views"], budget)


def _loo_normal(run, budget):
    """Log-normal on the references' leave-one-out scores alone."""
    return _normal(run["loo"], budget) if len(run["loo"]) > 1 else _views_normal(run, budget)


def _pooled_normal(run, budget):
    """Log-normal on views and leave-one-out scores together."""
    return _normal(run["views"] + run["loo"], budget)


def _model(run, budget):
    """The detector's own rule: ``anomaly.calibration.GoodScoreModel``."""
    from anomaly.calibration import GoodScoreModel

    return GoodScoreModel.fit(run["views"], run["loo"], run["shots"], run["groups"]).threshold_for(budget)


RULES = {"max + 5 %": _max_margin, "views, log-normal": _views_normal, "leave-one-out, log-normal": _loo_normal,
         "pooled, log-normal": _pooled_normal, "GoodScoreModel": _model}


def misses_at_5pct(scores: np.ndarray, labels: np.ndarray) -> float:
    from anomaly.metrics import miss_rate_at_false_alarm_rate

    return miss_rate_at_false_alarm_rate(scores, labels, 0.05)


def report(runs: list[dict], budget: float) -> str:
    lines = [f"budget {budget:g}: false alarms / misses (misses at 5 % false alarms), % , means over seeds", ""]
    keys = sorted({(r["shots"], r["category"]) for r in runs})
    lines.append("| rule | " + " | ".join(f"{c} k={k}" for k, c in keys) + " |")
    lines.append("|---|" + "---|" * len(keys))
    limit = defaultdict(list)
    for r in runs:
        limit[(r["shots"], r["category"])].append(misses_at_5pct(np.array(r["scores"]), np.array(r["labels"])))
    for name, rule in RULES.items():
        cells = []
        for key in keys:
            fa, miss = [], []
            for r in (r for r in runs if (r["shots"], r["category"]) == key):
                s, y, t = np.array(r["scores"]), np.array(r["labels"]), rule(r, budget)
                fa.append((s[~y] > t).mean())
                miss.append((s[y] <= t).mean())
            cells.append(f"{np.mean(fa):.1%} / {np.mean(miss):.0%} ({np.mean(limit[key]):.0%})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("categories", nargs="*", type=Path)
    parser.add_argument("--shots", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--json", type=Path, help="write the collected evidence and scores here")
    parser.add_argument("--from", dest="source", type=Path, help="read them from here instead of fitting")
    args = parser.parse_args(argv)
    if args.source:
        runs = json.loads(args.source.read_text())
    else:
        if not args.categories:
            parser.error("give category folders, or --from FILE")
        runs = collect(args.categories, args.shots, args.seeds)
        if args.json:
            args.json.write_text(json.dumps(runs))
    print(report(runs, args.budget))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
