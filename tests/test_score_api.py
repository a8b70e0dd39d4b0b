"""The app's scripting endpoint /score through gradio_client against the real app on localhost:
the README's example as written, the session mode, and files that cannot be scored."""
import json

import pytest
from PIL import Image

from anomaly.session import WORK_SIDE
from conftest import category_files, run_beside_app

pytestmark = pytest.mark.slow

FAST_CONFIG = '{"steps": 30, "views": 8, "image_size": 128}'

SCORE_CHECKS = r"""
import shutil, subprocess, tempfile
from pathlib import Path
from gradio_client import Client, handle_file

refs, good, broken = json.loads(sys.argv[1])
out = {}
engineer = Client(url, verbose=False)
engineer.predict([handle_file(p) for p in refs], api_name="/set_references")
out["not_fitted"] = None
try:
    engineer.predict([handle_file(good)], None, api_name="/score")
except Exception as err:
    out["not_fitted"] = str(err)
engineer.predict("effnet-lite", False, False, 0.5, True, api_name="/fit")
detector = engineer.predict(api_name="/save_detector")

# the README's example, as written, in a folder holding the files it names
work = Path(tempfile.mkdtemp())
shutil.copy(good, work / "part1.png")
shutil.copy(broken, work / "part2.png")
shutil.copy(detector, work / "part.safetensors")
readme = Path("README.md").read_text()
block = readme.split("<!-- score-example", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
out["example_lines"] = len(block.strip().splitlines())
run = subprocess.run([sys.executable, "-c", block.replace("http://127.0.0.1:7860/", url)], cwd=work,
                     capture_output=True, text=True, timeout=300)
out["example_rc"], out["example_out"], out["example_err"] = run.returncode, run.stdout, run.stderr[-2000:]

# stateless, with a file that is no image: its record says why, the others are scored
(work / "notes.png").write_text("not an image")
records, overlays = Client(url, verbose=False).predict(
    [handle_file(good), handle_file(str(work / "notes.png")), handle_file(broken)],
    handle_file(detector), api_name="/score")
out["records"], out["overlays"] = records, [Path(p).name for p in overlays]
out["overlay_sizes"] = [__import__("PIL.Image").Image.open(p).size for p in overlays]
# the session's own detector, at the threshold the engineer set; the results stay as they were
engineer.predict(records[0]["score"] + 1e-6, 0.5, True, api_name="/set_threshold")
mine, _ = engineer.predict([handle_file(good)], None, api_name="/score")
out["session_record"] = mine[0]
# a REVIEW band that holds the broken part, then the budget control re-thresholds the session
session = app.OPEN_SESSIONS[engineer.session_hash]
session.threshold, session.defect_threshold = records[0]["score"] * 1.01, records[2]["score"] * 1.01
mine, _ = engineer.predict([handle_file(good), handle_file(broken)], None, api_name="/score")
out["review_records"] = mine
engineer.predict(0.1, 0.5, True, api_name="/set_false_alarm_budget")
mine, _ = engineer.predict([handle_file(good)], None, api_name="/score")
out["budget_record"] = mine[0]
out["budget_thresholds"] = list(session.detector.thresholds_for(0.1))
out["session_results"] = len(app.OPEN_SESSIONS[engineer.session_hash].results)
"""


def test_score_endpoint_returns_records_and_overlays(data_dir):
    refs = [str(p) for p in category_files(data_dir, "bottle", "train/good", 3)]
    good = str(category_files(data_dir, "bottle", "test/good", 1)[0])
    broken = str(category_files(data_dir, "bottle", "test/broken_large", 1)[0])
    out = run_beside_app(SCORE_CHECKS, FAST_CONFIG, json.dumps([refs, good, broken]))
    assert "No detector yet" in out["not_fitted"]

    assert out["example_lines"] <= 5
    assert out["example_rc"] == 0, out["example_err"]
    printed = [line.split() for line in out["example_out"].splitlines() if line.startswith("part")]
    assert [name for name, _, _ in printed] == ["part1.png", "part2.png"]
    assert printed[0][1] == "OK" and printed[1][1] in ("REVIEW", "DEFECT")
    assert float(printed[0][2]) < 0.5 < float(printed[1][2])

    good_rec, bad_file, broken_rec = out["records"]
    keys = {"file", "score", "score_0_1", "verdict", "threshold", "defect_threshold",
            "area_above_threshold", "overlay", "error"}
    assert set(good_rec) == set(bad_file) == set(broken_rec) == keys
    assert good_rec["verdict"] == "OK" and broken_rec["verdict"] in ("REVIEW", "DEFECT")
    assert good_rec["score"] < good_rec["threshold"] < broken_rec["score"]
    assert broken_rec["verdict"] == ("DEFECT" if broken_rec["score"] > broken_rec["defect_threshold"]
                                     else "REVIEW")
    assert good_rec["threshold"] <= good_rec["defect_threshold"] == bad_file["defect_threshold"]
    assert good_rec["area_above_threshold"] == 0 < broken_rec["area_above_threshold"] < 0.5
    assert good_rec["error"] is None and bad_file["score"] is None and bad_file["overlay"] is None
    assert "notes.png" in bad_file["error"]
    assert out["overlays"] == [good_rec["overlay"], broken_rec["overlay"]]
    width, height = Image.open(good).size
    side = min(1.0, WORK_SIDE / max(width, height))         # the photo's size, as the app keeps it
    assert out["overlay_sizes"][0] == [round(width * side), round(height * side)]

    mine = out["session_record"]
    assert mine["threshold"] == pytest.approx(good_rec["score"] + 1e-6)
    assert mine["score"] == pytest.approx(good_rec["score"], rel=1e-5) and mine["verdict"] == "OK"
    assert out["session_results"] == 0
    assert [r["verdict"] for r in out["review_records"]] == ["OK", "REVIEW"]
    budget = out["budget_record"]
    assert [budget["threshold"], budget["defect_threshold"]] == pytest.approx(out["budget_thresholds"])
