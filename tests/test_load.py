"""The load test script (scripts/load_test.py) at a small size: concurrent gradio_client sessions
against the real app on localhost get no errors and only their own results. No timing checks."""
import importlib.util

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

SMALL_CONFIG = '{"steps": 30, "views": 8, "image_size": 128}'


def load_script():
    spec = importlib.util.spec_from_file_location("load_test", REPO / "scripts" / "load_test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_concurrent_sessions_are_isolated(data_dir, tmp_path):
    report = load_script().main(["--sessions", "3", "--images", "3", "--config", SMALL_CONFIG,
                                 "--timeout", "240", "--settle", "1",
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
    assert (tmp_path / "load.json").exists()
