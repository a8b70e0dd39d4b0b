"""Command line: ``python -m anomaly <command> ...``. Only this module prints.

    python -m anomaly evaluate DIR [DIR ...] --shots 1 4 8 --seeds 0 1 2 --json out.json
    python -m anomaly fit REF [REF ...] -o model.safetensors
    python -m anomaly predict model.safetensors IMAGE [IMAGE ...] [--out DIR] [--csv FILE]
        [--table results.parquet] [--engine ray [--workers N] [--address auto]]
    python -m anomaly export model.safetensors -o part.onnx
    python -m anomaly bench [DIR ...] --shots 1 4 8 --seeds 0 1 2 --json out.json   (repo only)

Each subcommand is an ``_add_<name>`` function that declares its arguments and a ``_run_<name>``
function that does the work; add a command by writing both and listing it in ``COMMANDS``.
Results go to stdout, progress to stderr; bad input exits with code 2 and a one-line error.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from .backbones import BACKBONE_PAIRS, WeightsUnavailableError
from .datasets import IMAGE_EXTENSIONS, discover, reference_paths
from .detector import DetectorConfig, PFMDetector
from .scoring import SCORES
from .evaluate import evaluate_category, format_table
from .folder_scoring import (ImageScorer, TableWriter, check_table_path, expand_inputs,
                             overlay_paths, score_local)

# ---------------------------------------------------------------------------- evaluate


def _add_evaluate(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("evaluate", help="few-shot evaluation on folders in the MVTec AD layout",
                       description="Fit on sorted(train/good)[seed*k:(seed+1)*k] for every "
                                   "shots k and seed, score test/, print a table of means.")
    p.add_argument("dirs", nargs="+", type=Path, metavar="DIR",
                   help="category folders (train/good, test/good, test/<defect>, ground_truth/)")
    p.add_argument("--shots", nargs="+", type=int, default=[1, 4, 8], help="default: 1 4 8")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="reference slices, also the detector's training seed; default: 0 1 2")
    p.add_argument("--json", type=Path, help="write the rows (one per run) here, after each run")
    p.add_argument("--batch-size", type=int, default=16, help="images per map computation")
    _add_config_arguments(p)
    return p


def _run_evaluate(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.json:
        _check_output_path(args.json)
    if min(args.seeds) < 0:
        raise ValueError(f"--seeds {min(args.seeds)}; seeds must be 0 or more")
    categories = [discover(d) for d in args.dirs]
    for category in categories:  # fail before hours of work, not in the middle
        for shots in args.shots:
            reference_paths(category, shots, max(args.seeds))
    runs = [(c, k, s) for c in categories for k in args.shots for s in args.seeds]
    rows = []
    for i, (category, shots, seed) in enumerate(runs, start=1):
        _err(f"[{i}/{len(runs)}] {category.name} shots={shots} seed={seed} ...", end="")
        start = time.perf_counter()
        try:
            row = evaluate_category(category, shots, seed, config, batch_size=args.batch_size)
        except Exception:
            _err(" failed")
            raise
        rows.append(row)
        metrics = " ".join(f"{k}={_fmt(row[k])}" for k in
                           ("image_auroc", "pixel_auroc", "aupro", "f1_max"))
        _err(f" {metrics} ({time.perf_counter() - start:.0f} s)")
        if args.json:
            _write_json(args.json, rows)
    print(format_table(rows))
    return 0


# ---------------------------------------------------------------------------- fit


def _add_fit(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("fit", help="fit a detector on good reference images and save it",
                       description="Fit on good images (files, or folders of images) and write "
                                   "the detector, with its calibrated thresholds, to one file.")
    p.add_argument("refs", nargs="+", type=Path, metavar="REF",
                   help=f"good image files, folders of them or glob patterns "
                        f"({', '.join(IMAGE_EXTENSIONS)})")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="MODEL",
                   help="where to write the detector (.safetensors)")
    p.add_argument("--seed", type=int, default=DetectorConfig.seed, help="training seed")
    p.add_argument("--false-alarm-budget", type=float, default=DetectorConfig.false_alarm_budget,
                   metavar="RATE", help=f"expected share of good parts not called OK (REVIEW or "
                                        f"DEFECT); default: {DetectorConfig.false_alarm_budget:g}")
    _add_config_arguments(p)
    return p


def _run_fit(args: argparse.Namespace) -> int:
    config = replace(_config(args, seed=args.seed), false_alarm_budget=args.false_alarm_budget)
    _check_output_path(args.output)
    images = expand_inputs(args.refs)
    detector = PFMDetector(config)
    _err(f"fitting on {len(images)} good images ({config.backbone}, {config.image_size} px)")
    report = detector.fit(images, progress=_progress_printer())
    path = detector.save(args.output)
    lo, hi = detector.score_range
    print(f"fitted on {report.n_references} images in {report.seconds:.1f} s; "
          f"threshold {report.threshold:.4g} (REVIEW above it), defect threshold "
          f"{detector.defect_threshold:.4g} (false-alarm budget {config.false_alarm_budget:g}; "
          f"score range {lo:.4g} to {hi:.4g}); saved {path}")
    return 0


# ---------------------------------------------------------------------------- predict


ENGINES = ("local", "ray")
PROGRESS_SECONDS = 10.0                     # at most one progress line on stderr this often


def _add_predict(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("predict", help="score images with a saved detector",
                       description="Print one line per image: name, raw score, normalised "
                                   "score (threshold = 0.5) and verdict (OK, REVIEW or "
                                   "DEFECT). With --table, also write one row per image to a Parquet "
                                   "or CSV file, streamed, in this process or on Ray.")
    p.add_argument("model", type=Path, help="a detector file written by 'fit'")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, folders of them, or glob patterns in quotes "
                        "('line/**/*.png': ** matches any depth)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="write a heatmap overlay <name>_overlay.png per image here")
    p.add_argument("--threshold", type=float, metavar="T",
                   help="OK / REVIEW threshold in raw score units (the DEFECT threshold follows "
                        "it); default: the calibrated one")
    p.add_argument("--false-alarm-budget", type=float, metavar="RATE",
                   help="re-threshold the detector for this expected share of good parts not "
                        "called OK (e.g. 0.02); default: the budget it was fitted with")
    p.add_argument("--csv", type=Path, metavar="FILE",
                   help="also write the readable images' results (image, score, norm_score, "
                        "verdict, threshold, defect_threshold) as CSV")
    p.add_argument("--table", type=Path, metavar="FILE",
                   help="write one row per image, unreadable ones included (path, score, "
                        "norm_score, verdict, threshold, defect_threshold, error): Parquet "
                        "if FILE ends in .parquet, CSV if .csv")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity in [0, 1]")
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: score in this process; ray: in Ray actors (needs "
                        "requirements-ray.txt); same rows either way; default: local")
    p.add_argument("--workers", type=int, default=2, metavar="N",
                   help="--engine ray: number of actors, each loading the detector once and "
                        "using CPUs/N of the cluster's CPUs; default: 2")
    p.add_argument("--address", metavar="ADDR",
                   help="--engine ray: the cluster to join ('auto': the one 'ray start' "
                        "started); default: start a local Ray instance for this run")
    return p


def _run_predict(args: argparse.Namespace) -> int:
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha {args.alpha}; allowed range is [0, 1]")
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise ValueError(f"--threshold {args.threshold}; must be a finite number")
    if args.engine != "ray" and args.address:
        raise ValueError("--address needs --engine ray")
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers}; must be at least 1")
    for path in (args.csv, args.table):
        if path:
            _check_output_path(path)
    if args.table:
        check_table_path(args.table)
    scorer = ImageScorer(args.model, args.threshold, args.alpha,    # checks the file, once
                         false_alarm_budget=args.false_alarm_budget)
    images = expand_inputs(args.images)
    overlays = None
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        overlays = overlay_paths(images, args.out)
    if args.engine == "ray":
        try:
            from .ray_scoring import score_with_ray
        except ImportError as err:
            raise ValueError(f"--engine ray needs Ray ({err}); "
                             "pip install -r requirements-ray.txt") from err
        del scorer                          # the actors load their own
        rows = score_with_ray(args.model, images, overlays, threshold=args.threshold,
                              false_alarm_budget=args.false_alarm_budget,
                              alpha=args.alpha, workers=args.workers, address=args.address)
    else:
        rows = score_local(scorer, images, overlays)
    with contextlib.ExitStack() as stack:
        table = stack.enter_context(TableWriter(args.table)) if args.table else None
        results = None
        if args.csv:
            results = csv.DictWriter(stack.enter_context(args.csv.open("w", newline="")),
                                     fieldnames=["image", "score", "norm_score", "verdict",
                                                 "threshold", "defect_threshold"])
            results.writeheader()
        failed = _consume(rows, len(images), table, results)
    if failed:
        _err(f"error: {failed} of {len(images)} images could not be read")
        return 2
    return 0


def _consume(rows: Iterable[dict], total: int, table: TableWriter | None,
             results: csv.DictWriter | None) -> int:
    """Print and write each row as it comes, with progress on stderr -> the number of errors."""
    start = last = time.perf_counter()
    done = failed = 0
    for row in rows:
        done += 1
        if row["error"]:
            failed += 1
            _err(f"error: {row['error']}")
        else:
            print(f"{Path(row['path']).name}\t{row['score']:.4f}\t{row['norm_score']:.3f}\t"
                  f"{row['verdict']}", flush=True)
            if results:
                results.writerow({"image": row["path"], **{k: row[k] for k in
                                  ("score", "norm_score", "verdict", "threshold",
                                   "defect_threshold")}})
        if table:
            table.write(row)
        now = time.perf_counter()
        if now - last >= PROGRESS_SECONDS and done < total:
            _err(f"[{done}/{total}] {done / (now - start):.1f} images/s")
            last = now
    seconds = time.perf_counter() - start
    _err(f"scored {done} images in {seconds:.1f} s ({done / max(seconds, 1e-9):.1f} images/s)")
    return failed


# ---------------------------------------------------------------------------- export


def _add_export(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="write a saved detector as one ONNX file for the line",
                       description="Write the detector as one self-contained ONNX file (both "
                                   "backbones, the fitted nets, the memory bank and the "
                                   "smoothing inside; thresholds and config in its metadata), "
                                   "to run without PyTorch: python -m anomaly.edge FILE IMAGE ...")
    p.add_argument("model", type=Path, help="a detector file written by 'fit' (.safetensors)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FILE",
                   help="where to write the ONNX file (.onnx)")
    return p


def _run_export(args: argparse.Namespace) -> int:
    from .export import export_onnx

    _check_output_path(args.output)
    detector = PFMDetector.load(args.model)
    path = export_onnx(detector, args.output)
    S = detector.config.image_size
    inputs = f"image (1, {S}, {S}, 3) uint8 RGB"
    if detector.config.resize == "pad":
        inputs += ", content (2,) int64"
    review = detector.threshold
    defect = getattr(detector, "defect_threshold", review)
    print(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB): {inputs} -> anomaly_map, score; "
          f"thresholds {review:.4g} (review) / {defect:.4g} (defect); "
          f"run it: python -m anomaly.edge {path} IMAGE ...")
    return 0


# ---------------------------------------------------------------------------- bench


def _add_bench(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="benchmark PFM against kNN, PatchCore and PaDiM (repository "
                                     "checkout only: bench/, requirements-bench.txt)")
    try:  # bench/ is a top-level folder of the repository, not part of the installed app
        from bench.cli import add_arguments
    except ImportError:
        return p
    add_arguments(p)
    return p


def _run_bench(args: argparse.Namespace) -> int:
    try:
        from bench.cli import run
    except ImportError as err:
        _err(f"error: the benchmark lives in the repository's bench/ folder ({err}); run "
             "'python -m anomaly bench' from the repository root, after "
             "'pip install --no-deps -r requirements-bench.txt'")
        return 1
    return run(args)


# ---------------------------------------------------------------------------- wiring

COMMANDS = {
    "evaluate": (_add_evaluate, _run_evaluate),
    "fit": (_add_fit, _run_fit),
    "predict": (_add_predict, _run_predict),
    "export": (_add_export, _run_export),
    "bench": (_add_bench, _run_bench),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m anomaly",
                                     description="Few-shot visual anomaly detection (PFM).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add, run) in COMMANDS.items():
        add(sub).set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]) and run the command -> exit code: 2 on bad input,
    1 when backbone weights are unavailable offline."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    except WeightsUnavailableError as err:
        parser.exit(1, f"error: {err}\n")


# ---------------------------------------------------------------------------- helpers


def _add_config_arguments(p: argparse.ArgumentParser) -> None:
    """Detector options shared by the commands that build a detector."""
    defaults = DetectorConfig()
    p.add_argument("--backbone", default=defaults.backbone, choices=sorted(BACKBONE_PAIRS),
                   help=f"backbone pair; default: {defaults.backbone}")
    p.add_argument("--image-size", type=int, default=defaults.image_size,
                   help=f"model resolution in px, a multiple of 16; default: {defaults.image_size}")
    p.add_argument("--steps", type=int, default=defaults.steps,
                   help=f"training steps; fewer is faster and rougher; default: {defaults.steps}")
    p.add_argument("--views", type=int, default=defaults.views,
                   help=f"augmented training views in all; default: {defaults.views}")
    p.add_argument("--rotation", type=float, default=defaults.rotation,
                   help=f"augment with rotations up to this many degrees; 180 for parts that lie "
                        f"at any angle (screws); default: {defaults.rotation:g}")
    p.add_argument("--score", choices=sorted(SCORES), default=defaults.score,
                   help=f"anomaly map: PFM's mapping error and the memory bank's distance "
                        f"(hybrid), or one of them; default: {defaults.score}")


def _config(args: argparse.Namespace, seed: int = DetectorConfig.seed) -> DetectorConfig:
    return DetectorConfig(backbone=args.backbone, image_size=args.image_size, steps=args.steps,
                          views=args.views, rotation=args.rotation, score=args.score, seed=seed)


def _check_output_path(path: Path) -> None:
    if not path.parent.is_dir():
        raise ValueError(f"{path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; give a file name")


def _progress_printer():
    """A fit progress callback that prints a line to stderr per 10 % and per new stage."""
    last = {"decile": -1, "stage": None}

    def report(fraction: float, message: str) -> None:
        decile, stage = int(fraction * 10), message.split(" (")[0]
        if decile != last["decile"] or stage != last["stage"]:
            _err(f"[{fraction:4.0%}] {message}")
            last.update(decile=decile, stage=stage)
    return report


def _write_json(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    tmp.replace(path)


def _err(text: str, end: str = "\n") -> None:
    print(text, end=end, file=sys.stderr, flush=True)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
