"""The app's workflow without a browser: anomaly.session (what every Gradio handler calls) on
real images, plus app.py's own glue checked in a child process.

gradio is never imported into the test process (tests/test_viz.py asserts it is absent), so the
app-level checks run in a subprocess. Fits use a small config via $ANOMALY_APP_CONFIG.
"""
import contextlib
import csv
import importlib.util
import io
import json
import os
import struct
import subprocess
import threading
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomaly import session as session_module
from anomaly.calibration import VERDICTS, verdict
from anomaly.examples import example_sets
from anomaly.detector import DetectorConfig
from anomaly.postprocess import thresholds_with_labels
from anomaly.session import CONFIG_ENV, InspectionSession, detector_config, false_alarm_words
from anomaly.settings import DEFAULT_FALSE_ALARM_BUDGET, FALSE_ALARM_BUDGETS
from anomaly.viz import VERDICT_RGB
from conftest import REPO, category_files, run_beside_app

FAST_CONFIG = {"steps": 30, "views": 8, "image_size": 128}


@pytest.fixture(scope="module", autouse=True)
def fast_fits():
    """Every fit in this module uses FAST_CONFIG (what a user gets is DetectorConfig())."""
    old = os.environ.get(CONFIG_ENV)
    os.environ[CONFIG_ENV] = json.dumps(FAST_CONFIG)
    yield
    if old is None:
        del os.environ[CONFIG_ENV]
    else:
        os.environ[CONFIG_ENV] = old


@pytest.fixture(scope="module")
def brick():
    return example_sets()["brick_wall"]


@pytest.fixture(scope="module")
def fitted(brick):
    """A session fitted on the brick references, with every brick test image inspected."""
    s = InspectionSession()
    assert s.set_references(brick.references) == []
    s.fit()
    scored, problems = s.inspect([(str(p), p) for p in brick.tests])
    assert (scored, problems) == (len(brick.tests), [])
    return s


@contextlib.contextmanager
def fit_held_in_training(s: InspectionSession):
    """A fit of ``s`` on its own thread, held at its training stage for the block's duration,
    then let go and joined."""
    training, release = threading.Event(), threading.Event()

    def progress(fraction, message):
        if "training" in message:
            training.set()
            release.wait(120)

    fit = threading.Thread(target=s.fit, kwargs={"progress": progress})
    fit.start()
    try:
        assert training.wait(120)
        yield
    finally:
        release.set()
        fit.join(120)


def snapshot(s: InspectionSession):
    """What a failed action must leave alone."""
    return (s.detector, s.threshold, s.defect_threshold,
            [(r.key, r.score, r.label, id(r.anomaly_map)) for r in s.results], len(s.references))


def borrowing(fitted: InspectionSession) -> InspectionSession:
    """A new session with the fitted session's detector, at its calibrated thresholds (no fit)."""
    s = InspectionSession()
    s.detector = fitted.detector
    s.reset_threshold()
    return s


def label_rule(s: InspectionSession) -> tuple[float, float]:
    """The thresholds the session's marks give from its detector's calibrated ones."""
    marked = [r for r in s.results if r.label is not None]
    return thresholds_with_labels(s.detector.threshold, s.detector.defect_threshold,
                                  [r.score for r in marked if not r.label],
                                  [r.score for r in marked if r.label])


def png_claiming(width: int, height: int) -> bytes:
    """An 8 x 8 PNG whose header says width x height (a decompression bomb, in a few bytes)."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())      # signature (8), IHDR: length, type, data (13), CRC
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(data[12:29]))
    return bytes(data)


def bad_files(folder: Path) -> dict[str, Path]:
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 60, 40)).save(good, format="PNG")
    contents = {
        "empty.png": b"",
        "text.png": b"this is not an image\n" * 20,
        "truncated.png": good.getvalue()[:60],
        "tiny.png": _png(Image.new("RGB", (4, 4))),
        "bomb.png": png_claiming(30000, 30000),
    }
    paths = {}
    for name, data in contents.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    return paths


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- no fit needed

def test_session_module_never_imports_gradio():
    code = "import sys, anomaly.session; assert 'gradio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_the_app_builds_its_page_without_importing_torch():
    """Cold start: the page is served while torch loads in the background (2 s of 5 on 2 cores);
    the package's public names still load on first use."""
    code = ("import sys, app; assert 'torch' not in sys.modules, 'app imports torch'; "
            "assert app.demo is not None; "
            "from anomaly import PFMDetector, BACKBONE_PAIRS; assert 'torch' in sys.modules; "
            "import anomaly.backbones as b; assert BACKBONE_PAIRS is b.BACKBONE_PAIRS")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_detector_config_reads_overrides_and_keeps_the_backbone(monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, '{"steps": 7}')
    cfg = detector_config("effnet-lite")
    assert (cfg.steps, cfg.backbone, cfg.views) == (7, "effnet-lite", 48)
    monkeypatch.setenv(CONFIG_ENV, '{"stepz": 7}')
    with pytest.raises(ValueError, match="stepz"):
        detector_config()
    monkeypatch.delenv(CONFIG_ENV)
    assert detector_config() == DetectorConfig()
    turned = detector_config("effnet-lite", parts_turn=True, small_defects=True)
    assert (turned.rotation, turned.image_size) == (180.0, 384)
    assert (DetectorConfig().rotation, DetectorConfig().image_size) == (15.0, 320)
    assert detector_config(false_alarm_budget=0.02).false_alarm_budget == 0.02


def test_the_pages_budget_choices_hold_the_detectors_default():
    """The app's page is built before torch loads, from anomaly.settings: its default budget
    must be DetectorConfig's."""
    assert DEFAULT_FALSE_ALARM_BUDGET == DetectorConfig().false_alarm_budget
    assert DEFAULT_FALSE_ALARM_BUDGET in FALSE_ALARM_BUDGETS


@pytest.mark.parametrize("rate, words", [
    (0.05, "About 1 in 20 good parts will be flagged (REVIEW or DEFECT): 5.0 % expected."),
    (0.01, "About 1 in 100 good parts"), (0.0012, "About 1 in 830 good parts"),
    (0.3, "About 3 in 10 good parts"), (0.97, "Nearly all good parts"),
    (2e-6, "Fewer than 1 in 10,000 good parts"), (0.004, ": 0.4 % expected."),
])
def test_false_alarm_rates_in_words(rate, words):
    assert words in false_alarm_words(rate)


def test_a_budget_chosen_before_a_fit_is_kept_for_it():
    s = InspectionSession()
    s.set_false_alarm_budget(0.02)
    assert s.false_alarm_budget == 0.02 and not s.is_fitted
    for bad in (0.0, 1.0, float("nan")):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            s.set_false_alarm_budget(bad)
    assert s.false_alarm_budget == 0.02


