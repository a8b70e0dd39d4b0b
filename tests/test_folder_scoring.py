"""Folder scoring (``predict --table``, ``--engine ray``): the Ray engine and the single-process
engine give the same rows on real photos, a corrupt file becomes an error row, the table is one
Parquet or CSV file with the documented columns."""
import csv
import math

import pyarrow.parquet as pq
import pytest
import ray

from anomaly import cli
from anomaly.calibration import verdict
from anomaly.detector import DetectorConfig, PFMDetector
from anomaly.folder_scoring import (COLUMNS, ImageScorer, TableWriter, expand_inputs,
                                    score_local)
from anomaly.ray_scoring import score_with_ray
from conftest import category_files

# Small settings: the engines' plumbing is under test here, not the detector's accuracy.
FAST = DetectorConfig(image_size=64, steps=20, views=4)


@pytest.fixture(scope="module")
def model(data_dir, tmp_path_factory):
    """A small detector fitted on two real bottle photos, saved to a file."""
    detector = PFMDetector(FAST)
    detector.fit(category_files(data_dir, "bottle", "train/good", 2))
    return detector.save(tmp_path_factory.mktemp("model") / "bottle.safetensors")


@pytest.fixture(scope="module")
def images(data_dir, tmp_path_factory):
    """Seven real photos of three categories (PNG and JPEG, square and not), then a truncated
    PNG in the middle."""
    photos = [*category_files(data_dir, "bottle", "test/good", 2),
              *category_files(data_dir, "bottle", "test/broken_large", 2),
              *category_files(data_dir, "magnetic_tile", "test/good", 1),
              *category_files(data_dir, "screw", "test/scratch_head", 2)]
    corrupt = tmp_path_factory.mktemp("bad") / "truncated.png"
    corrupt.write_bytes(photos[0].read_bytes()[:2000])
    return [*photos[:4], corrupt, *photos[4:]]


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance with 2 CPUs for this module's tests."""
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _check_same(rows_a, rows_b, n_images):
    assert len(rows_a) == len(rows_b) == n_images
    for a, b in zip(rows_a, rows_b):
        assert a["path"] == b["path"] and a["verdict"] == b["verdict"], (a, b)
        assert (a["error"] is None) == (b["error"] is None), (a, b)
        if a["error"] is None:
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)
            assert a["norm_score"] == pytest.approx(b["norm_score"], abs=1e-5)
            assert (a["threshold"], a["defect_threshold"]) == (b["threshold"], b["defect_threshold"])


def test_ray_and_local_engines_give_the_same_rows(model, images, ray_cluster):
    local = list(score_local(ImageScorer(model), images))
    on_ray = list(score_with_ray(model, images, workers=2))
    _check_same(local, on_ray, len(images))
    assert [r["path"] for r in on_ray] == [str(p) for p in images]     # input order kept
    bad = on_ray[4]
    assert bad["score"] is None and bad["verdict"] is None
    assert "truncated.png" in bad["error"] and "corrupt" in bad["error"]
    scores = [r["score"] for r in local if r["error"] is None]
    assert len(set(scores)) == len(scores) and all(math.isfinite(s) for s in scores)
    for row in local:
        if row["error"] is None:
            assert 0.0 <= row["norm_score"] <= 1.0
            assert row["verdict"] == verdict(row["score"], row["threshold"], row["defect_threshold"])
    assert ray.is_initialized()                       # a cluster it did not start stays up


def test_predict_command_on_ray_writes_the_local_table(model, images, ray_cluster, tmp_path,
                                                       monkeypatch, capsys):
    monkeypatch.chdir(images[4].parent)               # the corrupt file given by a relative path
    args = [str(model), *map(str, images[:4]), images[4].name, *map(str, images[5:])]
    assert cli.main(["predict", *args, "--table", str(tmp_path / "local.csv")]) == 2
    local_out, local_err = capsys.readouterr()
    assert cli.main(["predict", *args, "--table", str(tmp_path / "ray.parquet"), "--engine",
                     "ray", "--workers", "1", "--out", str(tmp_path / "overlays")]) == 2
    ray_out, ray_err = capsys.readouterr()

    assert ray_out == local_out and len(ray_out.splitlines()) == len(images) - 1
    for err in (local_err, ray_err):
        assert "error: truncated.png: the image file is corrupt" in err
        assert f"scored {len(images)} images in" in err
        assert err.rstrip().endswith(f"error: 1 of {len(images)} images could not be read")
    table = pq.read_table(tmp_path / "ray.parquet")
    assert table.column_names == list(COLUMNS)
    assert [str(t) for t in table.schema.types] == ["string", "double", "double", "string",
                                                    "double", "double", "string"]
    with (tmp_path / "local.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        local = [{k: (float(v) if k in ("score", "norm_score", "threshold", "defect_threshold") and v
                      else v or None) for k, v in row.items()} for row in reader]
    _check_same(local, table.to_pylist(), len(images))
    assert local[4]["path"] == "truncated.png" and local[4]["score"] is None
    overlays = sorted(p.name for p in (tmp_path / "overlays").iterdir())
    assert len(overlays) == len(images) - 1 and "000_overlay_2.png" in overlays


