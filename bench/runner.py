"""The benchmark run: every method on the same references and test images, the speed floor,
memory probes and the scaling sweep, collected into one JSON-ready dict.

Accuracy and timing run in this process, methods one after the other on the same PIL images;
memory and the scaling sweep run in fresh processes (``bench.probe``) so that one method's
peak cannot hide another's.
"""
from __future__ import annotations

import datetime
import gc
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from anomaly import metrics
from anomaly.backbones import load_pair
from anomaly.runtime import RUNTIMES, default_precision, default_runtime
from anomaly.datasets import Category, discover, load_mask, reference_paths, test_samples
from anomaly.detector import FIT_PRECISION, DetectorConfig, PFMDetector, to_tensor
from anomaly.image_io import load_image

from .methods import LABELS, METHODS, RUNTIME_METHODS, anomalib_version, build_method, views_of
from .probe import MEMORY_METHOD, run_probe, spread

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
MEAN_KEYS = ("image_auroc", "pixel_auroc", "aupro", "fit_seconds", "predict_ms", "maps_ms_per_image")


@dataclass
class BenchConfig:
    """What to run; defaults are the issue's full benchmark."""

    categories: list[Path]
    shots: list[int] = field(default_factory=lambda: [1, 4, 8])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    runtimes: list[str] = field(default_factory=lambda: list(RUNTIMES))   # for RUNTIME_METHODS
    image_size: int = DetectorConfig.image_size                          # the app's default
    limit_test: int | None = None       # this many test images per category (half good), or all
    timed_images: int = 10              # predict calls (batch of one) per run; median reported
    predict_floor_repeats: int = 20
    fit_floor_repeats: int = 3
    memory: bool = True                 # a fresh-process probe per method, category and shots
    scaling_refs: list[int] = field(default_factory=lambda: [1, 4, 8, 16, 32, 64])
    scaling_sizes: list[int] = field(default_factory=lambda: [256, 320, 384, 512])
    scaling_methods: list[str] = field(default_factory=lambda: ["pfm", "knn"])
    scaling_shots: int = 8              # references for the input-size sweep
    scaling_timed: int = 5

    def __post_init__(self) -> None:
        if not self.categories:
            raise ValueError("no category folders given")
        for name in [*self.methods, *self.scaling_methods]:
            if name not in METHODS:
                raise ValueError(f"method {name!r} unknown; choose from {', '.join(METHODS)}")
        if not self.runtimes or not set(self.runtimes) <= set(RUNTIMES):
            raise ValueError(f"--runtimes {self.runtimes}; choose from {', '.join(RUNTIMES)}")
        if not self.shots or min(self.shots) < 1:
            raise ValueError(f"--shots {self.shots}; every shot count must be 1 or more")
        if not self.seeds or min(self.seeds) < 0:
            raise ValueError(f"--seeds {self.seeds}; seeds must be 0 or more")
        if self.limit_test is not None and self.limit_test < 2:
            raise ValueError(f"--limit-test {self.limit_test}; needs at least 2 (one good, one defective)")
        if self.timed_images < 1:
            raise ValueError(f"--timed-images {self.timed_images}; must be 1 or more")
        for size in [self.image_size, *self.scaling_sizes]:
            DetectorConfig(image_size=size)                    # same size rule as the app
        if self.scaling_refs and min(self.scaling_refs) < 1:
            raise ValueError(f"--scaling-refs {self.scaling_refs}; must be 1 or more")


@dataclass
class CategoryData:
    """One category's test set, loaded once and shared by every method."""

    category: Category
    images: list                        # RGB PIL images
    labels: np.ndarray                  # (N,) bool, True = defective
    masks: np.ndarray | None            # (N, S, S) bool, None unless every defect has a mask


