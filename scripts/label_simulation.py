"""What do a few labels where the detector is unsure buy? A user simulated with the ground truth.

    python scripts/label_simulation.py ../shared/data/bottle ../shared/data/magnetic_tile \
        ../shared/data/screw --shots 8 --seeds 0 1 2 --labels 3 --json labels.json

Per (category, seed), as in the app: an ``InspectionSession`` fits on the protocol's references
(``sorted(train/good)[seed*k:(seed+1)*k]``), inspects a batch of ``--batch`` test images drawn at
random (seeded), then ``--labels`` times takes the first of ``suggestions()`` and marks it with
its true label (good: the session refits with it among the references; defective: the
thresholds move). Before and after, every test image not in the batch is scored by the session's
detector at the session's thresholds: false alarms (good images not OK), misses (defective images
OK) and the REVIEW rate. Prints one line per run and the means per category.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rates(session, samples) -> dict:
    """Verdicts of the session's detector at its current thresholds on ``samples``."""
    from anomaly.calibration import verdict

    scores = []
    for first in range(0, len(samples), 16):
        scores += session.detector.anomaly_maps([s.path for s in samples[first:first + 16]])[1].tolist()
    verdicts = np.array([verdict(s, session.threshold, session.defect_threshold) for s in scores])
    labels = np.array([bool(s.label) for s in samples])
    return {"false_alarm_rate": float((verdicts[~labels] != "OK").mean()),
            "miss_rate": float((verdicts[labels] == "OK").mean()),
            "review_rate": float((verdicts == "REVIEW").mean())}


def simulate(folder: Path, shots: int, seed: int, n_labels: int, batch: int) -> dict:
    from anomaly.datasets import discover, reference_paths, test_samples
    from anomaly.session import InspectionSession

    category = discover(folder)
    samples = test_samples(category)
    chosen = random.Random(seed).sample(range(len(samples)), min(batch, len(samples)))
    in_batch = [samples[i] for i in chosen]
    held = [s for i, s in enumerate(samples) if i not in set(chosen)]
    truth = {str(s.path): bool(s.label) for s in in_batch}     # by path: file names repeat

    session = InspectionSession()
    session.set_references(reference_paths(category, shots, seed))
    session.fit()
    session.inspect([(str(s.path), str(s.path)) for s in in_batch])
    before = rates(session, held)
    marks = []
    for _ in range(n_labels):
        suggested = session.suggestions(1)
        if not suggested:
            break
        result = suggested[0]
        marks.append((result.name, "defect" if truth[result.key] else "good"))
        session.mark(result.name, truth[result.key])
    after = rates(session, held)
    return {"category": category.name, "shots": shots, "seed": seed, "marks": marks,
            "before": before, "after": after}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("categories", nargs="+", type=Path)
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labels", type=int, default=3)
    parser.add_argument("--batch", type=int, default=30, help="test images in the inspected batch")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    runs = []
    for folder in args.categories:
        for seed in args.seeds:
            run = simulate(folder, args.shots, seed, args.labels, args.batch)
            runs.append(run)
            b, a = run["before"], run["after"]
            print(f"{run['category']} seed={seed} marks={[m for _, m in run['marks']]}: false alarms "
                  f"{b['false_alarm_rate']:.1%} -> {a['false_alarm_rate']:.1%}, misses {b['miss_rate']:.1%} -> "
                  f"{a['miss_rate']:.1%}, REVIEW {b['review_rate']:.1%} -> {a['review_rate']:.1%}", flush=True)
    print("\n| category | false alarms before -> after | misses before -> after | REVIEW before -> after |")
    print("|---|---|---|---|")
    for name in dict.fromkeys(r["category"] for r in runs):
        mine = [r for r in runs if r["category"] == name]
        cells = []
        for key in ("false_alarm_rate", "miss_rate", "review_rate"):
            b = np.mean([r["before"][key] for r in mine])
            a = np.mean([r["after"][key] for r in mine])
            cells.append(f"{b:.1%} -> {a:.1%}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