def test_nothing_works_before_fit_and_says_what_to_do(brick):
    s = InspectionSession()
    with pytest.raises(ValueError, match="at least one good reference"):
        s.fit()
    for action in (lambda: s.inspect([("a.png", brick.tests[0])]), s.export_zip, s.save_detector,
                   lambda: s.set_threshold(1.0), s.score_figure, s.suggestions,
                   s.expected_false_alarm_rate, s.reset_threshold):
        with pytest.raises(ValueError, match="fit one on good images"):
            action()
    assert not s.is_fitted and s.results == []


def test_references_bad_files_are_skipped_with_a_reason(brick, tmp_path):
    s = InspectionSession()
    bad = bad_files(tmp_path)
    problems = s.set_references([*brick.references[:2], *bad.values()])
    assert [r.name for r in s.references] == [p.name for p in brick.references[:2]]
    assert len(problems) == len(bad)
    for name, message in zip(bad, problems):
        assert name in message and message.startswith("skipped")
    assert "empty" in problems[0] and "not an image" in problems[1] and "limit" in problems[4]


def test_reference_limit_is_enforced_and_keeps_the_old_references(brick, monkeypatch):
    s = InspectionSession()
    s.set_references(brick.references[:3])
    monkeypatch.setattr(session_module, "MAX_REFERENCES", 4)
    with pytest.raises(ValueError, match="limit is 4"):
        s.set_references(brick.references[:5])
    assert len(s.references) == 3


