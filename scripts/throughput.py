"""Throughput of folder scoring (``python -m anomaly predict ... --table``): images per second
in one process and on a local Ray instance with 1, 2, ... workers (issue 13).

    python scripts/throughput.py                          # 200 photos, 3 repeats, Ray 1 and 2
    python scripts/throughput.py --images 200 --repeats 3 --workers 1 2 --json tp.json
    python scripts/throughput.py --model part.safetensors

Without --model, a default-config detector is fitted first on sorted(bottle/train/good)[:8]
(``python -m anomaly fit``). The photos are the test images of bottle, magnetic_tile and screw
from ../shared/data (or $ANOMALY_DATA_DIR), taken in turn from each category, each category's
sorted. Every measurement runs the real command in a fresh process, as a user would (so Ray's
start, the model load and the table's writing count), writing a Parquet table; the engines
alternate within each repeat so that a change of machine load touches all of them.

Reported per engine (medians over the repeats): ``end-to-end`` = images / the command's wall
time; ``steady`` = the images after the first 10 % / the time from the 10 % result line to the
last, the rate once everything has started (Ray's rows come a batch at a time, so roughly).
Also the 1-minute load average before each run, and the largest score difference from the
single-process table (the engines must agree).
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ("bottle", "magnetic_tile", "screw")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def data_root() -> Path:
    return Path(os.environ.get("ANOMALY_DATA_DIR", REPO.parent / "shared" / "data"))


def test_photos(root: Path, n: int) -> list[Path]:
    """The first ``n`` of the categories' test photos, taken from each category in turn."""
    pools = [sorted(p for p in (root / c / "test").rglob("*")
                    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES) for c in CATEGORIES]
    photos = [pool[i] for i in range(max(map(len, pools))) for pool in pools if i < len(pool)]
    if len(photos) < n:
        raise SystemExit(f"only {len(photos)} test photos under {root}, asked for {n}")
    return photos[:n]


def anomaly_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "anomaly", *map(str, args)]


def run_predict(model: Path, photos: list[Path], table: Path, engine_args: list[str]) -> dict:
    """One timed ``predict`` run -> wall time, end-to-end and steady rates, load before it."""
    load = os.getloadavg()[0]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(anomaly_command("predict", model, *photos, "--table", table,
                                                *engine_args),
                                stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        stamps = [time.perf_counter() for _ in proc.stdout]     # one line per scored image
        if proc.wait() != 0 or len(stamps) != len(photos):
            log.seek(0)
            raise SystemExit(f"predict {' '.join(engine_args)} failed ({proc.returncode}, "
                             f"{len(stamps)} lines):\n{log.read()[-3000:]}")
        wall = time.perf_counter() - start
    skip = max(1, len(stamps) // 10)            # Ray's rows arrive a batch at a time
    return {"wall_s": wall, "end_to_end_ips": len(photos) / wall,
            "steady_ips": (len(stamps) - skip) / (stamps[-1] - stamps[skip - 1]),
            "load_1min": load}


def max_score_difference(table: Path, reference: Path) -> float:
    import pyarrow.parquet as pq

    a, b = (pq.read_table(t).column("score").to_pylist() for t in (table, reference))
    return max(abs(x - y) for x, y in zip(a, b) if x is not None and y is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="detector file; default: fit one (8 bottle)")
    parser.add_argument("--images", type=int, default=200, help="test photos per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per engine (medians)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="Ray worker counts to measure; default: 1 2")
    parser.add_argument("--json", type=Path, help="also write the runs and medians here")
    args = parser.parse_args()

    root = data_root()
    photos = test_photos(root, args.images)
    work = Path(tempfile.mkdtemp(prefix="throughput-"))
    model = args.model
    if model is None:
        model = work / "bottle8.safetensors"
        refs = sorted(p for p in (root / "bottle" / "train" / "good").iterdir() if p.is_file())[:8]
        print(f"fitting a default-config detector on {len(refs)} bottle photos ...",
              file=sys.stderr)
        subprocess.run(anomaly_command("fit", *refs, "-o", model), check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL)

    engines = {"local": []} | {f"ray-{k}": ["--engine", "ray", "--workers", str(k)]
                               for k in args.workers}
    runs = {name: [] for name in engines}
    tables = {name: work / f"{name}.parquet" for name in engines}
    load_start = os.getloadavg()
    for repeat in range(1, args.repeats + 1):
        for name, engine_args in engines.items():
            run = run_predict(model, photos, tables[name], engine_args)
            runs[name].append(run)
            print(f"[{repeat}/{args.repeats}] {name}: {run['end_to_end_ips']:.2f} images/s "
                  f"end-to-end, {run['steady_ips']:.2f} steady ({run['wall_s']:.1f} s, "
                  f"load {run['load_1min']:.2f})", file=sys.stderr)
    load_end = os.getloadavg()

    rows = []
    for name in engines:
        rows.append({"engine": name, "images": len(photos), "runs": len(runs[name]),
                     **{key: statistics.median(r[key] for r in runs[name])
                        for key in ("end_to_end_ips", "steady_ips", "wall_s")},
                     "load_1min": [round(r["load_1min"], 2) for r in runs[name]],
                     "max_score_diff": max_score_difference(tables[name], tables["local"])})
    print(f"| engine | images/s end-to-end | images/s steady | wall s | load (1 min) before "
          f"each run | max score diff vs local |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['end_to_end_ips']:.2f} | {r['steady_ips']:.2f} | "
              f"{r['wall_s']:.1f} | {', '.join(f'{x:.2f}' for x in r['load_1min'])} | "
              f"{r['max_score_diff']:.1e} |")
    print(f"{len(photos)} photos, {args.repeats} repeats, medians; nproc {os.cpu_count()}; "
          f"load average {load_start[0]:.2f} / {load_start[1]:.2f} / {load_start[2]:.2f} at the "
          f"start, {load_end[0]:.2f} / {load_end[1]:.2f} / {load_end[2]:.2f} at the end")
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "nproc": os.cpu_count(), "model": str(model), "images": len(photos),
            "load_start": load_start, "load_end": load_end, "medians": rows, "runs": runs},
            indent=2) + "\n")


if __name__ == "__main__":
    main()
