"""Frame rate of the app's live camera, end to end in headless Chromium with a fake camera (issue 25).

    python scripts/live_fps.py                          # the app's defaults, 20 s of streaming
    python scripts/live_fps.py --seconds 30 --json live.json
    python scripts/live_fps.py --config '{"image_size": 128}'   # $ANOMALY_APP_CONFIG for the fit

Runs the real app in this process on a free loopback port, writes a 640 x 480 .y4m clip of real
bottle photos (../shared/data or $ANOMALY_DATA_DIR: --refs good ones, then a broken one) for
Chromium's fake camera, fits on the same good photos through the page, opens the Live camera
tab, starts the stream and, after --warmup s, measures for --seconds:

- answered frames/s as the browser sees them: new overlays shown in the live view per second;
- the server's time per frame, median ms, in parts: ``decode`` (Gradio's preprocess of the
  frame's JPEG data URL, plus the JPEG decode inside ``InspectionSession.live_frame``),
  ``predict``, ``overlay``, ``encode`` (Gradio's postprocess: the overlay as JPEG into its
  cache), and ``server`` (Gradio's whole call for the frame, the parts included);
- the load average, and the CPU seconds of the server (this process) and of Chromium over the
  measurement: server and browser share the same cores.

Helpers for the tests: ``camera_frame`` (a photo as the fake camera shows it) and ``write_y4m``.
"""
import argparse
import functools
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FRAME_SIZE = (640, 480)                 # (W, H) of the fake camera
CLIP_FPS = 10
HOLD_FRAMES = 5                         # frames each photo stays in view in the clip
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"]
# the times at which the live view showed a new overlay (performance.now(), ms)
WATCH_LIVE_VIEW = """() => {
    window.liveShown = [];
    let last = null;
    const note = () => {
        const img = document.querySelector('#live-view img');
        if (img && img.src && img.src !== last) { last = img.src; window.liveShown.push(performance.now()); }
    };
    new MutationObserver(note).observe(document.querySelector('#live-view'),
                                       {subtree: true, childList: true, attributes: true});
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_camera_args(clip: Path) -> list[str]:
    """Chromium flags: grant the camera without asking, and make it play ``clip`` (looped)."""
    return ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-video-capture={clip}"]


def camera_frame(photo: Path | str) -> Image.Image:
    """A photo as the fake camera shows it: scaled to FRAME_SIZE's height, centred on black."""
    width, height = FRAME_SIZE
    image = Image.open(photo).convert("RGB")
    image = image.resize((round(image.width * height / image.height), height), Image.BILINEAR)
    frame = Image.new("RGB", FRAME_SIZE)
    frame.paste(image, ((width - image.width) // 2, 0))
    return frame


def write_y4m(frames: list[Image.Image], path: Path, fps: int = CLIP_FPS) -> Path:
    """RGB frames (all one size, even sides) -> a .y4m clip at ``fps``, 4:2:0.

    The values are BT.601 limited range (Y 16-235), y4m's default and what Chromium's fake
    camera assumes: its frames then come back within about one level of the photos."""
    width, height = frames[0].size
    with open(path, "wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for frame in frames:
            y, cb, cr = (np.asarray(c, dtype=np.float32) for c in frame.convert("YCbCr").split())
            out.write(b"FRAME\n")
            out.write(np.rint(16 + y * 219 / 255).astype(np.uint8).tobytes())       # (H, W)
            for c in (cb, cr):                                       # (H/2, W/2): 2 x 2 means
                half = c.reshape(height // 2, 2, width // 2, 2).mean(axis=(1, 3))
                out.write(np.rint(128 + (half - 128) * 224 / 255).astype(np.uint8).tobytes())
    return path


def bottle_clip(data: Path, n_refs: int, folder: Path) -> tuple[list[Path], Path]:
    """(good photos framed as the camera shows them, written as PNGs; the .y4m clip: each of them
    for HOLD_FRAMES frames, then a broken bottle for as long as all of them; each frame with
    its number, 0-15, as the grey level of a 16 px square in the black corner)."""
    goods = sorted((data / "bottle" / "train" / "good").iterdir())[:n_refs]
    broken = sorted((data / "bottle" / "test" / "broken_large").iterdir())[0]
    refs = []
    for photo in goods:
        refs.append(folder / f"good_{photo.stem}.png")
        camera_frame(photo).save(refs[-1])
    frames = [camera_frame(p) for p in goods for _ in range(HOLD_FRAMES)]
    frames += [camera_frame(broken) for _ in range(HOLD_FRAMES * len(goods))]
    for i, frame in enumerate(frames):   # no two alike, as from a real camera (a repeated
        frame.paste((i % 16,) * 3, (0, 0, 16, 16))   # overlay has the same URL: not seen as new)
    return refs, write_y4m(frames, folder / "bottles.y4m")


def start_live(page, url: str, refs: list[Path], fit_timeout_ms: int = 300_000) -> None:
    """Fit on ``refs`` through the page, open the Live camera tab and start the stream."""
    page.goto(url)
    page.locator("#ref-files input[type=file]").set_input_files([str(p) for p in refs])
    page.wait_for_selector(f"#ref-count :text('{len(refs)} good images')", timeout=120_000)
    page.click("#fit-btn")
    page.wait_for_selector(f"#fit-summary :text('Fitted on {len(refs)} good images')",
                           timeout=fit_timeout_ms)
    page.get_by_role("tab", name="Live camera").click()
    page.locator("#live-camera").get_by_text("Click to Access Webcam").click()
    page.locator("#live-camera button", has_text="Record").click(timeout=60_000)


class Timings:
    """Durations (s) of the server's parts of a frame, recorded while ``on``."""

    def __init__(self):
        self.on, self.parts, self.lock = False, {}, threading.Lock()

    def add(self, part: str, seconds: float) -> None:
        if self.on:
            with self.lock:
                self.parts.setdefault(part, []).append(seconds)

    def timed(self, part: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(part, time.perf_counter() - start)
        return wrapper


def instrument(app, timings: Timings) -> None:
    """Time the live frame's parts inside the running app (this process)."""
    from anomaly import session

    timings_of_session = {}

    def live_frame(self, image, alpha=0.5, outline=True):
        timings_of_session[threading.get_ident()] = {"predict": 0.0, "overlay": 0.0}
        start = time.perf_counter()
        answer = real_live_frame(self, image, alpha, outline)
        inner = timings_of_session.pop(threading.get_ident())
        if answer is not None and answer.score is not None:
            timings.add("predict", inner["predict"])
            timings.add("overlay", inner["overlay"])
            timings.add("decode_in_session", time.perf_counter() - start - sum(inner.values()))
        return answer

    def part(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                inner = timings_of_session.get(threading.get_ident())
                if inner is not None:
                    inner[name] += time.perf_counter() - start
        return wrapper

    real_live_frame = session.InspectionSession.live_frame
    session.InspectionSession.live_frame = live_frame
    session._score = part("predict", session._score)
    session.InspectionSession.overlay = part("overlay", session.InspectionSession.overlay)
    app.live_camera.preprocess = timings.timed("decode_in_gradio", app.live_camera.preprocess)
    app.live_view.postprocess = timings.timed("encode", app.live_view.postprocess)
    live_fn = next(fn for fn in app.demo.fns.values() if fn.connection == "stream")
    real_process_api = app.demo.process_api

    async def process_api(block_fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return await real_process_api(block_fn, *args, **kwargs)
        finally:
            if block_fn is live_fn:
                timings.add("server", time.perf_counter() - start)
    app.demo.process_api = process_api


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (gone ones count 0)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError):
            pass
    return total


def chromium_pids(clip: Path) -> list[int]:
    """The browser started with this clip as its camera and all its descendants."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError):
            pass
    roots = set()
    for pid in parents:
        try:
            if str(clip) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                roots.add(pid)
        except OSError:
            pass

    def descends(pid):
        while pid in parents:
            if pid in roots:
                return True
            pid = parents[pid]
        return False
    return [pid for pid in parents if descends(pid)]


def measure(args) -> dict:
    from playwright.sync_api import sync_playwright

    data = Path(os.environ.get("ANOMALY_DATA_DIR", REPO.parent / "shared" / "data"))
    if args.config is not None:
        os.environ["ANOMALY_APP_CONFIG"] = args.config
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    import app

    timings = Timings()
    instrument(app, timings)
    port = free_port()
    app.launch(port=port, prevent_thread_lock=True, quiet=True)
    with tempfile.TemporaryDirectory(prefix="live-fps-") as folder, sync_playwright() as p:
        refs, clip = bottle_clip(data, args.refs, Path(folder))
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=CHROMIUM_ARGS + fake_camera_args(clip))
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            start_live(page, f"http://127.0.0.1:{port}/", refs)
            page.wait_for_selector("#live-view img", timeout=120_000)
            page.evaluate(WATCH_LIVE_VIEW)
            time.sleep(args.warmup)
            chromium = chromium_pids(clip)
            page.evaluate("() => { window.liveShown = []; }")
            timings.on = True
            load_before, wall = os.getloadavg(), time.perf_counter()
            server_cpu = resource.getrusage(resource.RUSAGE_SELF)
            browser_cpu = cpu_seconds(chromium)
            time.sleep(args.seconds)
            timings.on = False
            shown = page.evaluate("() => window.liveShown")
            wall = time.perf_counter() - wall
            after = resource.getrusage(resource.RUSAGE_SELF)
            browser_cpu = cpu_seconds(chromium) - browser_cpu
            status = page.inner_text("#live-status")
        finally:
            browser.close()
            app.demo.close()
    parts = dict(timings.parts)
    decode = [a + b for a, b in zip(parts.pop("decode_in_gradio", []), parts.pop("decode_in_session", []))]
    medians = {name: round(1000 * statistics.median(values), 1)
               for name, values in {"decode": decode, **parts}.items() if values}
    answered = (len(shown) - 1) / ((shown[-1] - shown[0]) / 1000) if len(shown) > 1 else 0.0
    return {
        "config": args.config or "defaults", "refs": len(refs), "seconds": round(wall, 1),
        "answered_fps": round(answered, 2), "overlays_shown": len(shown),
        "server_ms_median": medians, "frames_timed": len(timings.parts.get("server", [])),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_cores": os.cpu_count(),
        "server_cpu_s": round(after.ru_utime + after.ru_stime - server_cpu.ru_utime - server_cpu.ru_stime, 1),
        "chromium_cpu_s": round(browser_cpu, 1), "last_status": status,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement (default 20)")
    parser.add_argument("--warmup", type=float, default=5.0, help="streaming before it (default 5)")
    parser.add_argument("--refs", type=int, default=8, help="good bottle photos to fit on (default 8)")
    parser.add_argument("--config", help="JSON DetectorConfig overrides ($ANOMALY_APP_CONFIG); "
                                         "default: the app's defaults")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    out = measure(args)
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
