"""End to end: the real app in a subprocess on a free localhost port, driven by headless Chromium
(Playwright) like a user, and by gradio_client like a script.

Fits use a small config via $ANOMALY_APP_CONFIG so the whole module runs in a few minutes.
"""
import csv
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile

import pytest

from anomaly.calibration import VERDICTS
from anomaly.examples import example_sets
from anomaly.session import CONFIG_ENV
from conftest import REPO

pytestmark = pytest.mark.slow

FAST_CONFIG = {"steps": 30, "views": 8, "image_size": 128}
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"]
FIT_TIMEOUT_MS = 240_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """URL of `python app.py` running on a free port (stopped after the module)."""
    port = free_port()
    env = {**os.environ, CONFIG_ENV: json.dumps(FAST_CONFIG)}
    env.pop("GRADIO_SERVER_NAME", None)
    env.pop("GRADIO_SERVER_PORT", None)
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("app.py did not answer within 180 s")
            time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def brick():
    return example_sets()["brick_wall"]


def read_table(page) -> dict[str, list[str]]:
    """Rows of the results table: image name -> [verdict, score, score 0-1, mark]."""
    cells = page.evaluate("""() => [...document.querySelectorAll('#results-table [role=gridcell]')]
        .map(c => [Number(c.dataset.row), Number(c.dataset.col), c.innerText.trim()])""")
    rows: dict[int, dict[int, str]] = {}
    for row, col, text in cells:                  # a virtualised grid: cells carry row and column
        rows.setdefault(row, {})[col] = text
    return {r[0]: [r.get(c, "") for c in range(1, 5)] for r in rows.values() if r.get(0)}


def expected_verdict(raw: str, threshold: float, defect_threshold: float) -> str:
    """The verdict of a score shown with 4 decimals (anomaly.calibration.verdict's rule)."""
    from anomaly.calibration import verdict

    return verdict(float(raw), threshold, defect_threshold)


def shown_thresholds(page) -> tuple[float, float]:
    """(threshold, DEFECT threshold) as the results summary states them."""
    text = page.inner_text("#results-summary")
    return (float(text.split("at threshold ")[1].split()[0]),
            float(text.split("DEFECT above ")[1].split(")")[0]))


def set_threshold(page, value: float) -> None:
    """Type a threshold into the slider's number box and wait until the page shows it."""
    box = page.locator("#threshold input[type=number]")
    box.fill(f"{value:.4f}")
    box.press("Enter")
    page.wait_for_function(
        "t => document.querySelector('#results-summary').innerText.includes('threshold ' + t)",
        arg=f"{float(f'{value:.4f}'):.4g}", timeout=60_000)


def percent_of(rate_text: str) -> float:
    """The percentage in the expected-rate line ("...: 5.0 % expected. ...")."""
    return float(rate_text.split("):")[1].split("%")[0])


