"""Arguments and entry point of ``python -m anomaly bench`` (registered by anomaly.cli).

This module imports only the standard library at import time, so that building the app's
command-line parser stays cheap; the benchmark itself is imported when the command runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALL_METHODS = ("pfm", "knn", "patchcore", "padim")
RUNTIMES = ("openvino", "torch")                # anomaly.runtime.RUNTIMES, without importing torch


def default_data_dir() -> Path:
    """$ANOMALY_DATA_DIR, else ../shared/data beside the repository."""
    return Path(os.environ.get("ANOMALY_DATA_DIR", REPO.parent / "shared" / "data"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Benchmark PFM (as the app runs it) against a kNN memory bank on the same "
                     "backbone and anomalib's PatchCore and PaDiM, on the same references and test "
                     "images; plus the backbones' speed floor, memory and scaling. Prints markdown; "
                     "--json also writes <name>.json, <name>.md and <name>_scaling.png.")
    p.add_argument("dirs", nargs="*", type=Path, metavar="DIR",
                   help="category folders (MVTec AD layout); default: every category under "
                        "$ANOMALY_DATA_DIR or ../shared/data")
    p.add_argument("--shots", nargs="+", type=int, default=[1, 4, 8], help="default: 1 4 8")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="default: 0 1 2")
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(ALL_METHODS),
                   help="default: all (patchcore and padim need requirements-bench.txt)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the results here (and .md, _scaling.png)")
    p.add_argument("--limit-test", type=int, metavar="N",
                   help="use N test images per category (half good, evenly spread); default: all")
    p.add_argument("--timed-images", type=int, default=10, metavar="N",
                   help="predict calls (batch of one) timed per run; default: 10")
    p.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES),
                   help="where PFM's and the kNN bank's backbones run, each timed and scored apart "
                        "(PyTorch eager is the reference); default: both")
    p.add_argument("--image-size", type=int, metavar="PX",
                   help="model resolution; default: the detector's (320)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="peak memory per method, category and shots in a fresh process (seed 0)")
    p.add_argument("--scaling-refs", nargs="*", type=int, default=[1, 4, 8, 16, 32, 64], metavar="K",
                   help="reference counts for the scaling sweep (none: skip); default: 1 4 8 16 32 64")
    p.add_argument("--scaling-sizes", nargs="*", type=int, default=[256, 320, 384, 512], metavar="PX",
                   help="input sizes for the scaling sweep at 8 references (none: skip); "
                        "default: 256 320 384 512")
    p.add_argument("--scaling-methods", nargs="+", choices=ALL_METHODS, default=["pfm", "knn"],
                   help="methods in the scaling sweep; default: pfm knn")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``; ValueError for bad input."""
    from .methods import ANOMALIB_INSTALL, ANOMALIB_METHODS, anomalib_version
    from .report import markdown, scaling_plot
    from .runner import BenchConfig, run_benchmark

    wanted = [m for m in ANOMALIB_METHODS if m in args.methods or m in args.scaling_methods]
    if wanted and anomalib_version() is None:
        raise ValueError(f"methods {', '.join(wanted)} need anomalib, which is not installed: "
                         f"{ANOMALIB_INSTALL} (or pass --methods pfm knn)")
    if args.json is not None:
        if not args.json.parent.is_dir():
            raise ValueError(f"{args.json}: folder {args.json.parent} does not exist")
        if args.json.is_dir():
            raise ValueError(f"{args.json}: is a folder; give a file name")
    dirs = args.dirs or _default_categories()
    config = BenchConfig(categories=dirs, shots=args.shots, seeds=args.seeds, methods=args.methods,
                         runtimes=args.runtimes, image_size=BenchConfig.image_size if args.image_size is None else args.image_size, limit_test=args.limit_test,
                         timed_images=args.timed_images, memory=args.memory,
                         scaling_refs=args.scaling_refs, scaling_sizes=args.scaling_sizes,
                         scaling_methods=args.scaling_methods)

    def save(results: dict) -> None:
        if args.json is not None:
            tmp = args.json.with_name(args.json.name + ".tmp")
            tmp.write_text(json.dumps(results, indent=2) + "\n")
            tmp.replace(args.json)

    results = run_benchmark(config, progress=lambda message: print(message, file=sys.stderr, flush=True),
                            on_update=save)
    report = markdown(results)
    if args.json is not None:
        if results["scaling"]:
            plot = scaling_plot(results["scaling"], args.json.with_name(args.json.stem + "_scaling.png"))
            results["meta"]["plot"] = plot.name
        md = args.json.with_suffix(".md")
        md.write_text(report)
        results["meta"]["markdown"] = md.name
        save(results)
    print(report, end="")
    return 0


def _default_categories() -> list[Path]:
    """Every folder under the default data directory that holds train/good."""
    root = default_data_dir()
    found = sorted(p for p in root.iterdir() if (p / "train" / "good").is_dir()) if root.is_dir() else []
    if not found:
        raise ValueError(f"no category folders (with train/good) under {root}; give DIR arguments "
                         f"or set ANOMALY_DATA_DIR")
    return found
