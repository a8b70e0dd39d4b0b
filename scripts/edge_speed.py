"""Speed of an exported detector on the line (``anomaly.edge``) next to the app's detector.

    python scripts/edge_speed.py                               # fit on 8 bottles, 10 images, 5 rounds
    python scripts/edge_speed.py --model part.safetensors --images 10 --rounds 5 --json edge.json

Without --model, a default-config detector is fitted first on sorted(bottle/train/good)[:8]
from ../shared/data (or $ANOMALY_DATA_DIR). The detector is exported to ONNX (``--onnx``, default a
temporary file). Timed on the same decoded test images (bottle, magnetic_tile, screw in turn):

- ``app``: ``PFMDetector.predict(image, resolution="model")`` in this process (its default
  runtime and precision: OpenVINO, bfloat16 where the CPU has it natively, else float32);
- ``openvino`` and ``onnxruntime``: ``EdgeDetector.predict(image)`` (Pillow resize included)
  and ``EdgeDetector.run`` alone (the graph), each in its own worker process that never imports
  torch, on ``--threads`` threads (default: all cores), float32.

The three alternate round by round, one at a time (the others wait, idle), each round timing
every image once after one untimed call per image; reported: medians over all timed calls,
the largest score difference from the app's, the ONNX file's size and the 1-minute load
average before each round.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CATEGORIES = ("bottle", "magnetic_tile", "screw")
RUNTIMES = ("openvino", "onnxruntime")


def data_root() -> Path:
    return Path(os.environ.get("ANOMALY_DATA_DIR", REPO.parent / "shared" / "data"))


def test_images(n: int) -> list[Path]:
    """n test photos, taken in turn from each category (each category's sorted)."""
    lists = [sorted(p for p in (data_root() / c / "test").rglob("*") if p.is_file()) for c in CATEGORIES]
    return [lists[i % len(lists)][i // len(lists)] for i in range(n)]


def _decoded(paths):
    from anomaly.image_io import load_image

    return [load_image(p) for p in paths]


# ---------------------------------------------------------------------------- worker (no torch)


def worker(runtime: str, onnx_path: str, threads: int) -> None:
    """Read {"images": [...]} lines on stdin, answer {"predict_ms", "run_ms", "scores"} lines."""
    from anomaly.edge import EdgeDetector

    detector = EdgeDetector(onnx_path, runtime, threads)
    cache = {}
    for line in sys.stdin:
        paths = json.loads(line)["images"]
        images = [cache.setdefault(p, _decoded([p])[0]) for p in paths]
        for im in images:                                   # untimed: first calls, caches
            detector.predict(im)
        predict_ms, run_ms, scores = [], [], []
        for im in images:
            start = time.perf_counter()
            result = detector.predict(im)
            predict_ms.append((time.perf_counter() - start) * 1000.0)
            scores.append(result.score)
        for im in images:
            pixels, content = detector.prepare(im)
            start = time.perf_counter()
            detector.run(pixels, content)
            run_ms.append((time.perf_counter() - start) * 1000.0)
        assert "torch" not in sys.modules
        print(json.dumps({"predict_ms": predict_ms, "run_ms": run_ms, "scores": scores}), flush=True)


# ---------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a saved detector; default: fit one on 8 bottles")
    parser.add_argument("--onnx", type=Path, help="where to write the export; default: a temporary file")
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--worker", nargs=2, metavar=("RUNTIME", "ONNX"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker[0], args.worker[1], args.threads)

    from anomaly import DetectorConfig, PFMDetector
    from anomaly.export import export_onnx
    from anomaly.runtime import default_precision

    if args.model:
        detector = PFMDetector.load(args.model)
    else:
        detector = PFMDetector(DetectorConfig())
        detector.fit(sorted((data_root() / "bottle" / "train" / "good").iterdir())[:8])
    tmp = tempfile.TemporaryDirectory()
    onnx_path = args.onnx or Path(tmp.name) / "part.onnx"
    export_onnx(detector, onnx_path)
    paths = [str(p) for p in test_images(args.images)]
    images = _decoded(paths)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    workers = {rt: subprocess.Popen([sys.executable, __file__, "--worker", rt, str(onnx_path),
                                     "--threads", str(args.threads)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, env=env) for rt in RUNTIMES}
    results = {name: {"predict_ms": [], "run_ms": [], "scores": []} for name in ("app", *RUNTIMES)}
    loads = []
    for _ in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for im in images:                                   # untimed, as the workers do
            detector.predict(im, resolution="model")
        for im in images:
            start = time.perf_counter()
            pred = detector.predict(im, resolution="model")
            results["app"]["predict_ms"].append((time.perf_counter() - start) * 1000.0)
            results["app"]["scores"].append(pred.pred_score)
        for rt, proc in workers.items():
            time.sleep(0.5)                                 # this process' OpenMP threads stop spinning
            proc.stdin.write(json.dumps({"images": paths}) + "\n")
            proc.stdin.flush()
            answer = json.loads(proc.stdout.readline())
            for key in answer:
                results[rt][key].extend(answer[key])
    for proc in workers.values():
        proc.stdin.close()
        proc.wait(timeout=60)

    app_scores = results["app"]["scores"]
    summary = {"onnx_mb": round(onnx_path.stat().st_size / 1e6, 2), "threads": args.threads,
               "app_precision": default_precision(), "images": len(paths), "rounds": args.rounds,
               "load_1min": loads, "cpu_count": os.cpu_count()}
    for name, r in results.items():
        summary[name] = {"predict_ms": round(statistics.median(r["predict_ms"]), 2),
                         "max_score_rel_diff_vs_app": max(abs(a - b) / abs(b) for a, b in zip(r["scores"], app_scores))}
        if r["run_ms"]:
            summary[name]["graph_ms"] = round(statistics.median(r["run_ms"]), 2)
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
