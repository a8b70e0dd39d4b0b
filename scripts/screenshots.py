"""Screenshots of the app's main states with headless Chromium (Playwright), for the README.

    python scripts/screenshots.py --out /tmp/anomaly_screens
    ANOMALY_APP_CONFIG='{"steps": 40, "views": 16}' python scripts/screenshots.py   # quicker fit

Starts the app on a free localhost port, clicks "Load example and run it" (brick_wall), and saves
01_start.png, 02_fitting.png (progress bar), 02_fitted.png, 03_results.png, 04_threshold_moved.png and 05_feedback.png (full
page, 1400 px wide) into --out.
"""
import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(port: int, timeout: float = 180.0) -> subprocess.Popen:
    """``python app.py --port PORT`` in the background, returned once it answers HTTP."""
    proc = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"app.py did not answer on port {port} within {timeout:.0f} s")


def set_slider(page, elem_id: str, value: float) -> None:
    """Type ``value`` into a gr.Slider's number box, as a user would."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(f"{value:.4f}")
    box.press("Enter")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/anomaly_screens"))
    parser.add_argument("--example", default="brick_wall")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    app = start_app(port)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#example-btn")
            shot = lambda name: page.screenshot(path=str(args.out / name), full_page=True)
            shot("01_start.png")

            page.locator("#example-choice input").fill(args.example)
            page.keyboard.press("Enter")
            page.click("#example-btn")
            page.wait_for_selector("text=/training mapping networks/", timeout=300_000)
            page.wait_for_timeout(1000)
            shot("02_fitting.png")
            page.wait_for_selector("#fit-summary :text('Fitted on')", timeout=300_000)
            shot("02_fitted.png")
            page.wait_for_selector("#results-summary :text('DEFECT,')", timeout=120_000)
            page.wait_for_timeout(1500)                 # images in the gallery finish loading
            shot("03_results.png")

            scores = [float(s) for s in page.evaluate(
                "() => [...document.querySelectorAll('#results-table [data-col=\"2\"]')]"
                ".map(c => c.innerText.trim())")]
            current = float(page.locator("#threshold input[type=number]").input_value())
            below = [s for s in scores if s <= current]
            lowered = round(max(below) - 0.01, 4) if below else current * 0.9   # one OK flips
            set_slider(page, "threshold", lowered)
            page.wait_for_function("document.querySelector('#results-summary').innerText"
                                   f".includes('{lowered:.4g}')", timeout=60_000)
            page.wait_for_timeout(1500)
            shot("04_threshold_moved.png")

            page.click("#reset-threshold")
            page.wait_for_timeout(1500)
            page.locator("#results-gallery button").first.click()   # the most suspicious image
            page.wait_for_timeout(1000)
            page.click("#mark-defect")
            page.wait_for_selector("#detail-text :text('You marked it defect')", timeout=60_000)
            page.locator("#results-gallery button").last.click()    # the least suspicious one
            page.wait_for_timeout(1000)
            page.click("#mark-good")
            page.wait_for_selector("#label-summary :text('AUROC')", timeout=300_000)
            page.wait_for_timeout(1500)
            shot("05_feedback.png")
            browser.close()
    finally:
        app.terminate()
        app.wait(timeout=30)
    print("\n".join(str(p) for p in sorted(args.out.glob("*.png"))))


if __name__ == "__main__":
    main()