def select_samples(samples: list, limit: int | None) -> list:
    """All samples, or ``limit`` of them: half good, half defective, each evenly spread."""
    if limit is None or limit >= len(samples):
        return samples
    good = [s for s in samples if not s.label]
    bad = [s for s in samples if s.label]
    n_good = min(len(good), max(1, limit // 2))
    return spread(bad, limit - n_good) + spread(good, n_good)


def load_category(category: Category, size: int, limit: int | None) -> CategoryData:
    samples = select_samples(test_samples(category), limit)
    labels = np.array([s.label for s in samples])
    if labels.all() or not labels.any():
        raise ValueError(f"{category.name}: the test set needs good and defective images")
    masks = None
    if all(s.mask_path is not None for s in samples if s.label):
        masks = np.zeros((len(samples), size, size), bool)
        for i, s in enumerate(samples):
            if s.label:
                masks[i] = load_mask(s.mask_path, size)
    else:
        log.warning("%s: some defective images have no mask; pixel metrics skipped", category.name)
    return CategoryData(category, [load_image(s.path) for s in samples], labels, masks)


def evaluate(method_name: str, data: CategoryData, references: list, shots: int, seed: int,
             size: int, timed_images: int, runtime: str = "torch") -> dict:
    """Fit one method on ``references`` with its backbones on ``runtime``, score the whole test
    set, time predict -> one row."""
    method = build_method(method_name, size, seed, runtime)
    start = time.perf_counter()
    method.fit(references)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    maps, scores = method.maps(data.images)                             # (N, S, S), (N,)
    maps_ms = (time.perf_counter() - start) * 1000.0 / len(data.images)
    row = {"method": method_name, "runtime": runtime, "category": data.category.name, "shots": shots,
           "seed": seed, "image_size": size, "n_test": len(data.images), "image_auroc": None,
           "pixel_auroc": None, "aupro": None, "note": None}
    if not (np.isfinite(scores).all() and np.isfinite(maps).all()):
        # e.g. anomalib's PaDiM on one reference: its covariance divides by (k - 1) = 0
        row["note"] = f"non-finite scores with {shots} reference(s); no accuracy metrics"
        log.warning("%s %s shots=%d seed=%d: %s", method_name, data.category.name, shots, seed, row["note"])
    else:
        row["image_auroc"] = metrics.image_auroc(scores.astype(np.float64), data.labels)
    if data.masks is not None and row["note"] is None:
        row["pixel_auroc"] = metrics.pixel_auroc(maps, data.masks)
        row["aupro"] = metrics.aupro(maps, data.masks)
    timed = spread(data.images, timed_images + 1)
    method.predict(timed[0])                                           # warm-up
    times = []
    for image in timed[1:] or timed:
        start = time.perf_counter()
        method.predict(image)
        times.append((time.perf_counter() - start) * 1000.0)
    row.update(fit_seconds=fit_seconds, predict_ms=statistics.median(times), maps_ms_per_image=maps_ms,
               runtime=_ran_on(method.runtime, runtime, method_name))
    return row


def _ran_on(actual: str, requested: str, what: str) -> str:
    """The runtime that really ran (a failed export falls back to PyTorch), warned about."""
    if actual != requested:
        log.warning("%s: asked for %s, ran in %s (see the log above)", what, requested, actual)
    return actual


def speed_floor(references: list, test_image, config: DetectorConfig, fit_repeats: int,
                predict_repeats: int, runtime: str) -> dict:
    """PFM's fit and predict against the floor: both backbones' forward pass, on the same
    ``runtime``, over the training views PFM's fit builds (in its chunks and precision) and on
    one image (in the predictions' precision).

    PFM and its floor are timed in alternation, so both see the same load on a shared machine;
    ratios are medians over repeats. PFM's predict is the app's: a PIL image in, a map at the
    image's own size out; the floor starts from the resized tensor (resize_ms is reported apart).
    """
    extract = load_pair(config.backbone, runtime).features             # what the fit runs, in chunks
    views = views_of(references, config)                               # (V, 3, S, S)
    detector = PFMDetector(config, runtime=runtime)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    fit_floor, fit = [], []
    for _ in range(fit_repeats):
        fit_floor.append(timed(lambda: extract(views, precision=FIT_PRECISION)))
        fit.append(timed(lambda: detector.fit(references)))
    one, _ = to_tensor([test_image], config.image_size, config.resize)   # (1, 3, S, S)
    extract(one)                                                       # warm-up
    detector.predict(test_image)
    floor, predict, resize = [], [], []
    for _ in range(predict_repeats):
        floor.append(timed(lambda: extract(one)))
        predict.append(timed(lambda: detector.predict(test_image)))
        resize.append(timed(lambda: to_tensor([test_image], config.image_size, config.resize)))
    out = {"runtime": runtime, "views": int(views.shape[0]), "fit_floor_seconds": statistics.median(fit_floor),
           "pfm_fit_seconds": statistics.median(fit), "predict_floor_ms": statistics.median(floor) * 1e3,
           "pfm_predict_ms": statistics.median(predict) * 1e3, "resize_ms": statistics.median(resize) * 1e3}
    out["runtime"] = _ran_on(detector.runtime, runtime, "speed floor")
    out["fit_ratio"] = out["pfm_fit_seconds"] / out["fit_floor_seconds"]
    out["predict_ratio"] = out["pfm_predict_ms"] / out["predict_floor_ms"]
    return out


def summarise(rows: Sequence[dict], memory: Sequence[dict] = ()) -> list[dict]:
    """Rows -> one row per (method, runtime, category, shots): means over seeds, plus the memory
    probe (which runs on the first of the benchmark's runtimes)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row.get("runtime", "torch"), row["category"], row["shots"]),
                          []).append(row)
    probes = {(m["method"], m.get("runtime", "torch"), m["category"], m["shots"]): m for m in memory}
    out = []
    for (method, runtime, category, shots), members in groups.items():
        s = {"method": method, "runtime": runtime, "category": category, "shots": shots, "seeds": len(members)}
        for key in MEAN_KEYS:
            values = [r[key] for r in members if r.get(key) is not None]
            s[key] = float(np.mean(values)) if values else None
        aurocs = [r["image_auroc"] for r in members if r["image_auroc"] is not None]
        s["image_auroc_std"] = float(np.std(aurocs)) if aurocs else None
        s["notes"] = sorted({r["note"] for r in members if r.get("note")})
        probe = probes.get((method, runtime, category, shots))
        s["peak_delta_mb"] = probe["peak_delta_mb"] if probe else None
        s["peak_rss_mb"] = probe["peak_rss_mb"] if probe else None
        out.append(s)
    return sorted(out, key=lambda s: (s["category"], s["shots"], METHODS.index(s["method"]),
                                      s["runtime"] != default_runtime()))


def machine() -> dict:
    """Where the numbers were measured."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    openvino = openvino_version()
    return {"nproc": os.cpu_count(), "cpu_model": model, "torch_threads": torch.get_num_threads(),
            "load_average_1_5_15": list(os.getloadavg()),    # other work on the machine skews timings
            "python": platform.python_version(), "torch": torch.__version__,
            "anomalib": anomalib_version(), "openvino": openvino, "precision": default_precision() if openvino else None,
            "platform": platform.platform()}


def openvino_version() -> str | None:
    """The installed OpenVINO's version, None where it is not installed."""
    try:
        from importlib.metadata import version
        return version("openvino")
    except ImportError:
        return None


def run_benchmark(config: BenchConfig, progress: Progress = lambda message: None,
                  on_update: Callable[[dict], None] = lambda results: None) -> dict:
    """Run everything in ``config`` -> results dict (meta, runs, summary, memory, floor, ...).

    ``on_update(results)`` is called after every run so that a caller can save partial results.
    """
    categories = [discover(d) for d in config.categories]
    for category in categories:              # fail before an hour of work, not in the middle
        for shots in config.shots:
            reference_paths(category, shots, max(config.seeds))
    for shots in [*config.scaling_refs, *([config.scaling_shots] if config.scaling_sizes else [])]:
        reference_paths(categories[0], shots, 0)
    results = {"meta": {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                        "machine": machine(), "config": _jsonable(asdict(config)),
                        "command": " ".join(sys.argv), "memory_method": MEMORY_METHOD,
                        "default_runtime": default_runtime(),
                        "labels": LABELS},
               "runs": [], "summary": [], "memory": [], "floor": [], "scaling": []}
    size, started = config.image_size, time.perf_counter()

    def update() -> None:
        results["summary"] = summarise(results["runs"], results["memory"])
        on_update(results)

    runs = [(name, runtime) for name in config.methods
            for runtime in (config.runtimes if name in RUNTIME_METHODS else ["torch"])]
    total = len(categories) * len(config.shots) * len(config.seeds) * len(runs)
    for category in categories:
        data = load_category(category, size, config.limit_test)
        for shots in config.shots:
            for seed in config.seeds:
                references = [load_image(p) for p in reference_paths(category, shots, seed)]
                for name, runtime in runs:
                    row = evaluate(name, data, references, shots, seed, size, config.timed_images, runtime)
                    results["runs"].append(row)
                    progress(f"[{len(results['runs'])}/{total}] {category.name} shots={shots} seed={seed} "
                             f"{name} ({runtime}): image {_f(row['image_auroc'])} pixel {_f(row['pixel_auroc'])} "
                             f"aupro {_f(row['aupro'])} fit {row['fit_seconds']:.1f} s "
                             f"predict {row['predict_ms']:.0f} ms ({time.perf_counter() - started:.0f} s)")
                    update()
                    gc.collect()
        if "pfm" in config.methods:                 # the speed floor, at the largest shot count
            shots = max(config.shots)
            references = [load_image(p) for p in reference_paths(category, shots, 0)]
            for runtime in config.runtimes:
                floor = speed_floor(references, data.images[0], DetectorConfig(image_size=size),
                                    config.fit_floor_repeats, config.predict_floor_repeats, runtime)
                results["floor"].append({"category": category.name, "shots": shots, **floor})
                progress(f"{category.name} ({runtime}): fit {floor['pfm_fit_seconds']:.1f} s / floor "
                         f"{floor['fit_floor_seconds']:.2f} s over {floor['views']} views = "
                         f"{floor['fit_ratio']:.2f}; predict {floor['pfm_predict_ms']:.0f} ms / floor "
                         f"{floor['predict_floor_ms']:.0f} ms = {floor['predict_ratio']:.2f}")
    if config.memory:
        for category in categories:
            for shots in config.shots:
                for name in config.methods:
                    probe = run_probe(name, category.root, shots, 0, size, config.scaling_timed,
                                      runtime=config.runtimes[0])
                    results["memory"].append(probe)
                    progress(f"memory {category.name} shots={shots} {name}: peak +{probe['peak_delta_mb']:.0f} MiB "
                             f"(RSS {probe['peak_rss_mb']:.0f} MiB)")
                    update()
    points = [("references", k, k, size) for k in config.scaling_refs]
    points += [("input size", s, config.scaling_shots, s) for s in config.scaling_sizes]
    for axis, value, shots, side in points:
        for name in config.scaling_methods:
            probe = run_probe(name, categories[0].root, shots, 0, side, config.scaling_timed,
                              runtime=config.runtimes[0])
            results["scaling"].append({"axis": axis, "value": value, **probe})
            progress(f"scaling {axis}={value} {name}: fit {probe['fit_seconds']:.1f} s, predict "
                     f"{probe['predict_ms']:.0f} ms, peak +{probe['peak_delta_mb']:.0f} MiB")
            update()
    results["meta"]["seconds"] = time.perf_counter() - started
    results["meta"]["load_average_at_end"] = list(os.getloadavg())
    results["summary"] = summarise(results["runs"], results["memory"])
    return results


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
