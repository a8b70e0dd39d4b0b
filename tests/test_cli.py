"""``python -m anomaly`` (evaluate, fit, predict) and the evaluation loop behind it."""
import csv
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly import cli
from anomaly.datasets import load_mask
from anomaly.calibration import verdict as verdict_of
from anomaly.detector import DetectorConfig, PFMDetector
from anomaly.evaluate import ROW_KEYS, evaluate_category, format_table, summarise
from conftest import REPO, category_files

# Small settings: the command's plumbing is under test here, not the detector's accuracy.
FAST = ["--image-size", "64", "--steps", "20", "--views", "4"]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "anomaly", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_evaluate_command_on_real_bottle(data_dir, tmp_path):
    out = tmp_path / "out.json"
    result = _run("evaluate", data_dir / "bottle", "--shots", "1", "--seeds", "0",
                  "--json", out, *FAST, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert len(rows) == 1
    row = rows[0]
    assert tuple(row) == ROW_KEYS
    assert (row["category"], row["shots"], row["seed"], row["backbone"]) == \
        ("bottle", 1, 0, "effnet-lite")
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "false_alarm_rate", "miss_rate"):
        assert isinstance(row[key], float) and 0.0 <= row[key] <= 1.0, key
    assert row["image_auroc"] > 0.7 and row["pixel_auroc"] > 0.7     # far above chance
    assert row["fit_seconds"] > 0 and row["predict_ms"] > 0
    assert "[1/1] bottle shots=1 seed=0 ... image_auroc=" in result.stderr
    table = result.stdout.strip().splitlines()
    assert table[0].startswith("| category | backbone | shots |") and len(table) == 3
    assert table[2].startswith("| bottle | effnet-lite | 1 | 1 |")


