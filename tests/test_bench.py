"""The benchmark (bench/, ``python -m anomaly bench``): well-formed output on a tiny setting and
baselines that rank a real defect above a good image. No timing is asserted."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from anomaly import cli, load_image
from anomaly.datasets import Sample
from bench import cli as bench_cli
from bench import methods as bench_methods
from bench.methods import METHODS, build_method
from bench.report import markdown, methods_table
from bench.runner import select_samples, summarise
from conftest import category_files


def _row(method, seed, auroc, category="bottle", shots=8):
    return {"method": method, "category": category, "shots": shots, "seed": seed, "image_size": 256,
            "n_test": 10, "image_auroc": auroc, "pixel_auroc": 0.9, "aupro": None, "note": None,
            "fit_seconds": 1.0, "predict_ms": 50.0, "maps_ms_per_image": 40.0}


def test_cli_lists_every_method_and_runtime():
    from anomaly.runtime import RUNTIMES
    assert bench_cli.ALL_METHODS == METHODS          # bench.cli stays import-light on purpose
    assert bench_cli.RUNTIMES == RUNTIMES


def test_bench_is_registered_in_the_app_cli():
    args = cli.build_parser().parse_args(["bench", "--shots", "1", "--limit-test", "4"])
    assert args.command == "bench" and args.shots == [1] and args.limit_test == 4


def test_select_samples_keeps_both_classes_evenly_spread():
    samples = [Sample(Path(f"d{i}.png"), "crack", True, None) for i in range(30)]
    samples += [Sample(Path(f"g{i}.png"), "good", False, None) for i in range(10)]
    picked = select_samples(samples, 6)
    assert len(picked) == 6
    assert sum(s.label for s in picked) == 3
    assert len({s.path for s in picked}) == 6
    assert select_samples(samples, None) == samples


def test_summary_means_over_seeds_and_skips_missing_values():
    rows = [_row("pfm", 0, 0.8), _row("pfm", 1, 1.0), _row("padim", 0, None)]
    rows[2]["note"] = "non-finite scores"
    memory = [{"method": "pfm", "category": "bottle", "shots": 8, "peak_delta_mb": 120.0, "peak_rss_mb": 900.0}]
    summary = {s["method"]: s for s in summarise(rows, memory)}
    assert summary["pfm"]["image_auroc"] == pytest.approx(0.9)
    assert summary["pfm"]["seeds"] == 2 and summary["pfm"]["peak_delta_mb"] == 120.0
    assert summary["padim"]["image_auroc"] is None and summary["padim"]["notes"]
    table = methods_table(list(summary.values()))
    assert table.splitlines()[0].startswith("| category | shots | method |")
    assert "| 0.900 |" in table and "n/a" in table


def test_missing_anomalib_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(bench_methods, "anomalib_version", lambda: None)
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    with pytest.raises(ValueError, match="requirements-bench.txt"):
        bench_cli.run(parser.parse_args(["--methods", "pfm", "patchcore"]))


@pytest.mark.slow
def test_tiny_benchmark_writes_well_formed_json_markdown_and_plot(data_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = cli.main(["bench", str(data_dir / "bottle"), "--shots", "1", "--seeds", "0",
                     "--limit-test", "4", "--timed-images", "1", "--image-size", "64",
                     "--methods", "pfm", "knn", "--scaling-refs", "1", "--scaling-sizes",
                     "--scaling-methods", "knn", "--json", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert set(results) >= {"meta", "runs", "summary", "memory", "floor", "scaling"}
    assert results["meta"]["machine"]["nproc"] >= 1
    assert [(r["method"], r["runtime"], r["n_test"]) for r in results["runs"]] == [
        ("pfm", "openvino", 4), ("pfm", "torch", 4), ("knn", "openvino", 4), ("knn", "torch", 4)]
    for row in results["runs"]:
        assert 0.0 <= row["image_auroc"] <= 1.0 and 0.0 <= row["pixel_auroc"] <= 1.0
        assert row["fit_seconds"] > 0 and row["predict_ms"] > 0
    assert len(results["summary"]) == 4
    pfm = {r["runtime"]: r for r in results["runs"] if r["method"] == "pfm"}   # the README's tolerance
    assert abs(pfm["openvino"]["pixel_auroc"] - pfm["torch"]["pixel_auroc"]) <= 0.005
    assert [m["method"] for m in results["memory"]] == ["pfm", "knn"]
    assert all(m["peak_rss_mb"] >= m["rss_before_fit_mb"] > 0 for m in results["memory"])
    assert [f["runtime"] for f in results["floor"]] == ["openvino", "torch"]
    for floor in results["floor"]:
        assert floor["fit_ratio"] > 0 and floor["predict_ratio"] > 0 and floor["views"] >= 1
    assert [(p["axis"], p["value"], p["method"]) for p in results["scaling"]] == [("references", 1, "knn")]
    report = (tmp_path / "bench.md").read_text()
    assert report == markdown(results)
    assert "| bottle | 1 | PFM (app) | openvino |" in report and "| bottle | 1 | PFM (app) | torch |" in report
    assert "PFM on openvino / in PyTorch eager" in report and "fit ratio" in report
    assert (tmp_path / "bench_scaling.png").read_bytes()[:4] == b"\x89PNG"
    assert "| bottle | 1 | kNN bank (bench) |" in capsys.readouterr().out


def _defect_and_good(data_dir):
    return (load_image(category_files(data_dir, "bottle", "test/broken_large", 1)[0]),
            load_image(category_files(data_dir, "bottle", "test/good", 1)[0]))


@pytest.mark.slow
def test_knn_baseline_ranks_a_real_defect_above_a_good_image(data_dir):
    refs = [load_image(p) for p in category_files(data_dir, "bottle", "train/good", 2)]
    defect, good = _defect_and_good(data_dir)
    knn = build_method("knn")
    knn.fit(refs)
    maps, scores = knn.maps([defect, good])
    assert maps.shape == (2, 256, 256) and maps.dtype == np.float32
    assert scores[0] > scores[1]
    amap, score = knn.predict(defect)
    assert amap.shape == (defect.height, defect.width)
    assert score == pytest.approx(scores[0], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["patchcore", "padim"])
def test_anomalib_baselines_with_the_offline_weights_rank_a_defect_higher(data_dir, name):
    pytest.importorskip("anomalib", reason="pip install --no-deps -r requirements-bench.txt")
    refs = [load_image(p) for p in category_files(data_dir, "bottle", "train/good", 2)]
    defect, good = _defect_and_good(data_dir)
    method = build_method(name)
    method.fit(refs)
    maps, scores = method.maps([defect, good])
    assert maps.shape == (2, 256, 256)
    assert np.isfinite(scores).all() and scores[0] > scores[1]