def test_big_images_are_shrunk_to_the_working_size(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (2000, 1000), (90, 90, 90)).save(path)
    s = InspectionSession()
    s.set_references([path])
    assert s.references[0].image.size == (session_module.WORK_SIDE, session_module.WORK_SIDE // 2)


# --------------------------------------------------------------------------- fitted session

@pytest.mark.slow
def test_fit_and_inspect_give_sorted_verdicts_scores_and_maps(fitted, brick):
    s = fitted
    S = FAST_CONFIG["image_size"]
    assert s.fit_report.n_references == len(brick.references)
    assert s.threshold == s.calibrated_threshold == s.detector.threshold
    assert s.defect_threshold == s.detector.defect_threshold > s.threshold
    assert s.false_alarm_budget == s.detector.config.false_alarm_budget == DetectorConfig().false_alarm_budget
    assert s.expected_false_alarm_rate() == pytest.approx(s.false_alarm_budget, rel=1e-4)
    rows = s.table()
    assert [row[0] for row in rows] == [r.name for r in s.ranked()]
    assert [row[2] for row in rows] == sorted((row[2] for row in rows), reverse=True)
    by_name = {r.name: r for r in s.results}
    for row in rows:
        assert row[1] == verdict(by_name[row[0]].score, s.threshold, s.defect_threshold)
        assert 0 <= row[3] <= 1
    for r in s.results:
        assert r.anomaly_map.shape == (S, S) and r.anomaly_map.dtype == np.float32
        assert r.score == pytest.approx(float(r.anomaly_map.max()), rel=1e-5)
        assert s.overlay(r).size == r.image.size
    by_name = {r.name: r.score for r in s.results}
    defects = [v for k, v in by_name.items() if k.startswith("defect_")]
    goods = [v for k, v in by_name.items() if k.startswith("good_")]
    assert max(defects) > max(goods)            # at least the most visible defect stands out
    counts = s.counts()
    assert list(counts) == list(VERDICTS) and sum(counts.values()) == len(s.results)
    assert counts["OK"] < len(s.results) and s.results[s.selected].score == max(by_name.values())


@pytest.mark.slow
def test_threshold_redraws_verdicts_from_stored_maps(fitted, monkeypatch):
    s = fitted
    maps = [id(r.anomaly_map) for r in s.results]
    monkeypatch.setattr(s.detector, "predict", lambda *a, **k: pytest.fail("maps were recomputed"))
    scores = sorted(r.score for r in s.results)
    lo, hi, step = s.threshold_range()
    assert lo <= scores[0] and scores[-1] <= hi and lo <= s.threshold <= hi and step > 0
    try:
        s.set_threshold(scores[-1] + 1e-6)
        assert s.counts() == {"OK": len(scores), "REVIEW": 0, "DEFECT": 0}
        high_rate = s.expected_false_alarm_rate()
        s.set_threshold((scores[0] + scores[1]) / 2)
        assert s.counts()["OK"] == 1
        assert s.defect_threshold == s.detector.defect_threshold_for(s.threshold) >= s.threshold
        assert s.expected_false_alarm_rate() == s.detector.expected_false_alarm_rate(s.threshold)
        assert s.expected_false_alarm_rate() > high_rate          # a lower threshold flags more
        at = s.ranked()[-2]                     # the second lowest score
        s.set_threshold(at.score)
        assert s.norm_score(at) == pytest.approx(0.5) and s.verdict(at) == "OK"
        assert s.score_figure().axes                      # draws at any threshold
        s.set_threshold(hi * 3)                           # beyond the detector's score range
        assert s.norm_score(s.results[0]) < 0.5 and s.overlay(s.results[0]).size
        with pytest.raises(ValueError, match=">= 0"):
            s.set_threshold(float("nan"))
    finally:
        s.reset_threshold()
    assert (s.threshold, s.defect_threshold) == (s.detector.threshold, s.detector.defect_threshold)
    assert [id(r.anomaly_map) for r in s.results] == maps


@pytest.mark.slow
def test_bad_and_too_many_test_images_leave_the_session_intact(fitted, brick, tmp_path, monkeypatch):
    s = fitted
    before = snapshot(s)
    bad = bad_files(tmp_path)
    scored, problems = s.inspect([(str(p), p) for p in bad.values()])
    assert scored == 0 and len(problems) == len(bad) and snapshot(s) == before
    assert s.inspect([(str(p), p) for p in brick.tests]) == (0, [])      # already inspected
    monkeypatch.setattr(session_module, "MAX_TEST_BATCH", 3)
    with pytest.raises(ValueError, match="limit is 3 per batch"):
        s.inspect([(f"k{i}", brick.tests[0]) for i in range(4)])
    with pytest.raises(ValueError, match="Add one or more"):
        s.inspect([])
    assert snapshot(s) == before


@pytest.mark.slow
def test_unavailable_backbone_keeps_the_fitted_detector(fitted):
    from anomaly import WeightsUnavailableError
    before = snapshot(fitted)
    try:
        fitted.fit("resnet18-resnet34")
    except WeightsUnavailableError as err:
        assert "resnet18" in str(err) and "effnet-lite" in str(err)
        assert snapshot(fitted) == before
    else:
        pytest.skip("ResNet weights are cached on this machine")


@pytest.mark.slow
def test_results_are_capped_oldest_first(fitted, brick, monkeypatch):
    s = borrowing(fitted)                                   # no second fit needed
    monkeypatch.setattr(session_module, "MAX_RESULTS", 3)
    s.inspect([(f"first/{p.name}", p) for p in brick.tests[:2]])
    _, problems = s.inspect([(f"second/{p.name}", p) for p in brick.tests[:2]])
    assert [r.key for r in s.results] == ["first/" + brick.tests[1].name,
                                          *("second/" + p.name for p in brick.tests[:2])]
    assert "oldest" in problems[-1]
    names = [r.name for r in s.results]
    assert len(set(names)) == 3 and f"{Path(names[0]).stem} (2).png" in names   # same file twice
    renamed = [r for r in s.results if r.uploaded_as]        # the user is told which is which
    assert [r.uploaded_as for r in renamed] == [brick.tests[0].name, brick.tests[1].name]
    assert [f"named {r.uploaded_as}; this later upload of that name is shown as {r.name}"
            in problem for r, problem in zip(renamed, problems)] == [True, True]
    assert s.next_photo_key() != s.next_photo_key()


def test_marked_results_are_never_evicted(fitted, brick, monkeypatch):
    s = borrowing(fitted)
    monkeypatch.setattr(session_module, "MAX_RESULTS", 2)
    s.inspect([(f"a/{p.name}", p) for p in brick.tests[:2]])
    s.results[0].label, s.results[1].label = True, False           # marked defect, marked good
    _, problems = s.inspect([(f"b/{p.name}", p) for p in brick.tests[:3]])
    assert [r.key for r in s.results[:2]] == [f"a/{p.name}" for p in brick.tests[:2]]
    assert [r.key for r in s.results[2:]] == [f"b/{p.name}" for p in brick.tests[1:3]]
    assert "marked ones are always kept" in problems[-1]


@pytest.mark.slow
def test_export_zip_has_overlay_mask_map_and_csv(fitted):
    s = fitted
    archive = zipfile.ZipFile(s.export_zip())
    names = set(archive.namelist())
    rows = list(csv.DictReader(io.StringIO(archive.read("results.csv").decode())))
    assert [row["file"] for row in rows] == [r.name for r in s.ranked()]
    for row, r in zip(rows, s.ranked()):
        stem = Path(r.name).stem
        assert {f"{stem}_overlay.png", f"{stem}_mask.png", f"{stem}_map.npy"} <= names
        assert float(row["score"]) == pytest.approx(r.score, rel=1e-4)
        assert float(row["normalised_score"]) == pytest.approx(s.norm_score(r), abs=1e-4)
        assert row["verdict"] == s.verdict(r)
        assert float(row["defect_threshold"]) == pytest.approx(s.defect_threshold, rel=1e-5)
        mask = Image.open(io.BytesIO(archive.read(f"{stem}_mask.png")))
        amap = np.load(io.BytesIO(archive.read(f"{stem}_map.npy")))
        assert mask.mode == "L" and mask.size == r.image.size and amap.shape == mask.size[::-1]
        assert np.array_equal(np.asarray(mask) > 0, amap > s.threshold)
    assert len(names) == 3 * len(rows) + 1


def three_bands(s: InspectionSession) -> None:
    """Put the session's thresholds where its results fall in all three verdicts (at least
    two results in REVIEW), as a visitor could by moving the slider and marking."""
    scores = sorted(r.score for r in s.results)
    s.threshold = (scores[0] + scores[1]) / 2
    s.defect_threshold = (scores[-2] + scores[-1]) / 2


@pytest.mark.slow
def test_every_output_speaks_the_three_verdicts(fitted, tmp_path):
    """Table (either order), counts, ZIP CSV, thumbnails, overlays and /score records carry
    REVIEW beside OK and DEFECT, all from calibration.verdict."""
    s = fitted
    try:
        three_bands(s)
        expected = {r.name: verdict(r.score, s.threshold, s.defect_threshold) for r in s.results}
        assert s.counts() == {"OK": 1, "REVIEW": len(s.results) - 2, "DEFECT": 1}
        rows = s.table()
        assert {row[0]: row[1] for row in rows} == expected
        review_first = s.table(order="review")
        assert [row[1] for row in review_first] == sorted(
            (row[1] for row in rows), key=["REVIEW", "DEFECT", "OK"].index)
        for verdict_rows in ([row for row in review_first if row[1] == v] for v in VERDICTS):
            assert [row[2] for row in verdict_rows] == sorted((row[2] for row in verdict_rows),
                                                              reverse=True)
        s.set_table_order("review")
        assert s.table() == review_first
        with pytest.raises(ValueError, match="sorted by one of"):
            s.set_table_order("name")
        archive = zipfile.ZipFile(s.export_zip())
        csv_rows = list(csv.DictReader(io.StringIO(archive.read("results.csv").decode())))
        assert {row["file"]: row["verdict"] for row in csv_rows} == expected
        for r in s.results:
            with Image.open(s.thumbnail_file(r)) as thumb:
                assert thumb.getpixel((0, 0)) == VERDICT_RGB[expected[r.name]]
        reviewed = next(r for r in s.results if expected[r.name] == "REVIEW")
        outline = np.all(np.asarray(s.overlay(reviewed, alpha=0.0)) == VERDICT_RGB["REVIEW"], axis=-1)
        assert outline.any()                                   # the amber outline of REVIEW
        files = [tmp_path / f"{i}_{r.name}" for i, r in enumerate(s.results)]
        for path, r in zip(files, s.results):
            r.image.save(path)
        records = s.score_files(files)
        assert [rec["verdict"] for rec in records] == [expected[r.name] for r in s.results]
        assert {rec["defect_threshold"] for rec in records} == {s.defect_threshold}
        assert s.score_figure().axes
    finally:
        s.set_table_order("score")
        s.reset_threshold()


@pytest.mark.slow
def test_suggestions_are_the_unmarked_results_in_review_then_nearest_the_threshold(fitted):
    s = borrowing(fitted)
    s.inspect([(r.key, r.image) for r in fitted.results])
    three_bands(s)
    s.results[1].label = True                               # marked: never suggested

    def distance(r):
        return abs(np.log(r.score) - np.log(s.threshold))
    suggested = s.suggestions()
    unmarked = [r for r in s.results if r.label is None]
    in_band = sorted((r for r in unmarked if s.verdict(r) == "REVIEW"), key=distance)
    others = sorted((r for r in unmarked if s.verdict(r) != "REVIEW"), key=distance)
    assert suggested == (in_band + others)[:3] and s.results[1] not in suggested
    assert s.suggestions(n=10) == in_band + others
    s.defect_threshold = s.threshold                        # no REVIEW band: nearest only
    assert s.suggestions(2) == sorted(unmarked, key=distance)[:2]
    assert s.select_suggested(1) is s.suggestions()[1] and s.current() is s.suggestions()[1]
    with pytest.raises(ValueError, match="no result number 3"):
        s.select_suggested(3)


@pytest.mark.slow
def test_a_defect_mark_moves_the_thresholds_and_removing_it_moves_them_back(fitted):
    """Marking defective needs no refit: the lowest score marked defective becomes DEFECT (the
    DEFECT threshold just below it, the threshold at most that); a reset keeps the rule, and
    removing the mark goes back to calibrated."""
    s = borrowing(fitted)
    s.inspect([(r.key, r.image) for r in fitted.results])
    calibrated = (s.threshold, s.defect_threshold)
    target = min(s.results, key=lambda r: r.score)          # below even the threshold
    assert s.verdict(target) == "OK"
    assert s.mark(target.name, True) is None
    assert s.verdict(target) == "DEFECT" and s.threshold <= s.defect_threshold < target.score
    assert (s.threshold, s.defect_threshold) == label_rule(s)
    assert all(s.verdict(r) == "DEFECT" for r in s.results)  # everything scores above it
    s.set_threshold(calibrated[0])                           # the slider is the visitor's call
    assert (s.threshold, s.defect_threshold) == pytest.approx(calibrated, rel=1e-6)
    assert s.reset_threshold() == label_rule(s)[0]           # a reset keeps the marks' rule
    s.mark(target.name, None)
    assert (s.threshold, s.defect_threshold) == calibrated


@pytest.mark.slow
def test_the_false_alarm_budget_sets_the_thresholds_and_the_expected_rate(fitted):
    s = fitted
    detector, before = s.detector, s.false_alarm_budget
    try:
        rates = {}
        for budget in (0.01, 0.1):
            s.set_false_alarm_budget(budget)
            assert (s.threshold, s.defect_threshold) == detector.thresholds_for(budget)
            assert detector.config.false_alarm_budget == s.false_alarm_budget == budget
            rates[budget] = (s.threshold, s.expected_false_alarm_rate())
            assert rates[budget][1] == pytest.approx(budget, rel=1e-3)
        assert rates[0.01][0] > rates[0.1][0]                 # a smaller budget: a higher threshold
        with pytest.raises(ValueError, match="strictly between"):
            s.set_false_alarm_budget(1.5)
        assert detector.config.false_alarm_budget == 0.1
    finally:
        s.set_false_alarm_budget(before)
    assert s.threshold == detector.threshold


@pytest.mark.slow
def test_the_line_export_carries_the_sessions_thresholds_and_verdicts(fitted, brick):
    """"Download for the line": the ONNX file decides as the session does at the slider's
    threshold, run by the torch-free runner."""
    from anomaly.edge import EdgeDetector

    s = InspectionSession()
    s.load_detector(fitted.save_detector())
    s.inspect([(str(p), p) for p in brick.tests])
    scores = sorted(r.score for r in s.results)
    s.set_threshold((scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2)   # moved by hand
    edge = EdgeDetector(s.export_onnx())
    assert (edge.threshold_review, edge.threshold_defect) == pytest.approx((s.threshold, s.defect_threshold))
    for result in s.results:
        assert edge.verdict(result.score) == s.verdict(result)
    s.close()


@pytest.mark.slow
def test_saved_detector_loads_in_a_new_session_with_the_same_scores(fitted, brick):
    path = fitted.save_detector()
    s = InspectionSession()
    s.load_detector(path)
    assert s.threshold == pytest.approx(fitted.calibrated_threshold) and s.loaded_from_file
    assert s.defect_threshold == pytest.approx(fitted.detector.defect_threshold)
    assert s.false_alarm_budget == fitted.false_alarm_budget
    s.inspect([(str(p), p) for p in brick.tests])
    assert [r.score for r in s.results] == pytest.approx([r.score for r in fitted.results], rel=1e-5)
    with pytest.raises(ValueError, match="does not contain its reference images"):
        s.mark(0, False)                  # nothing to refit on
    assert s.results[0].label is None
    exported = s.export_zip()
    s.close()                                 # what the app calls when the session expires
    assert not exported.exists() and s.results == [] and not s.is_fitted


@pytest.mark.slow
def test_a_corrupt_detector_file_is_refused_and_changes_nothing(fitted, tmp_path):
    path = tmp_path / "detector.safetensors"
    path.write_bytes(b"\x00" * 64)
    before = snapshot(fitted)
    with pytest.raises(ValueError, match="not a detector file"):
        fitted.load_detector(path)
    assert snapshot(fitted) == before


@pytest.mark.slow
def test_marks_refit_and_give_auroc_and_a_suggested_threshold(brick):
    s = InspectionSession()
    s.set_references(brick.references[:4])
    s.set_false_alarm_budget(0.02)                             # chosen before the fit
    s.fit()
    assert s.detector.config.false_alarm_budget == 0.02
    s.inspect([(str(p), p) for p in brick.tests])
    index = {r.name: i for i, r in enumerate(s.results)}
    defect = max(s.results, key=lambda r: r.score).name
    assert s.mark(index[defect], True) is None                 # no refit for a defect mark
    assert s.verdict(s.results[index[defect]]) == "DEFECT"
    assert s.label_summary() is None                           # one kind only
    report = s.mark(index["good_01.png"], False)               # joins the references: refit
    assert report.n_references == 5 and len(s.training_images()) == 5
    assert s.detector.config.false_alarm_budget == 0.02        # the refit keeps the budget
    assert (s.threshold, s.defect_threshold) == label_rule(s)  # calibrated, then the marks' rule
    assert s.verdict(s.results[index[defect]]) == "DEFECT"
    assert [c for _, c in s.reference_gallery()][-1] == "good_01.png (marked good)"
    summary = s.label_summary()
    assert (summary.n_good, summary.n_defect) == (1, 1) and summary.auroc == 1.0
    assert s.results[index["good_01.png"]].score < summary.best_threshold < s.results[index[defect]].score
    assert s.roc().axes and [row[4] for row in s.table() if row[0] == defect] == ["defect"]
    with pytest.raises(ValueError, match="marked good"):
        s.clear_results()                                       # would drop a reference
    assert s.mark(index["good_01.png"], None).n_references == 4  # leaves the references again


@pytest.mark.slow
def test_a_failed_refit_undoes_the_mark(fitted, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(session_module.PFMDetector, "fit", broken)     # the refit's detector fails
    before = snapshot(fitted)
    with pytest.raises(RuntimeError):
        fitted.mark(0, False)
    assert snapshot(fitted) == before


@pytest.mark.slow
def test_real_photos_defect_scores_above_good(data_dir):
    """Real bottle photos: fit on 4 good ones; the broken ones score above the good ones."""
    s = InspectionSession()
    s.set_references(category_files(data_dir, "bottle", "train/good", 4))
    s.fit()
    good = category_files(data_dir, "bottle", "test/good", 2)
    broken = category_files(data_dir, "bottle", "test/broken_large", 2)
    s.inspect([(str(p), p) for p in good + broken])
    scores = [r.score for r in s.results]
    assert min(scores[2:]) > max(scores[:2])


# --------------------------------------------------------------------------- app.py glue

APP_CHECKS = r"""
import json, math, sys, time
import gradio as gr
from PIL import Image
import app
from anomaly import backbones
from anomaly.examples import example_sets

out = {}
out["backbones_loaded_at_import"] = backbones._load.cache_info().currsize
out["api_names"] = sorted(fn.api_name for fn in app.demo.fns.values()
                          if fn.api_visibility == "public")
out["default_address"] = app.server_address([], {})
out["env_address"] = app.server_address([], {"ANOMALY_HOST": "0.0.0.0", "ANOMALY_PORT": "9000",
                                              "GRADIO_SERVER_PORT": "1"})
out["space_address"] = app.server_address([], {"GRADIO_SERVER_NAME": "0.0.0.0",
                                                "GRADIO_SERVER_PORT": "7861"})
out["flag_address"] = app.server_address(["--host", "::1", "--port", "8000"],
                                         {"ANOMALY_PORT": "9000"})

def message(call):
    try:
        call()
    except gr.Error as err:
        return err.message
    return None

progress = lambda *a, **k: None
out["fit_without_refs"] = message(lambda: app.fit(None, "effnet-lite", False, False, 0.5, True, progress))
out["inspect_before_fit"] = message(lambda: app.inspect_files(None, ["x.png"], 0.5, True, progress))
out["unknown_example"] = message(lambda: app.load_example(None, "nope"))

@app.user_errors
def crash():
    raise KeyError("internal detail")
out["unexpected"] = message(crash)

@app.user_errors
def torch_crash():
    raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x152 and 40x8)")
out["torch_error"] = message(torch_crash)

@app.user_errors
def no_weights():
    raise backbones.WeightsUnavailableError("resnet18 weights are not cached; put them at /x")
out["weights_error"] = message(no_weights)

refs, tests = example_sets()["brick_wall"]
s, gallery, count = app.set_references(None, [str(p) for p in refs[:3]])
out["count"] = count
s, fit_md, slider, budget, gallery, count, *view = app.fit(s, "effnet-lite", False, False, 0.5, True,
                                                           progress)
out["fit_md"] = fit_md
out["budget"] = [budget.value, [value for _, value in budget.choices]]
out["slider"] = [slider.minimum, slider.maximum, slider.value]
digits = max(0, -math.floor(math.log10(slider.step)))
out["slider_rounded"] = all(round(v, digits) == v for v in out["slider"])
(slider, summary, table, results, selector, detail, detail_md, plot, rate, suggested, labels,
 roc) = app.inspect_files(s, [str(p) for p in tests], 0.5, True, progress)
out["summary"] = summary
out["rate"] = rate
out["suggested"] = [caption for _, caption in suggested]
out["suggested_are_sessions"] = [r.name for r in s.suggestions()] == [c.split(" · ")[1]
                                                                     for _, c in suggested]
out["rows"] = len(table)
out["gallery"] = len(results)
out["detail"] = [Image.open(path).size for path in detail]
summary, _, thumbs, *_, rate, suggested, labels, roc = app.set_threshold(s, 1e9, 0.5, True)
out["summary_high"] = summary
out["rate_high"] = rate
out["marks_left_alone"] = labels is gr.skip() or labels == gr.skip()
summary, _, same_verdicts, *_ = app.set_threshold(s, 2e9, 0.5, True)
out["gallery_left_alone"] = same_verdicts is gr.skip() or same_verdicts == gr.skip()
summary, _, flipped, *_, rate, _, _, _ = app.set_threshold(s, 0.0, 0.5, True)
out["rate_zero"] = rate
summary, _, back, *_ = app.set_threshold(s, 1e9, 0.5, True)
out["thumbnails_reused"] = [p for p, _ in back] == [p for p, _ in thumbs] != [p for p, _ in flipped]
out["thumbnails_framed"] = all(Image.open(p).getpixel((0, 0)) == (44, 160, 44) for p, _ in thumbs)
s, fit_md, slider, summary, *_, rate, suggested, labels, roc = app.set_false_alarm_budget(s, 0.01, 0.5, True)
out["budget_fit_md"], out["budget_rate"] = fit_md, rate
out["budget_slider"] = [slider.value, s.detector.threshold, s.detector.thresholds_for(0.01)[0]]
s, review_first = app.set_table_order(s, "review")
out["review_first"] = [row[1] for row in review_first]
out["review_sorted"] = out["review_first"] == sorted(out["review_first"],
                                                    key=["REVIEW", "DEFECT", "OK"].index)
out["table_kept_order"] = [row[1] for row in app.redraw(s, 0.5, True)[1]] == out["review_first"]
app.set_table_order(s, "score")
app.set_false_alarm_budget(s, 0.05, 0.5, True)
fresh, *_ = app.set_false_alarm_budget(None, 0.02, 0.5, True)     # before any fit: kept for it
out["budget_before_fit"] = fresh.false_alarm_budget
s.last_used -= app.SESSION_TTL_S - 5           # nearly expired, then used: idle time restarts
app.set_threshold(s, 1.0, 0.5, True)
out["touched"] = time.monotonic() - s.last_used < 60
Request = type("Request", (), {})
idle_request, busy_request = Request(), Request()
idle_request.session_hash, busy_request.session_hash = "idle-tab", "busy-tab"
idle, busy = app.session_for(None, idle_request), app.session_for(None, busy_request)
idle.references, busy.references = ["kept until reaped"], ["kept"]
idle.last_used -= app.SESSION_TTL_S + 1
busy.last_used -= app.SESSION_TTL_S - 60
out["reaped"] = app.reap_idle_sessions()
out["idle_freed"] = idle.references == [] and "idle-tab" not in app.OPEN_SESSIONS
out["busy_kept"] = busy.references == ["kept"] and "busy-tab" in app.OPEN_SESSIONS
app.free_session(busy)                            # Gradio dropped the tab's state
out["dropped_state_unregistered"] = "busy-tab" not in app.OPEN_SESSIONS

# capacity guard: past the limits new work is refused, running sessions keep everything
app.MAX_SESSIONS = len(app.OPEN_SESSIONS) + 1
full_request, extra_request = Request(), Request()
full_request.session_hash, extra_request.session_hash = "last-seat", "one-too-many"
seated, *_ = app.set_references(None, [str(p) for p in refs[:2]], full_request)
out["session_cap"] = message(lambda: app.set_references(None, [str(p) for p in refs[:2]], extra_request))
out["seated_still_works"] = len(app.set_references(seated, [str(p) for p in refs[:3]], full_request)[0].references)
app.MAX_STORED_BYTES = 1
before = [r.name for r in s.results]
out["stored_cap"] = message(lambda: app.inspect_files(s, [str(tests[0]).replace(".", "_copy.", 1)], 0.5, True, progress))
out["results_kept"] = [r.name for r in s.results] == before and s.is_fitted
out["removal_at_cap"] = len(app.set_references(seated, [str(p) for p in refs[:1]], full_request)[0].references)
app.MAX_SESSIONS, app.MAX_STORED_BYTES = 10**6, 10**15
s4, *_ = app.set_references(None, [str(p) for p in refs[:4]])
out["fit_md_4"] = app.fit(s4, "effnet-lite", False, False, 0.5, True, progress)[1]
out["zip"] = app.export_zip(s).endswith(".zip")
out["empty_view"] = app.render(None, 0.5, True)[0]
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_app_handlers_in_a_child_process():
    env = {**os.environ, CONFIG_ENV: json.dumps(FAST_CONFIG)}
    run = subprocess.run([sys.executable, "-c", APP_CHECKS], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.split("RESULT", 1)[1])
    assert out["backbones_loaded_at_import"] == 0
    assert {"fit", "inspect", "inspect_photo", "set_threshold", "reset_threshold", "set_references",
            "mark_good", "mark_defect", "clear_mark", "use_suggested_threshold", "save_detector",
            "load_detector", "export_zip", "export_onnx", "load_example", "select", "clear_results",
            "set_false_alarm_budget", "set_table_order"} <= set(out["api_names"])
    assert out["default_address"] == ["127.0.0.1", 7860]
    assert out["env_address"] == ["0.0.0.0", 9000]
    assert out["space_address"] == ["0.0.0.0", 7861]
    assert out["flag_address"] == ["::1", 8000]
    assert "at least one good reference" in out["fit_without_refs"]
    assert "fit one on good images" in out["inspect_before_fit"]
    assert "nope" in out["unknown_example"]
    assert "internal detail" not in out["unexpected"] and "unchanged" in out["unexpected"]
    assert "mat1" not in out["torch_error"] and "unchanged" in out["torch_error"]
    assert out["weights_error"].startswith("This feature extractor is not available here: resnet18")
    assert out["slider_rounded"]
    assert out["marks_left_alone"] and out["thumbnails_reused"] and out["thumbnails_framed"]
    assert out["gallery_left_alone"]
    assert out["dropped_state_unregistered"]
    assert "busy" in out["session_cap"] and "try again in a minute" in out["session_cap"]
    assert out["seated_still_works"] == 3
    assert "busy" in out["stored_cap"] and "MB of images" in out["stored_cap"]
    assert out["results_kept"] and out["removal_at_cap"] == 1
    assert out["count"].startswith("**3 good images**")
    assert out["fit_md"].startswith("**Fitted on 3 good images")
    assert "False-alarm budget **5 %**: About 1 in 20 good parts" in out["fit_md"]
    assert "REVIEW above **" in out["fit_md"] and "DEFECT above **" in out["fit_md"]
    assert "Rough thresholds" in out["fit_md"] and "rest on 3 good parts" in out["fit_md"]
    assert "Rough threshold" not in out["fit_md_4"]
    assert out["touched"] and out["reaped"] == 1 and out["idle_freed"] and out["busy_kept"]
    lo, hi, value = out["slider"]
    assert lo <= value <= hi
    assert out["rows"] == out["gallery"] == 6 and out["summary"].startswith("**6 images:")
    assert all(part in out["summary"] for part in (" DEFECT, ", " REVIEW, ", "DEFECT above"))
    assert out["detail"][0] == out["detail"][1]
    assert "0 DEFECT, 0 REVIEW, 6 OK" in out["summary_high"]
    assert "About 1 in 20 good parts will be flagged (REVIEW or DEFECT): 5.0 %" in out["rate"]
    assert "False-alarm budget: 5 %." in out["rate"]
    assert "Fewer than 1 in 10,000" in out["rate_high"] and "Nearly all" in out["rate_zero"]
    assert 1 <= len(out["suggested"]) <= 3 and out["suggested_are_sessions"]
    assert out["budget"] == [0.05, [0.01, 0.02, 0.05, 0.1]]
    assert "False-alarm budget **1 %**" in out["budget_fit_md"]
    assert "About 1 in 100 good parts" in out["budget_rate"]
    slider, threshold, wanted = out["budget_slider"]
    assert threshold == wanted and slider == pytest.approx(threshold, abs=0.01)
    assert out["review_sorted"] and out["table_kept_order"]
    assert out["budget_before_fit"] == 0.02
    assert out["zip"] and out["empty_view"] == "No results yet."


UNLOAD_CHECKS = r"""
import time
from gradio_client import Client, handle_file
from anomaly.examples import example_sets

refs, tests = example_sets()["brick_wall"]
alice, bob = Client(url, verbose=False), Client(url, verbose=False)
for client in (alice, bob):
    client.predict([handle_file(str(p)) for p in refs[:3]], api_name="/set_references")
    client.predict("effnet-lite", False, False, 0.5, True, api_name="/fit")
    client.predict([handle_file(str(p)) for p in tests[:2]], 0.5, True, api_name="/inspect")
out = {"open": sorted(app.OPEN_SESSIONS) == sorted([alice.session_hash, bob.session_hash])}
alice_session = app.OPEN_SESSIONS[alice.session_hash]
out["alice_had"] = [alice_session.is_fitted, len(alice_session.results)]
alice.close()                          # like closing the tab: its heartbeat ends
deadline = time.monotonic() + 60
while alice.session_hash in app.OPEN_SESSIONS and time.monotonic() < deadline:
    time.sleep(0.2)
out["alice_open_after_close"] = alice.session_hash in app.OPEN_SESSIONS
out["alice_left"] = [alice_session.is_fitted, len(alice_session.results), len(alice_session.references)]
summary = bob.predict([handle_file(str(tests[2]))], 0.5, True, api_name="/inspect")[1]
out["bob_summary"] = summary
bob.close()
"""


@pytest.mark.slow
def test_closing_a_tab_frees_its_session_and_spares_the_others():
    """A client that disconnects (tab closed) has its detector, images and maps freed at once
    (not an hour later); another visitor's session keeps working."""
    out = run_beside_app(UNLOAD_CHECKS, json.dumps(FAST_CONFIG))
    assert out["open"] and out["alice_had"] == [True, 2]
    assert not out["alice_open_after_close"]
    assert out["alice_left"] == [False, 0, 0]
    assert out["bob_summary"].startswith("**3 images:")


def odd_files(photo: Path, folder: Path) -> dict[str, tuple[Path, tuple[int, int]]]:
    """Valid but unusual versions of a real photo -> {name: (path, size the session should show)}."""
    rgb = Image.open(photo).convert("RGB").resize((300, 200))
    out = {}

    def save(name, image, size, **kwargs):
        out[name] = (folder / name, size)
        image.save(folder / name, **kwargs)

    save("elongated_10to1.png", rgb.resize((2000, 200)), (768, 77))      # shrunk to WORK_SIDE
    save("eight_px.png", rgb.resize((8, 8)), (8, 8))
    grey16 = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
    save("grey16.png", grey16, (300, 200))
    save("cmyk.jpg", rgb.convert("CMYK"), (300, 200), quality=90)
    palette = rgb.convert("P", palette=Image.ADAPTIVE, colors=64)
    save("palette_transparent.png", palette, (300, 200), transparency=0)
    save("animated.gif", rgb.convert("P"), (300, 200), save_all=True,
         append_images=[rgb.rotate(90).convert("P")], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6                                                     # rotate 90 on display
    save("exif_rotated.jpg", rgb, (200, 300), exif=exif)
    return out


@pytest.mark.slow
def test_unusual_valid_images_are_scored_and_leave_other_results_alone(fitted, brick, tmp_path):
    s = InspectionSession()
    s.load_detector(str(fitted.save_detector()))
    s.inspect([(str(brick.tests[0]), brick.tests[0])])
    first = (s.results[0].score, id(s.results[0].anomaly_map))
    files = odd_files(brick.tests[0], tmp_path)
    scored, problems = s.inspect([(str(p), p) for p, _ in files.values()])
    assert (scored, problems) == (len(files), [])
    by_name = {r.name: r for r in s.results}
    S = s.detector.config.image_size
    for name, (_, size) in files.items():
        result = by_name[name]
        assert result.image.size == size, name
        assert result.anomaly_map.shape == (S, S) and np.isfinite(result.anomaly_map).all(), name
    assert (by_name[brick.tests[0].name].score, id(by_name[brick.tests[0].name].anomaly_map)) == first
    assert s.detector is not None and s.threshold == s.calibrated_threshold


def test_the_session_keeps_answering_while_it_fits(brick):
    """A fit trains outside the session's lock: the same visitor's inspections, threshold and
    marks answer at once, with the current detector, and the new detector rescores them all."""
    s = InspectionSession()
    s.set_references(brick.references)
    s.fit()
    first = s.detector
    with fit_held_in_training(s):
        answered = []
        visitor = threading.Thread(target=lambda: answered.append(
            s.inspect([(str(p), p) for p in brick.tests[:2]])))
        visitor.start()
        visitor.join(60)
        assert answered == [(2, [])] and s.detector is first and s.fitting
        s.set_threshold(s.threshold * 2)
        s.mark(0, True)                            # a defect mark needs no refit
    assert s.detector is not first and not s.fitting
    assert (s.threshold, s.defect_threshold) == label_rule(s)   # the new calibrated ones, marked
    fresh = s.detector.predict([r.image for r in s.results], resolution="model")
    assert [r.score for r in s.results] == pytest.approx([p.pred_score for p in fresh], rel=1e-5)


def test_references_stay_when_their_upload_files_are_gone(brick, tmp_path):
    """The app's upload cache deletes files after an hour; editing the list later keeps the
    references already loaded and adds the new ones."""
    copies = []
    for p in brick.references[:3]:
        copies.append(tmp_path / p.name)
        copies[-1].write_bytes(p.read_bytes())
    s = InspectionSession()
    assert s.set_references(copies[:2]) == []
    for p in copies[:2]:
        p.unlink()
    assert s.set_references(copies) == []
    assert [r.name for r in s.references] == [p.name for p in copies]
    assert s.set_references(copies[1:]) == [] and len(s.references) == 2


def test_marks_find_their_result_by_name_and_refits_redraw_thumbnails(brick, monkeypatch):
    """A mark names its result (the list can shift between a click and the mark: eviction), and
    a refit's new maps give new thumbnails even where the verdict stays the same."""
    s = InspectionSession()
    s.set_references(brick.references[:3])
    s.fit()
    monkeypatch.setattr(session_module, "MAX_RESULTS", 2)
    s.inspect([(str(p), p) for p in brick.tests[:2]])
    clicked = s.results[1].name                      # what the user selected ...
    s.inspect([(str(brick.tests[2]), brick.tests[2])])    # ... before the oldest was evicted
    assert s.results[1].name != clicked
    s.mark(clicked, True)
    assert [r.name for r in s.results if r.label] == [clicked] and s.current().name == clicked
    before = {r.name: s.thumbnail_file(r) for r in s.results}
    s.mark(s.results[0].name, False)                 # joins the references: refit, new maps
    after = {r.name: s.thumbnail_file(r) for r in s.results}
    assert all(after[name] != before[name] for name in after)


def test_a_fresh_fit_prepares_its_predictions_before_the_first_inspection(brick, compilations):
    """With nothing to rescore, the fitted detector's own graph is built in the background, so
    the first inspection compiles nothing."""
    s = InspectionSession()
    s.set_references(brick.references[:3])
    s.fit()
    for thread in threading.enumerate():
        if thread.name == "warm-detector":
            thread.join()
    assert compilations[-1:] == ["FittedHeads"]
    before = len(compilations)
    assert s.inspect([("a.png", brick.tests[0])]) == (1, [])
    assert len(compilations) == before


def test_a_process_that_ends_right_after_a_fit_exits_cleanly(brick):
    """The fitted detector's graph is being built in the background when the script ends: the
    process waits for it instead of aborting inside OpenVINO."""
    script = ("from anomaly.session import InspectionSession\n"
              "from anomaly.examples import example_sets\n"
              "s = InspectionSession()\n"
              "s.set_references(example_sets()['brick_wall'].references[:3])\n"
              "s.fit()\n")
    env = {**os.environ, CONFIG_ENV: json.dumps(FAST_CONFIG)}
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0 and "terminate called" not in run.stderr, run.stderr[-2000:]


# --------------------------------------------------------------------------- live camera

def live_script():
    """scripts/live_fps.py: how the fake camera frames a photo (``camera_frame``)."""
    spec = importlib.util.spec_from_file_location("live_fps", REPO / "scripts" / "live_fps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def camera(data_dir):
    """Bottle photos as the camera shows them (640 x 480): {"refs": 4 good, "good": another good
    one, "broken": a broken one}."""
    frame = live_script().camera_frame
    return {"refs": [frame(p) for p in category_files(data_dir, "bottle", "train/good", 4)],
            "good": frame(category_files(data_dir, "bottle", "test/good", 1)[0]),
            "broken": frame(category_files(data_dir, "bottle", "test/broken_large", 1)[0])}


@pytest.fixture(scope="module")
def camera_fitted(camera):
    """A session fitted on the camera's good frames, taken from the live view."""
    s = InspectionSession()
    for frame in camera["refs"]:
        s.live_frame(frame)
        s.add_camera_reference()
    s.fit()
    return s


def blocking_scores(monkeypatch):
    """Make the session's next scoring wait: -> (started, release) events."""
    started, release = threading.Event(), threading.Event()
    real = session_module._score

    def score(*args, **kwargs):
        started.set()
        release.wait(60)
        return real(*args, **kwargs)
    monkeypatch.setattr(session_module, "_score", score)
    return started, release


def test_live_frames_without_a_detector_show_the_frame_and_say_what_to_do(camera):
    s = InspectionSession()
    with pytest.raises(ValueError, match="No camera frame yet"):
        s.add_camera_reference()
    answer = s.live_frame(camera["good"])
    assert (answer.score, answer.verdict, answer.thresholds) == (None, None, None)
    assert "fit one on good images" in answer.message
    assert answer.overlay.size == (session_module.LIVE_SIDE, 360) and answer.fps is None
    with pytest.raises(ValueError, match="fit one on good images"):
        s.capture()
    assert s.results == []


def test_good_images_from_the_camera_stay_when_the_uploads_change(camera, brick):
    s = InspectionSession()
    s.live_frame(camera["good"])
    s.add_camera_reference()
    s.set_references(brick.references[:2])
    assert [r.name for r in s.references] == [p.name for p in brick.references[:2]] + ["camera_1.png"]
    s.set_references([])
    assert [(r.name, r.camera, r.image.size) for r in s.references] == [("camera_1.png", True, (640, 480))]
    assert s.remove_camera_references() == 1 and s.references == []


@pytest.mark.slow
def test_live_frames_answer_at_the_current_threshold_and_a_capture_scores_like_an_upload(
        camera_fitted, camera, tmp_path):
    s = camera_fitted
    good, broken = s.live_frame(camera["good"]), s.live_frame(camera["broken"])
    assert good.verdict != "DEFECT" and broken.verdict != "OK" and broken.score > good.score
    assert broken.thresholds == (s.threshold, s.defect_threshold) and broken.fps > 0
    assert broken.verdict == verdict(broken.score, s.threshold, s.defect_threshold)
    assert broken.overlay.size == (session_module.LIVE_SIDE, 360)
    bare = s.live_frame(camera["broken"], alpha=0.0, outline=False).overlay   # opacity acts
    assert np.array_equal(np.asarray(bare), np.asarray(session_module.shrink(camera["broken"], 480)))

    s.capture()                                       # the last frame: the broken one
    captured = s.current()
    assert captured.name.startswith("camera_") and captured.score == broken.score
    upload = tmp_path / "broken_frame.png"
    camera["broken"].save(upload)
    s.inspect([(str(upload), upload)])
    assert s.current().score == captured.score        # the same image uploaded: the same score
    assert s.verdict(captured) == broken.verdict

    s.set_threshold(broken.score * 1.01)              # the slider, while streaming
    assert s.live_frame(camera["broken"]).verdict == "OK"
    s.reset_threshold()


def test_frames_arriving_while_one_is_answered_are_dropped(camera, fitted, monkeypatch):
    s = borrowing(fitted)
    started, release = blocking_scores(monkeypatch)
    first = []
    worker = threading.Thread(target=lambda: first.append(s.live_frame(camera["good"])))
    worker.start()
    try:
        assert started.wait(60)
        assert s.live_frame(camera["broken"]) is None          # dropped at once, not queued
    finally:
        release.set()
        worker.join(60)
    assert first[0].score is not None
    assert s.live_frame(camera["broken"]).score != first[0].score    # the next one is answered


@pytest.mark.slow
def test_a_refit_during_streaming_answers_with_the_old_detector_then_the_new(camera):
    s = InspectionSession()
    s.live_frame(camera["refs"][0])
    s.add_camera_reference()
    with fit_held_in_training(s):
        assert "still being fitted" in s.live_frame(camera["good"]).message   # the first fit
    first = s.detector
    for frame in camera["refs"][1:]:
        s.live_frame(frame)
        s.add_camera_reference()
    with fit_held_in_training(s):
        during = s.live_frame(camera["broken"])
        assert s.fitting and s.detector is first
        assert during.score == first.predict(camera["broken"], resolution="model").pred_score
    after = s.live_frame(camera["broken"])
    assert s.detector is not first and len(s.references) == 4
    assert after.thresholds == (s.detector.threshold, s.detector.defect_threshold)
    assert after.score == s.detector.predict(camera["broken"], resolution="model").pred_score


def test_a_session_freed_while_streaming_finishes_the_frame_then_starts_over(camera, fitted,
                                                                             monkeypatch):
    s = borrowing(fitted)
    started, release = blocking_scores(monkeypatch)
    answers = []
    worker = threading.Thread(target=lambda: answers.append(s.live_frame(camera["good"])))
    worker.start()
    closing = threading.Thread(target=s.close)
    try:
        assert started.wait(60)
        closing.start()
        closing.join(0.5)
        assert closing.is_alive()                     # close() waits for the frame ...
    finally:
        release.set()
        worker.join(60)
        closing.join(60)
    assert answers[0].verdict is not None             # ... which is answered
    assert s.detector is None and s.stored_bytes() == 0
    with pytest.raises(ValueError, match="No camera frame yet"):
        s.add_camera_reference()                      # the frame went with the session
    assert "fit one on good images" in s.live_frame(camera["good"]).message


LIVE_APP_CHECKS = r"""
import json, sys
import gradio as gr
from PIL import Image
import app

frames = [Image.open(p) for p in sys.argv[1:]]
out = {}

def message(call):
    try:
        call()
    except gr.Error as err:
        return err.message
    return None

progress = lambda *a, **k: None
skip = gr.skip()
out["no_frame"] = app.live_frame(None, None, 0.5, True) == (skip,) * 3
s, overlay, text = app.live_frame(None, frames[0], 0.5, True)
out["unfitted"] = [text, list(overlay.size)]
out["capture_unfitted"] = message(lambda: app.capture_frame(s, 0.5, True))
out["capture_none"] = message(lambda: app.capture_frame(None, 0.5, True))
for frame in frames[:-1]:
    app.live_frame(s, frame, 0.5, True)
    s, gallery, count = app.add_camera_reference(s)
out["count"] = count
out["fit_md"] = app.fit(s, "effnet-lite", False, False, 0.5, True, progress)[1]
for _ in range(2):                                  # the second has a frame rate
    s, overlay, text = app.live_frame(s, frames[-1], 0.5, True)
out["fitted"] = text
s._live_busy.acquire()
out["busy_skips"] = app.live_frame(s, frames[0], 0.5, True) == (skip,) * 3
s._live_busy.release()
slider, summary, table, *_ = app.capture_frame(s, 0.5, True)
out["captured"] = [summary, table]
out["dropped"] = app.remove_camera_references(s)[2]
out["api"] = {fn.api_name: fn.api_visibility for fn in app.demo.fns.values()}
live = next(fn for fn in app.demo.fns.values() if fn.connection == "stream")
out["stream"] = [live.time_limit, live.stream_every, live.concurrency_limit, live.concurrency_id]
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_the_apps_live_handlers_in_a_child_process(camera, tmp_path):
    paths = []
    for i, frame in enumerate(camera["refs"][:3] + [camera["broken"]]):
        paths.append(tmp_path / f"frame_{i}.png")
        frame.save(paths[-1])
    env = {**os.environ, CONFIG_ENV: json.dumps(FAST_CONFIG)}
    run = subprocess.run([sys.executable, "-c", LIVE_APP_CHECKS, *map(str, paths)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.split("RESULT", 1)[1])
    assert out["no_frame"] and out["busy_skips"]
    text, size = out["unfitted"]
    assert text.startswith("No detector yet: fit one on good images") and "button below" in text
    assert "first frame" in text and size == [480, 360]
    assert "fit one on good images" in out["capture_unfitted"]
    assert "fit one on good images" in out["capture_none"]
    assert out["count"].startswith("**3 good images**")
    assert out["fit_md"].startswith("**Fitted on 3 good images")
    assert out["fitted"].split("**")[1] in VERDICTS and "DEFECT above" in out["fitted"]
    assert "frames/s answered" in out["fitted"] and "ms per frame here" in out["fitted"]
    summary, table = out["captured"]
    assert summary.startswith("**1 image:") and table[0][0].startswith("camera_")
    assert out["dropped"].startswith("No good images yet")
    assert out["api"]["capture_frame"] == out["api"]["add_camera_reference"] == "public"
    assert out["api"]["live_frame"] == "private"
    assert out["stream"] == [60, 0.1, 2, "live"]
