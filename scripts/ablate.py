"""Ablations behind the detector's defaults: each variant is the default config with one change,
fitted and scored exactly as ``python -m anomaly evaluate`` does, on every category given.

    python scripts/ablate.py ../shared/data/bottle ../shared/data/magnetic_tile ../shared/data/screw
    python scripts/ablate.py ../shared/data/bottle --variants default pfm-only --shots 2 --seeds 0

Prints one markdown row per variant: per category image / pixel AUROC and the false-alarm and
miss rates at the calibrated threshold (means over seeds), then the mean image AUROC over the
categories, which is what a default is chosen by (never one category alone).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly.detector import DetectorConfig                                       # noqa: E402
from anomaly.evaluate import evaluate_category                                     # noqa: E402

# name -> changes to the default DetectorConfig
VARIANTS = {
    "default": {},
    "pfm-only": {"score": "pfm"},
    "knn-only": {"score": "knn"},
    "rotation-180": {"rotation": 180.0},
    "no-augmentation": {"views": 1},
    "bank-1024": {"bank_size": 1024},
    "bank-2048": {"bank_size": 2048},
    "bank-16384": {"bank_size": 16384},
    "sigma-8": {"sigma": 8.0},
    "steps-200-batch-256": {"steps": 200, "batch": 256},
    "steps-150-batch-256": {"steps": 150, "batch": 256},
    "steps-100-batch-256": {"steps": 100, "batch": 256},
    "views-32": {"views": 32},
    "256px": {"image_size": 256},
    "384px": {"image_size": 384},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("categories", nargs="+", type=Path, help="category folders in the MVTec AD layout")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    names = [c.name for c in args.categories]
    print("| variant | " + " | ".join(f"{n} image / pixel / false alarms / misses" for n in names)
          + " | mean image AUROC |")
    print("|---" * (len(names) + 2) + "|")
    for variant in args.variants:
        config = DetectorConfig(**VARIANTS[variant])
        cells, means = [], []
        for category in args.categories:
            started = time.perf_counter()
            rows = [evaluate_category(category, args.shots, seed, config, timed_images=1) for seed in args.seeds]
            mean = {k: statistics.mean(r[k] for r in rows)
                    for k in ("image_auroc", "pixel_auroc", "false_alarm_rate", "miss_rate")}
            cells.append(f"{mean['image_auroc']:.3f} / {mean['pixel_auroc']:.3f} / "
                         f"{mean['false_alarm_rate']:.0%} / {mean['miss_rate']:.0%}")
            means.append(mean["image_auroc"])
            print(f"{variant} {category.name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        print(f"| {variant} | " + " | ".join(cells) + f" | {statistics.mean(means):.3f} |", flush=True)
    print(f"{args.shots} shots, seeds {args.seeds}", file=sys.stderr)


if __name__ == "__main__":
    main()
