"""One method, one setting, in a fresh process: fit time, predict time and peak memory.

    python -m bench.probe --method knn --category DIR --shots 8 [--seed 0] [--size 256] [--timed 5]

prints one JSON line. Memory is the kernel's count, which sees torch's allocations (tracemalloc
does not): the process's peak resident set (VmHWM in /proc/self/status) is reset to the current
one just before ``fit`` (by writing 5 to /proc/self/clear_refs), after the imports, the backbones
and the images are loaded; after fit and the timed predictions, peak minus that baseline is
what the method needed. (getrusage's ru_maxrss cannot be used in a child process: Linux carries
the parent's peak over fork and exec.) A fresh process per probe keeps one method's peak from
hiding another's.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEMORY_METHOD = ("peak resident set (VmHWM, reset via /proc/self/clear_refs just before fit) of a "
                 "fresh process per probe, minus its resident set at that moment (imports, "
                 "backbones and images already loaded); covers fit + predict of the timed images "
                 "(batch of one)")


def _status_mb(field: str) -> float:
    """A VmRSS/VmHWM-style field of /proc/self/status in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0                       # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident set; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def spread(items: list, n: int) -> list:
    """n items evenly spread over ``items`` (all of them when n >= len(items))."""
    if n >= len(items):
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def probe(method: str, category: Path, shots: int, seed: int = 0, size: int = 320,
          timed: int = 5) -> dict:
    """Fit ``method`` on the protocol's references, predict ``timed`` test images one by one."""
    from anomaly.datasets import discover, reference_paths, test_samples
    from anomaly.image_io import load_image
    from bench.methods import build_method

    cat = discover(category)
    references = [load_image(p) for p in reference_paths(cat, shots, seed)]
    images = [load_image(s.path) for s in spread(test_samples(cat), timed + 1)]
    model = build_method(method, size, seed)
    gc.collect()
    reset = _reset_peak()
    rss_before = _status_mb("VmRSS")
    start = time.perf_counter()
    model.fit(references)
    fit_seconds = time.perf_counter() - start
    model.predict(images[0])                                       # warm-up
    times = []
    for image in images[1:]:
        start = time.perf_counter()
        model.predict(image)
        times.append((time.perf_counter() - start) * 1000.0)
    peak = _status_mb("VmHWM")
    return {"method": method, "runtime": model.runtime, "category": cat.name, "shots": shots, "seed": seed, "image_size": size,
            "fit_seconds": fit_seconds, "predict_ms": statistics.median(times),
            "rss_before_fit_mb": rss_before, "peak_rss_mb": peak, "peak_delta_mb": peak - rss_before,
            # False: the peak could not be reset, so it may come from the imports (an upper bound)
            "peak_reset": reset}


def run_probe(method: str, category: Path, shots: int, seed: int = 0, size: int = 320,
              timed: int = 5, timeout: float = 1800.0, runtime: str | None = None) -> dict:
    """``probe`` in a fresh Python process (this interpreter, the repository on its path), with
    the backbones on ``runtime`` (default: that process's default runtime)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if runtime is not None:
        env["ANOMALY_RUNTIME"] = runtime
    cmd = [sys.executable, "-m", "bench.probe", "--method", method, "--category", str(category),
           "--shots", str(shots), "--seed", str(seed), "--size", str(size), "--timed", str(timed)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"probe {' '.join(cmd[3:])} failed (exit {done.returncode}): " + " | ".join(tail))
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", required=True)
    parser.add_argument("--category", type=Path, required=True)
    parser.add_argument("--shots", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--timed", type=int, default=5)
    args = parser.parse_args(argv)
    print(json.dumps(probe(args.method, args.category, args.shots, args.seed, args.size, args.timed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
