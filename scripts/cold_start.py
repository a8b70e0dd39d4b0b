"""Cold start of the real app: seconds from ``python app.py`` to its page being served, then
the first and second fit of a visitor who arrives at once (gradio_client, 8 bottle
references).

    python scripts/cold_start.py                  # 3 starts, medians
    python scripts/cold_start.py --repeats 5 --json cold.json

Each start is a fresh process on a free 127.0.0.1 port; the page counts as served when GET /
answers 200 (polled every 50 ms). The first fit pays for whatever the app had not loaded when
the visitor came (torch and the backbones load, and OpenVINO compiles them and the scoring heads,
in the background once the server is up); the second fit, on the same references, is the
steady state.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def references(n: int = 8) -> list[Path]:
    root = Path(os.environ.get("ANOMALY_DATA_DIR", REPO.parent / "shared" / "data"))
    return sorted((root / "bottle" / "train" / "good").glob("*.png"))[:n]


def one_start(refs: list[Path], timeout: float = 120.0) -> dict:
    from gradio_client import Client, handle_file

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT")}
    log = tempfile.TemporaryFile()
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"app.py exited with {proc.returncode}: {log.read()[-2000:]!r}")
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - started > timeout:
                raise RuntimeError("app.py did not serve its page in time")
            time.sleep(0.05)
        page = time.perf_counter() - started
        client = Client(url, verbose=False)
        client.predict([handle_file(str(p)) for p in refs], api_name="/set_references")
        fits = []
        for _ in range(2):
            t = time.perf_counter()
            client.predict("effnet-lite", False, False, 0.5, True, api_name="/fit")
            fits.append(time.perf_counter() - t)
        client.close()
        return {"page_seconds": page, "first_fit_seconds": fits[0], "second_fit_seconds": fits[1]}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    refs = references()
    runs = []
    for i in range(args.repeats):
        runs.append(one_start(refs))
        print(f"start {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in runs[-1].items()), file=sys.stderr)
    out = {"runs": runs, "load_average_1_5_15": list(os.getloadavg()),
           **{f"median_{k}": statistics.median(r[k] for r in runs) for k in runs[0]}}
    print(json.dumps({k: v for k, v in out.items() if k.startswith("median")}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