def test_scorer_thresholds_from_the_detector_a_budget_or_a_threshold(model):
    detector = PFMDetector.load(model)
    calibrated = ImageScorer(model)
    assert (calibrated.threshold, calibrated.defect_threshold) == (detector.threshold,
                                                                   detector.defect_threshold)
    budget = ImageScorer(model, false_alarm_budget=0.01)
    assert (budget.threshold, budget.defect_threshold) == detector.thresholds_for(0.01)
    assert budget.threshold > calibrated.threshold
    given = ImageScorer(model, threshold=detector.threshold * 0.9)
    assert given.defect_threshold == detector.defect_threshold_for(detector.threshold * 0.9)
    with pytest.raises(ValueError, match="not both"):
        ImageScorer(model, threshold=1.0, false_alarm_budget=0.01)


def test_predict_rows_carry_review(model, images, tmp_path, capsys):
    """With a threshold below every score and the DEFECT threshold following it, the rows say
    REVIEW or DEFECT by the one verdict rule; a budget re-thresholds the saved detector."""
    photos = [str(p) for p in images[:4]]
    table = tmp_path / "rows.csv"
    assert cli.main(["predict", str(model), *photos, "--threshold", "0.01", "--table", str(table)]) == 0
    printed = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    with table.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["verdict"] for row in rows] == [verdict for *_, verdict in printed]
    assert {row["verdict"] for row in rows} <= {"REVIEW", "DEFECT"}
    for row in rows:
        assert row["verdict"] == verdict(float(row["score"]), float(row["threshold"]),
                                         float(row["defect_threshold"]))
    assert cli.main(["predict", str(model), *photos, "--false-alarm-budget", "0.5",
                     "--table", str(table)]) == 0
    with table.open(newline="") as f:
        rows = list(csv.DictReader(f))
    wanted = PFMDetector.load(model).thresholds_for(0.5)
    assert [(float(r["threshold"]), float(r["defect_threshold"])) for r in rows] == [wanted] * len(rows)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", str(model), photos[0], "--threshold", "1", "--false-alarm-budget", "0.1"])
    assert exit_info.value.code == 2 and "not both" in capsys.readouterr().err


def test_table_writer_streams_row_groups_and_rejects_other_suffixes(tmp_path):
    rows = [{"path": f"{i}.png", "score": float(i), "norm_score": 0.5, "verdict": v,
             "threshold": 1.0, "defect_threshold": 2.0, "error": None}
            for i, v in enumerate(["OK", "REVIEW", "DEFECT", "OK", "REVIEW"])]
    rows.append({**dict.fromkeys(COLUMNS), "path": "x.png", "threshold": 1.0, "defect_threshold": 2.0,
                 "error": "bad"})
    with TableWriter(tmp_path / "t.parquet", chunk=2) as writer:
        for row in rows:
            writer.write(row)
    assert pq.ParquetFile(tmp_path / "t.parquet").metadata.num_row_groups == 3
    assert pq.read_table(tmp_path / "t.parquet").to_pylist() == rows
    with pytest.raises(ValueError, match="must end in .parquet or .csv"):
        TableWriter(tmp_path / "t.json")


def test_glob_patterns_expand_to_sorted_images(data_dir):
    found = expand_inputs([str(data_dir / "bottle" / "test" / "**" / "00[01].png")])
    assert [(p.parent.name, p.name) for p in found] == [
        (d, n) for d in ("broken_large", "broken_small", "contamination", "good")
        for n in ("000.png", "001.png")]
    with pytest.raises(ValueError, match="pattern matches no images"):
        expand_inputs([str(data_dir / "bottle" / "*.nothing")])


def test_address_without_the_ray_engine_is_refused(model, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", str(model), str(tmp_path), "--address", "auto"])
    assert exit_info.value.code == 2 and "--address needs --engine ray" in capsys.readouterr().err
