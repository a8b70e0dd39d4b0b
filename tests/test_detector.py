"""The detector fitted on real good photos: shapes, verdicts, calibration, persistence, errors."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from anomaly import DetectorConfig, PFMDetector, Prediction
from anomaly.detector import MAX_REFERENCES, augment
from anomaly.mapping import BidirectionalMapping, fold_batchnorm, mapping_error
from conftest import category_files

SMALL = dict(steps=60, views=16)


@pytest.fixture(scope="module")
def bottle(data_dir):
    refs = category_files(data_dir, "bottle", "train/good", 4)
    det = PFMDetector(DetectorConfig(**SMALL))
    calls = []
    report = det.fit(refs, progress=lambda f, m: calls.append((f, m)))
    return det, report, calls


def test_fit_reports_progress_and_calibrates(bottle):
    det, report, calls = bottle
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {"extracting features"} <= {m for _, m in calls}
    assert report.n_references == 4 and det.is_fitted
    assert len(det.calibration_scores) == 2 * 4                 # ceil(4 / 3) held-out references x 4 views
    assert len(det.reference_scores) == 4                       # each reference, leave-one-out
    budget = det.config.false_alarm_budget
    assert det.expected_false_alarm_rate(det.threshold) == pytest.approx(budget, rel=1e-4)
    assert det.expected_false_alarm_rate(det.defect_threshold) == pytest.approx(
        budget * det.config.defect_rate_ratio, rel=1e-3)
    assert det.threshold < det.defect_threshold
    assert float(np.median(det.calibration_scores)) < det.threshold
    lo, hi = det.score_range
    assert lo < det.threshold < hi


def test_the_budget_sets_the_thresholds(bottle):
    det, _, _ = bottle
    strict, loose = det.thresholds_for(0.01), det.thresholds_for(0.2)
    assert loose[0] < det.threshold < strict[0] and loose[1] < strict[1]
    assert det.defect_threshold_for(det.threshold) == pytest.approx(det.defect_threshold, rel=1e-6)


def test_scores_between_the_thresholds_are_sent_to_review(bottle, data_dir):
    det, _, _ = bottle
    pred = det.predict(category_files(data_dir, "bottle", "test/good", 1)[0])
    for score, verdict in ((det.threshold * 0.99, "OK"), ((det.threshold + det.defect_threshold) / 2, "REVIEW"),
                           (det.defect_threshold * 1.01, "DEFECT")):
        moved = Prediction(pred.anomaly_map, score, 0.5, det.threshold, det.defect_threshold)
        assert moved.verdict == verdict and moved.pred_label == (verdict != "OK")


def test_defects_score_above_good_parts(bottle, data_dir):
    det, _, _ = bottle
    good = det.predict(category_files(data_dir, "bottle", "test/good", 6))
    bad = det.predict(category_files(data_dir, "bottle", "test/broken_large", 6))
    assert min(p.pred_score for p in bad) > np.median([p.pred_score for p in good])
    assert sum(p.verdict != "OK" for p in bad) >= 5
    assert sum(p.verdict == "OK" for p in good) >= 4


def test_prediction_fields(bottle, data_dir):
    det, _, _ = bottle
    path = category_files(data_dir, "magnetic_tile", "test/good", 1)[0]
    pred = det.predict(path)
    assert isinstance(pred, Prediction)
    from PIL import Image
    w, h = Image.open(path).size
    assert pred.anomaly_map.shape == (h, w) and pred.anomaly_map.dtype == np.float32
    assert 0.0 <= pred.norm_score <= 1.0
    assert (pred.norm_score > 0.5) == pred.pred_label == (pred.pred_score > pred.threshold)
    assert pred.pred_score == pytest.approx(float(det.predict(path, resolution="model").anomaly_map.max()))
    S = DetectorConfig.image_size
    assert det.predict(path, resolution="model").anomaly_map.shape == (S, S)
    assert det.predict([]) == []


def test_save_load_round_trip_gives_same_scores(bottle, data_dir, tmp_path):
    det, _, _ = bottle
    path = det.save(tmp_path / "bottle.safetensors")
    loaded = PFMDetector.load(path)
    images = category_files(data_dir, "bottle", "test/contamination", 3)
    for a, b in zip(det.predict(images), loaded.predict(images)):
        assert a.pred_score == pytest.approx(b.pred_score, rel=1e-6)
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-5, atol=1e-7)
    assert loaded.threshold == pytest.approx(det.threshold)
    assert loaded.config == det.config


def test_same_seed_same_detector(data_dir):
    refs = category_files(data_dir, "bottle", "train/good", 2)
    image = category_files(data_dir, "bottle", "test/broken_small", 1)
    scores = []
    for _ in range(2):
        det = PFMDetector(DetectorConfig(steps=20, views=8, seed=3))
        det.fit(refs)
        scores.append((det.threshold, det.predict(image)[0].pred_score))
    assert scores[0] == scores[1]


def test_a_busy_machine_gives_the_same_detector(data_dir):
    """Training runs a fixed number of steps, never against the clock: two CPU-bound processes
    beside the fit change nothing."""
    refs = category_files(data_dir, "bottle", "train/good", 3)
    image = category_files(data_dir, "bottle", "test/broken_small", 1)

    def fit_and_score():
        det = PFMDetector(DetectorConfig(steps=40, views=12, seed=5))
        report = det.fit(refs)
        return report.steps, det.threshold, det.predict(image)[0].pred_score

    idle = fit_and_score()
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        busy = fit_and_score()
    finally:
        for p in burners:
            p.kill()
    assert busy == idle and idle[0] == 40


def test_single_reference_gives_a_usable_threshold(data_dir):
    det = PFMDetector(DetectorConfig(**SMALL))
    det.fit(category_files(data_dir, "bottle", "train/good", 1))
    assert len(det.calibration_scores) == 8 and np.isfinite(det.threshold)
    bad = det.predict(category_files(data_dir, "bottle", "test/broken_large", 4))
    assert sum(p.pred_label for p in bad) >= 3


def test_errors_are_clear():
    det = PFMDetector(DetectorConfig(**SMALL))
    with pytest.raises(RuntimeError, match="fit"):
        det.predict(np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match="between 1 and"):
        det.fit([])
    with pytest.raises(ValueError, match="between 1 and"):
        det.fit([np.zeros((32, 32), np.uint8)] * (MAX_REFERENCES + 1))
    with pytest.raises(ValueError, match="reference 2"):
        det.fit([np.zeros((32, 32), np.uint8), b"not an image"])
    assert not det.is_fitted
    with pytest.raises(ValueError, match="image_size"):
        DetectorConfig(image_size=100)
    with pytest.raises(ValueError, match="backbone"):
        DetectorConfig(backbone="nope")


def test_failed_fit_keeps_the_previous_model(bottle):
    det, _, _ = bottle
    before = det.threshold
    with pytest.raises(ValueError):
        det.fit([b"garbage"])
    assert det.threshold == before


def test_folding_batchnorm_keeps_the_mapping_error():
    torch.manual_seed(0)
    net = BidirectionalMapping(24, 40, 48)
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm1d)):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 3.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    net.eval()
    source, target = torch.randn(500, 24), torch.randn(500, 40)
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in net.modules())   # original untouched
    with torch.no_grad():
        torch.testing.assert_close(mapping_error(folded, source, target), mapping_error(net, source, target),
                                   rtol=1e-4, atol=1e-5)


def test_detectors_share_the_frozen_backbones_and_never_change_them(bottle, data_dir):
    det, _, _ = bottle
    other = PFMDetector(DetectorConfig(**SMALL))
    assert other.backbones.source is det.backbones.source          # loaded once per process
    assert not isinstance(det, torch.nn.Module)                     # no .train()/.half() reaching them
    before = {k: v.clone() for k, v in det.backbones.source.state_dict().items()}
    other.fit(category_files(data_dir, "bottle", "train/good", 2))
    assert not det.backbones.source.training
    for k, v in det.backbones.source.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert other.mappings is not det.mappings and other.bank.data_ptr() != det.bank.data_ptr()


@pytest.mark.parametrize("score", ["pfm", "knn"])
def test_each_score_alone_finds_defects(data_dir, score):
    det = PFMDetector(DetectorConfig(score=score, **SMALL))
    det.fit(category_files(data_dir, "bottle", "train/good", 4))
    assert det.bank.shape[0] == (0 if score == "pfm" else DetectorConfig.bank_size)   # 16 views x 32 x 32 > 4096
    good = det.predict(category_files(data_dir, "bottle", "test/good", 4))
    bad = det.predict(category_files(data_dir, "bottle", "test/broken_large", 4))
    assert min(p.pred_score for p in bad) > max(p.pred_score for p in good)


def test_memory_bank_is_a_coreset_of_the_views(data_dir):
    det = PFMDetector(DetectorConfig(bank_size=500, **SMALL))
    det.fit(category_files(data_dir, "bottle", "train/good", 2))
    assert det.bank.shape == (500, det.embedding_channels)
    assert len(torch.unique(det.bank, dim=0)) == 500                 # no vector chosen twice


def test_augment_keeps_originals_and_varies_the_rest():
    images = torch.rand(2, 3, 64, 64)
    views = augment(images, 4, DetectorConfig(), torch.Generator().manual_seed(0))
    assert views.shape == (8, 3, 64, 64)
    assert torch.allclose(views[0], images[0], atol=1e-5)
    assert torch.allclose(views[4], images[1], atol=1e-5)
    assert not torch.allclose(views[1], images[0], atol=1e-2)


def test_core_package_does_not_import_gradio():
    code = "import sys, anomaly, anomaly.detector; assert 'gradio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pad_mode_keeps_aspect_ratio_and_scores_only_the_content():
    from PIL import Image
    from anomaly.detector import to_tensor
    wide = Image.fromarray(np.tile(np.arange(200, dtype=np.uint8), (50, 1)))      # 200 x 50
    x, content = to_tensor([wide], 64, "pad")
    assert x.shape == (1, 3, 64, 64) and content == [(16, 64)]
    assert torch.allclose(x[0, :, 16:32], x[0, :, 0:16].flip(1))                  # mirrored margin
    _, content = to_tensor([wide], 64, "stretch")
    assert content == [(64, 64)]


def test_pad_mode_end_to_end(data_dir):
    det = PFMDetector(DetectorConfig(steps=20, views=8, resize="pad"))
    det.fit(category_files(data_dir, "magnetic_tile", "train/good", 2))
    path = category_files(data_dir, "magnetic_tile", "test/uneven", 2)[1]
    pred = det.predict(path)
    from PIL import Image
    assert pred.anomaly_map.shape == Image.open(path).size[::-1]
    S = DetectorConfig.image_size
    assert det.predict(path, resolution="model").anomaly_map.shape == (S, S)
