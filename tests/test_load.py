"""The real app on localhost under concurrent gradio_client sessions: the load test script
(scripts/load_test.py) at a small size gets no errors and only each session's own results, and
one visitor's fit does not hold up another's inspection. No wall-clock limits are asserted."""
import importlib.util

import pytest

from conftest import REPO, run_beside_app

pytestmark = pytest.mark.slow

SMALL_CONFIG = '{"steps": 30, "views": 8, "image_size": 128}'
SLOW_FIT_CONFIG = '{"steps": 400, "views": 8, "image_size": 128}'     # small nets, long training


def load_script():
    spec = importlib.util.spec_from_file_location("load_test", REPO / "scripts" / "load_test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_concurrent_sessions_are_isolated(data_dir, tmp_path):
    report = load_script().main(["--sessions", "3", "--images", "3", "--config", SMALL_CONFIG,
                                 "--timeout", "240", "--settle", "1",
                                 "--redraw-images", "5", "--redraw-moves", "3",
                                 "--json", str(tmp_path / "load.json")])
    assert report["errors"] == []
    assert report["isolation_problems"] == []
    assert report["calls_ok"] == report["calls_expected"] == 9
    thresholds = report["thresholds"]
    assert None not in thresholds and len(set(thresholds)) == 3      # each its own references
    by_category = {}
    for s in report["per_session"]:
        assert len(s["scores"]) == 3
        by_category.setdefault(s["category"], []).append(s["scores"])
    bottle, tile = by_category["bottle"][0], by_category["magnetic_tile"][0]
    assert any(bottle[name] != tile[name] for name in bottle)
    assert report["redraw_results"] == 5 and report["redraw_p50_s"] > 0
    assert (tmp_path / "load.json").exists()


STALL_CHECKS = r"""
import time
from gradio_client import Client, handle_file
from anomaly.examples import example_sets

refs, tests = example_sets()["brick_wall"]
alice, bob = Client(url, verbose=False), Client(url, verbose=False)
alice.predict([handle_file(str(p)) for p in refs[:3]], api_name="/set_references")
start = time.monotonic()
alice.predict("effnet-lite", False, False, 0.5, True, api_name="/fit")
out = {"fit_s": time.monotonic() - start}
bob.predict(handle_file(alice.predict(api_name="/save_detector")), 0.5, True, api_name="/load_detector")
refit = alice.submit("effnet-lite", False, False, 0.5, True, api_name="/fit")
time.sleep(out["fit_s"] / 5)                     # alice's refit is training now
alice_inspects = [alice.submit([handle_file(str(p))], 0.5, True, api_name="/inspect")
                  for p in tests[:2]]            # her own tab, during her fit: both predict slots
start = time.monotonic()
summary = bob.predict([handle_file(str(tests[2]))], 0.5, True, api_name="/inspect")[1]
out["bob_s"] = time.monotonic() - start
out["refit_running_when_bob_done"] = not refit.done()
out["bob_summary"] = summary
out["alice_summaries"] = [job.result()[1] for job in alice_inspects]
out["alice_done_before_refit"] = not refit.done()
refit.result()
"""


def test_a_fit_does_not_stall_inspections(tmp_path):
    """While visitor A's fit trains and her own tab fires two inspections (as dropping test
    images does), visitor B's inspection is answered before A's fit ends."""
    out = run_beside_app(STALL_CHECKS, SLOW_FIT_CONFIG)
    assert out["refit_running_when_bob_done"], out
    assert out["alice_done_before_refit"], out
    assert out["bob_summary"].startswith("**1 image:")
    assert sorted(s[:10] for s in out["alice_summaries"]) == ["**1 image:", "**2 images"]