@pytest.fixture(scope="module")
def fitted(data_dir, tmp_path_factory):
    """(model file, stdout, stderr) of ``fit`` on two real bottle photos, run in-process."""
    model = tmp_path_factory.mktemp("fit") / "model.safetensors"
    refs = category_files(data_dir, "bottle", "train/good", 2)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(["fit", *map(str, refs), "-o", str(model), *FAST, "--false-alarm-budget", "0.1"])
    assert code == 0, err.getvalue()
    return model, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_fit_then_predict_round_trip(fitted, data_dir, tmp_path):
    model, stdout, stderr = fitted
    assert stdout.startswith("fitted on 2 images") and "threshold" in stdout and model.is_file()
    assert "[100%] done" in stderr                                  # progress went to stderr
    threshold = float(stdout.split("threshold ")[1].split()[0])
    defect = float(stdout.split("defect threshold ")[1].split()[0])
    saved = PFMDetector.load(model)
    assert "false-alarm budget 0.1;" in stdout and saved.config.false_alarm_budget == 0.1
    assert (threshold, defect) == pytest.approx(saved.thresholds_for(0.1), rel=1e-3)

    tile = category_files(data_dir, "magnetic_tile", "test/good", 1)[0]   # grey JPEG, not square
    images = [*category_files(data_dir, "bottle", "test/broken_large", 2), tile]
    results = tmp_path / "results.csv"
    predicted = _run("predict", model, *images, "--out", tmp_path / "overlays",
                     "--csv", results, cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    lines = predicted.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [p.name for p in images]
    for line in lines:
        _, score, norm, verdict = line.split("\t")
        assert 0.0 <= float(norm) <= 1.0
        assert verdict in ("OK", "REVIEW", "DEFECT") and (verdict != "OK") == (float(norm) > 0.5)
    rows = list(csv.DictReader(results.open()))
    assert [Path(r["image"]).name for r in rows] == [p.name for p in images]
    assert float(rows[0]["threshold"]) == pytest.approx(threshold, rel=1e-3)
    assert float(rows[0]["defect_threshold"]) == pytest.approx(defect, rel=1e-3)
    for row in rows:
        assert row["verdict"] == verdict_of(float(row["score"]), float(row["threshold"]),
                                            float(row["defect_threshold"]))
    overlays = sorted((tmp_path / "overlays").iterdir())
    assert [p.name for p in overlays] == ["000_overlay.png", "001_overlay.png",
                                          f"{tile.stem}_overlay.png"]
    with Image.open(overlays[2]) as overlay, Image.open(tile) as original:
        assert overlay.size == original.size and overlay.mode == "RGB"


@pytest.mark.slow
def test_predict_reports_a_bad_image_and_still_scores_the_rest(fitted, data_dir, tmp_path,
                                                              capsys):
    (tmp_path / "junk.png").write_text("not an image")
    good = category_files(data_dir, "bottle", "test/good", 1)[0]
    code = cli.main(["predict", str(fitted[0]), str(tmp_path / "junk.png"), str(good),
                     "--threshold", "0"])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("error: ") and "junk.png" in err
    name, _, _, verdict = out.strip().split("\t")
    assert name == good.name and verdict in ("REVIEW", "DEFECT")    # every score exceeds 0


BAD_INPUT = [
    (["predict", "{tmp}/missing.safetensors", "{tmp}/junk.png"], "missing.safetensors: no such"),
    (["predict", "{tmp}/junk.png", "{tmp}/junk.png"], "not a detector file"),
    (["fit", "{tmp}/nothing_here", "-o", "{tmp}/m.safetensors"], "nothing_here: no such file"),
    (["fit", "{tmp}/empty", "-o", "{tmp}/m.safetensors"], "folder holds no images"),
    (["fit", "{tmp}/junk.png", "-o", "{tmp}/no/m.safetensors"], "does not exist"),
    (["fit", "{tmp}/junk.png", "-o", "{tmp}/m.safetensors", "--image-size", "100"], "image_size"),
    (["fit", "{tmp}/junk.png", "-o", "{tmp}/m.safetensors", "--false-alarm-budget", "0.9"],
     "false_alarm_budget"),
    (["evaluate", "{tmp}/empty"], "train/good"),
    (["evaluate", "{tmp}/empty", "--seeds", "-1"], "--seeds -1"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUT)
def test_bad_input_gives_one_line_error_and_exit_code_2(tmp_path, capsys, argv, message):
    (tmp_path / "junk.png").write_text("not an image")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        cli.main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


# ---------------------------------------------------------------------------- evaluate loop


class OracleDetector:
    """Fake detector whose maps are the ground-truth masks (read from a lookup by path)."""

    def __init__(self, config: DetectorConfig, masks: dict, threshold: float = 0.5):
        self.config, self.masks, self.threshold = config, masks, threshold
        self.defect_threshold = threshold                  # no REVIEW band
        self.fitted_on = None

    def expected_false_alarm_rate(self, threshold):
        return 0.0

    def fit(self, images):
        self.fitted_on = list(images)

    def anomaly_maps(self, paths):
        maps = np.stack([self.masks[Path(p).name].astype(np.float32) for p in paths])
        return maps, maps.reshape(len(paths), -1).max(1)

    def predict(self, path):
        return None


def _tiny_category(root: Path, with_masks: bool = True) -> Path:
    """train/good a..d, test/good g1 g2, test/hole h1 h2 (+ masks unless ``with_masks`` is off)."""
    for folder, names in [("train/good", "abcd"), ("test/good", ["g1", "g2"]),
                          ("test/hole", ["h1", "h2"])]:
        (root / folder).mkdir(parents=True)
        for name in names:
            Image.new("RGB", (32, 24), (90, 90, 90)).save(root / folder / f"{name}.png")
    if with_masks:
        (root / "ground_truth/hole").mkdir(parents=True)
        for i, name in enumerate(["h1", "h2"]):
            mask = np.zeros((24, 32), np.uint8)
            mask[4 + i:10, 3:12 + 8 * i] = 255
            Image.fromarray(mask).save(root / "ground_truth/hole" / f"{name}_mask.png")
    return root


@pytest.mark.parametrize("with_masks", [True, False])
def test_evaluate_category_with_an_oracle_detector(tmp_path, with_masks):
    root = _tiny_category(tmp_path / "widget", with_masks)
    size = 64
    masks = {f"{n}.png": np.zeros((size, size), bool) for n in ("g1", "g2", "h1", "h2")}
    for name in ("h1", "h2"):
        masks[f"{name}.png"] = (load_mask(root / "ground_truth/hole" / f"{name}_mask.png", size)
                                if with_masks else np.ones((size, size), bool))
    made = []

    def factory(config):
        made.append(OracleDetector(config, masks))
        return made[-1]

    row = evaluate_category(root, 2, 1, DetectorConfig(image_size=size), factory, timed_images=3)
    assert tuple(row) == ROW_KEYS
    assert [p.name for p in made[0].fitted_on] == ["c.png", "d.png"]   # seed 1 of 2 shots
    assert made[0].config.seed == 1                                     # training seed = seed
    assert (row["image_auroc"], row["f1_max"]) == (1.0, 1.0)
    assert (row["false_alarm_rate"], row["miss_rate"]) == (0.0, 0.0)
    assert (row["review_rate"], row["miss_rate_at_5pct_false_alarms"], row["predicted_false_alarm_rate"]) == (0, 0, 0)
    if with_masks:
        assert (row["pixel_auroc"], row["aupro"]) == (1.0, pytest.approx(1.0))
    else:
        assert (row["pixel_auroc"], row["aupro"]) == (None, None)


def _row(category, shots, seed, **values):
    base = dict(backbone="effnet-lite", image_auroc=0.9, pixel_auroc=0.8, aupro=0.7, f1_max=0.6,
                fit_seconds=10.0, predict_ms=70.0, false_alarm_rate=0.1, predicted_false_alarm_rate=0.05,
                miss_rate=0.2, review_rate=0.15, defect_false_alarm_rate=0.0, defect_miss_rate=0.3,
                miss_rate_at_5pct_false_alarms=0.25)
    return dict(category=category, shots=shots, seed=seed, **{**base, **values})


def test_summarise_means_over_seeds_per_category_and_shots():
    rows = [_row("bottle", 8, 0, image_auroc=1.0), _row("bottle", 8, 1, image_auroc=0.8),
            _row("bottle", 1, 0), _row("tile", 8, 0, pixel_auroc=None, aupro=None)]
    summary = summarise(rows)
    assert [(r["category"], r["shots"], r["seeds"]) for r in summary] == \
        [("bottle", 8, 2), ("bottle", 1, 1), ("tile", 8, 1)]
    assert summary[0]["image_auroc"] == pytest.approx(0.9)
    assert summary[2]["pixel_auroc"] is None and summary[2]["aupro"] is None


def test_format_table_is_markdown_with_a_mean_row():
    rows = [_row("bottle", 8, 0), _row("tile", 8, 0, pixel_auroc=None, aupro=0.5)]
    lines = format_table(rows).splitlines()
    assert len({line.count("|") for line in lines}) == 1               # same column count
    assert lines[1].startswith("|---|")
    assert lines[2] == ("| bottle | effnet-lite | 8 | 1 | 0.900 | 0.800 | 0.700 | 0.600 | "
                        "10.0% | 5.0% | 20.0% | 15.0% | 0.0% | 30.0% | 25.0% | 10.0 | 70 |")
    assert lines[4].startswith("| mean | effnet-lite | 8 | 1 | 0.900 | n/a | 0.600 |")