@pytest.mark.browser
def test_browser_workflow(server, brick, tmp_path):
    from playwright.sync_api import sync_playwright

    defect = next(p for p in brick.tests if p.name == "defect_patch.png")
    good = next(p for p in brick.tests if p.name == "good_01.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server)

            page.click("#fit-btn")                                    # nothing uploaded yet
            page.wait_for_selector("text=Add at least one good reference image", timeout=60_000)

            not_an_image = tmp_path / "notes.png"
            not_an_image.write_text("this is text, not a picture\n")
            page.locator("#ref-files input[type=file]").set_input_files(
                [str(p) for p in brick.references] + [str(not_an_image)])
            page.wait_for_selector("#ref-count :text('8 good images')", timeout=60_000)
            page.wait_for_selector("text=notes.png: not an image file", timeout=30_000)
            page.locator("#ref-files td[aria-label='ref_08.png'] ~ td button").click()   # remove
            page.wait_for_selector("#ref-count :text('7 good images')", timeout=60_000)
            page.click("#fit-btn")
            page.wait_for_selector("#fit-summary :text('Fitted on 7 good images')",
                                   timeout=FIT_TIMEOUT_MS)
            calibrated = float(page.locator("#threshold input[type=number]").input_value())
            fit_summary = page.inner_text("#fit-summary")
            assert "False-alarm budget 5 %" in fit_summary and "DEFECT above" in fit_summary
            assert page.locator("#budget input").input_value() == "5 %"
            rate = page.inner_text("#expected-rate")
            assert "About 1 in 20 good parts will be flagged (REVIEW or DEFECT): 5.0 %" in rate, rate

            page.locator("#test-files input[type=file]").set_input_files([str(defect), str(good)])
            page.wait_for_selector("#results-summary :text('2 images')", timeout=120_000)
            table = read_table(page)
            assert set(table) == {defect.name, good.name}
            score = {name: float(row[1]) for name, row in table.items()}
            threshold, defect_threshold = shown_thresholds(page)
            assert threshold == pytest.approx(calibrated, rel=1e-3) and defect_threshold >= threshold
            for name, (verdict, raw, norm, _) in table.items():
                if abs(float(raw) - threshold) > 1e-3 and abs(float(raw) - defect_threshold) > 1e-3:
                    assert verdict == expected_verdict(raw, threshold, defect_threshold)
                assert 0.0 <= float(norm) <= 1.0
            assert score[defect.name] > score[good.name]
            box = page.locator("#threshold input[type=number]").input_value()
            assert len(box.split(".")[-1]) <= 4, box                  # rounded to the slider's step
            captions = page.evaluate("""() => [...document.querySelectorAll(
                '#results-gallery .caption-label')].map(c => [c.innerText, c.scrollWidth <= c.clientWidth])""")
            assert len(captions) == 2 and all(whole for _, whole in captions), captions   # not cut off
            page.locator("#test-files input[type=file]").set_input_files([str(not_an_image)])
            page.wait_for_selector("text=skipped notes.png: not an image file", timeout=60_000)
            assert read_table(page) == table and "Traceback" not in page.content()

            middle = (score[defect.name] + score[good.name]) / 2
            set_threshold(page, middle)
            table = read_table(page)
            flagged = table[defect.name][0]
            assert flagged in ("REVIEW", "DEFECT") and table[good.name][0] == "OK"
            assert (f"{int(flagged == 'DEFECT')} DEFECT, {int(flagged == 'REVIEW')} REVIEW, 1 OK"
                    in page.inner_text("#results-summary"))
            set_threshold(page, score[defect.name] * 1.05)          # above both: the defect flips
            table = read_table(page)
            assert (table[defect.name][0], table[good.name][0]) == ("OK", "OK")
            assert "0 DEFECT, 0 REVIEW, 2 OK" in page.inner_text("#results-summary")
            assert [float(row[1]) for row in table.values()] == pytest.approx(
                [score[n] for n in table], abs=1e-4)                  # scores do not move
            high_rate = page.inner_text("#expected-rate")
            assert high_rate != rate and "will be flagged (REVIEW or DEFECT)" in high_rate
            assert percent_of(high_rate) < 5.0                      # a higher threshold flags fewer

            page.click("#export-zip")
            link = page.locator("#zip-file a").first
            link.wait_for(timeout=60_000)
            with page.expect_download() as download:
                link.click()
            path = tmp_path / "results.zip"
            download.value.save_as(path)

            # the good part just above the threshold: REVIEW; REVIEW first in the table
            set_threshold(page, score[good.name] - 0.0005)
            table = read_table(page)
            assert table[good.name][0] == "REVIEW", table
            page.locator("#table-order label", has_text="REVIEW first").click()
            page.wait_for_function("""() => document.querySelector(
                '#results-table [role=gridcell][data-row="0"][data-col="1"]'
                )?.innerText.trim() === 'REVIEW'""", timeout=60_000)
            page.locator("#table-order label", has_text="highest score first").click()

            # teach it where it is unsure: a suggested image, selected and marked defective
            captions = page.locator("#suggested-gallery .caption-label")
            captions.first.wait_for(timeout=60_000)
            assert sorted(c.split(" · ")[1] for c in captions.all_inner_texts()) == sorted(
                [defect.name, good.name])
            page.locator("#suggested-gallery .thumbnail-item", has_text=defect.name).click()
            page.wait_for_function(
                "n => document.querySelector('#selected-image input').value === n",
                arg=defect.name, timeout=60_000)
            page.click("#mark-defect")
            page.wait_for_function(
                "() => document.querySelector('#detail-text').innerText.includes('You marked it defect')",
                timeout=60_000)
            table = read_table(page)
            assert (table[defect.name][0], table[defect.name][3]) == ("DEFECT", "defect"), table
            assert table[good.name][0] == "REVIEW"
            assert [c.split(" · ")[1] for c in captions.all_inner_texts()] == [good.name]

            # the false-alarm budget control re-thresholds
            page.click("#budget input")
            page.locator("#budget [role=option]", has_text="1 %").first.click()
            page.wait_for_selector("#fit-summary :text('False-alarm budget 1 %')", timeout=60_000)
            page.wait_for_selector("#expected-rate :text('About 1 in 100 good parts')", timeout=60_000)
            assert "Traceback" not in page.content()
        finally:
            browser.close()

    archive = zipfile.ZipFile(path)
    stems = [defect.stem, good.stem]
    assert set(archive.namelist()) == {"results.csv", *(f"{s}_{kind}" for s in stems
                                                        for kind in ("overlay.png", "mask.png", "map.npy"))}
    rows = {row["file"]: row for row in csv.DictReader(io.StringIO(archive.read("results.csv").decode()))}
    assert {name: row["verdict"] for name, row in rows.items()} == {defect.name: "OK", good.name: "OK"}
    assert float(rows[good.name]["defect_threshold"]) >= float(rows[good.name]["threshold"])
    assert float(rows[defect.name]["score"]) == pytest.approx(score[defect.name], abs=1e-4)


def live_script():
    """scripts/live_fps.py: the fake camera's clip and the steps that start the live view."""
    spec = importlib.util.spec_from_file_location("live_fps", REPO / "scripts" / "live_fps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def live_verdict(page) -> str | None:
    """The verdict the live view states now (its line starts with it), if any."""
    words = page.inner_text("#live-status").replace("*", "").split()
    return next((w for w in words if w in VERDICTS), None)


@pytest.mark.browser
def test_live_camera_answers_frames_and_captures_one(server, data_dir, tmp_path):
    """Chromium's fake camera plays good bottles (the references), then a broken one: overlays
    arrive, the verdict goes from OK to not OK, and a captured frame joins the results."""
    from playwright.sync_api import sync_playwright

    live = live_script()
    refs, clip = live.bottle_clip(data_dir, 4, tmp_path)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=CHROMIUM_ARGS + live.fake_camera_args(clip))
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            live.start_live(page, server, refs, FIT_TIMEOUT_MS)
            page.wait_for_selector("#live-view img", timeout=120_000)
            page.evaluate(live.WATCH_LIVE_VIEW)
            page.wait_for_function("() => window.liveShown.length >= 5", timeout=120_000)
            seen, deadline = [], time.monotonic() + 120       # the clip loops every 4 s
            while time.monotonic() < deadline and not (
                    "OK" in seen and any(v != "OK" for v in seen[seen.index("OK"):])):
                verdict = live_verdict(page)
                if verdict and (not seen or seen[-1] != verdict):
                    seen.append(verdict)
                time.sleep(0.05)
            assert "OK" in seen and {"REVIEW", "DEFECT"} & set(seen[seen.index("OK"):]), seen
            assert "frames/s answered" in page.inner_text("#live-status")

            page.click("#live-capture")
            page.wait_for_selector("#results-summary :text('1 image')", timeout=60_000)
            (name, (verdict, *_)), = read_table(page).items()
            assert name.startswith("camera_") and name.endswith(".png") and verdict in VERDICTS
            assert page.locator("#selected-image input").input_value() == name
            assert "Traceback" not in page.content()
        finally:
            browser.close()


def test_gradio_client_sessions_are_separate(server, brick):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    gravel = example_sets()["gravel"]
    alice, bob = Client(server, verbose=False), Client(server, verbose=False)
    with pytest.raises(AppError, match="fit one on good images"):
        bob.predict([handle_file(str(brick.tests[0]))], 0.5, True, api_name="/inspect")

    fitted = {}
    for client, refs in ((alice, brick.references[:3]), (bob, gravel.references[:4])):
        _, count = client.predict([handle_file(str(p)) for p in refs], api_name="/set_references")
        assert count.startswith(f"**{len(refs)} good images**")
        out = client.predict("effnet-lite", False, False, 0.5, True, api_name="/fit")
        fitted[client] = out[1]["value"]                          # the slider: calibrated
        assert out[0].startswith(f"**Fitted on {len(refs)} good images")
    assert fitted[alice] != fitted[bob]                               # each its own threshold

    out = alice.predict([handle_file(str(p)) for p in brick.tests[:2]], 0.5, True, api_name="/inspect")
    assert out[1].startswith("**2 images:")
    assert len(out[2]["data"]) == 2
    summary = bob.predict(fitted[bob], 0.5, True, api_name="/set_threshold")[0]
    assert summary == "Fitted. Now add test images (step 2)."        # bob has no results

    out = alice.predict(handle_file(str(brick.tests[2])), 0.5, True, api_name="/inspect_photo")
    assert out[1].startswith("**3 images:") and "photo_1.png" in [row[0] for row in out[2]["data"]]
    saved = alice.predict(api_name="/save_detector")
    carol = Client(server, verbose=False)                             # a later visit
    fit_md = carol.predict(handle_file(saved), 0.5, True, api_name="/load_detector")[0]
    assert fit_md.startswith("**Detector loaded from file.**")
    assert carol.predict(api_name="/reset_threshold")[0]["value"] == pytest.approx(fitted[alice])


@pytest.mark.parametrize("route", ["gradio_api/file=/etc/passwd", "gradio_api/file=../../etc/passwd",
                                   "gradio_api/file=app.py", f"gradio_api/file={REPO}/app.py",
                                   "file=/etc/passwd"])
def test_server_serves_no_files_outside_its_own(server, route):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server + route, timeout=10)
    assert err.value.code in (403, 404)
