"""Detector files are data, not code: crafted or damaged files are refused with a clear error."""
import json
import pickle
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from anomaly import DetectorConfig, PFMDetector

TINY = DetectorConfig(steps=5, views=4)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    det = PFMDetector(TINY)
    rng = np.random.default_rng(0)
    det.fit([rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(2)])
    path = det.save(tmp_path_factory.mktemp("model") / "det.safetensors")
    return det, path


def _header(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write(path, header, body):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return path


def test_round_trip_keeps_config_thresholds_and_calibration(saved):
    det, path = saved
    loaded = PFMDetector.load(path)
    assert loaded.config == det.config
    assert (loaded.threshold, loaded.defect_threshold) == (det.threshold, det.defect_threshold)
    assert torch.equal(loaded.calibration_scores, det.calibration_scores)
    assert torch.equal(loaded.reference_scores, det.reference_scores)
    assert loaded.good_scores == det.good_scores
    assert loaded.expected_false_alarm_rate(1.1 * det.threshold) == det.expected_false_alarm_rate(1.1 * det.threshold)
    header, _ = _header(path)
    meta = header["__metadata__"]
    assert meta["format_version"] == "3" and meta["source_backbone"] == "efficientnet_lite0"


def test_a_budget_changed_after_loading_rethresholds_from_the_saved_evidence(saved):
    det, path = saved
    loaded = PFMDetector.load(path)
    loaded.set_false_alarm_budget(0.01)
    assert loaded.config.false_alarm_budget == 0.01
    assert loaded.threshold > det.threshold
    assert loaded.expected_false_alarm_rate(loaded.threshold) == pytest.approx(0.01, rel=1e-3)


def test_a_version_2_file_still_loads_with_three_verdicts(saved, tmp_path):
    """Files saved before the good-score model: one threshold, a config with threshold_margin."""
    det, path = saved
    header, body = _header(path)
    old = {k: v for k, v in load_file(str(path)).items()
           if k not in ("reference_scores", "good_score_model", "defect_threshold")}
    config = json.loads(header["__metadata__"]["config"])
    config = {k: v for k, v in config.items() if k not in ("false_alarm_budget", "defect_rate_ratio")}
    config["threshold_margin"] = 0.05
    v2 = tmp_path / "v2.safetensors"
    save_file(old, str(v2), metadata={**header["__metadata__"], "format_version": "2",
                                      "config": json.dumps(config)})
    loaded = PFMDetector.load(v2)
    assert loaded.threshold == det.threshold                       # the threshold it was saved with
    assert loaded.defect_threshold >= loaded.threshold
    assert 0.0 < loaded.expected_false_alarm_rate(loaded.threshold) < 0.5
    image = np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    assert loaded.predict(image).verdict in ("OK", "REVIEW", "DEFECT")


def test_saving_an_unfitted_detector_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="fit"):
        PFMDetector(TINY).save(tmp_path / "x.safetensors")


class Payload:
    def __reduce__(self):
        return (exec, ("open('/tmp/pwned_by_detector_file', 'w').write('x')",))


def test_pickle_with_payload_is_not_executed(tmp_path):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"weights": Payload()}))
    with pytest.raises(ValueError, match="not a detector file"):
        PFMDetector.load(path)
    import os
    assert not os.path.exists("/tmp/pwned_by_detector_file")


def test_torch_save_file_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not a detector file"):
        PFMDetector.load(path)


@pytest.mark.parametrize("cut", [0, 4, 8, 100, -10])
def test_truncated_files(saved, tmp_path, cut):
    _, path = saved
    data = path.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    with pytest.raises(ValueError):
        PFMDetector.load(bad)


def test_huge_header_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(ValueError, match="header"):
        PFMDetector.load(path)


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a detector file saved by this tool"):
        PFMDetector.load(path)


def test_wrong_tensor_shape(saved, tmp_path):
    det, _ = saved
    tensors = {k: v.clone() for k, v in det.tensors().items()}
    key = next(k for k in tensors if k.endswith("shared.weight"))
    tensors[key] = torch.zeros(3, 3)
    meta = {"format": "pfm-anomaly-detector", "format_version": "3",
            "config": json.dumps(__import__("dataclasses").asdict(det.config))}
    path = tmp_path / "shape.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="shape"):
        PFMDetector.load(path)


CONFIG_ATTACKS = [
    ({"steps": "200"}, "must be int"),
    ({"steps": True}, "must be int"),
    ({"backbone": ["effnet-lite"]}, "must be str"),
    ({"__class__": "os.system"}, "unknown fields"),
    ({"image_size": 100}, "image_size"),
    ({"min_latent": 6000}, "min_latent"),              # would build multi-GB nets
    ({"latent_ratio": 1e6}, "latent_ratio"),
    ({"sigma": float("inf")}, "sigma"),                # json writes Infinity, Python reads it
    ({"sigma": float("nan")}, "sigma"),
    ({"sigma": 1e9}, "sigma"),                         # would size a huge blur kernel
    ({"bank_size": 10**9}, "bank_size"),
    ({"steps": -1}, "steps"),
]


@pytest.mark.parametrize("change,message", CONFIG_ATTACKS)
def test_crafted_config_is_refused_fast_and_small(saved, tmp_path, change, message):
    """Wrong types and out-of-range values are refused before anything is built: little CPU
    time (not wall-clock), and the process's peak memory grows by under 100 MB."""
    import resource
    import time
    _, path = saved
    header, body = _header(path)
    config = json.loads(header["__metadata__"]["config"])
    config.update(change)
    header["__metadata__"]["config"] = json.dumps(config)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.process_time()
    with pytest.raises(ValueError, match=message):
        PFMDetector.load(_write(tmp_path / "cfg.safetensors", header, body))
    assert time.process_time() - started < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000   # KiB


@pytest.mark.parametrize("name,value,message", [
    ("threshold", torch.tensor(-1.0), "positive"),
    ("scales", torch.tensor([1.0, float("nan")]), "NaN"),
    ("bank", torch.zeros(10**5, 304), "bank"),
    ("bank", torch.zeros(10, 7), "bank"),
    ("defect_threshold", torch.tensor(0.0), "below the threshold"),
    ("good_score_model", torch.tensor([0.4, -1.0], dtype=torch.float64), "not a good-score model"),
    ("reference_scores", torch.tensor([1.0, -2.0]), "positive"),
])
def test_crafted_tensors_are_refused(saved, tmp_path, name, value, message):
    det, path = saved
    tensors = {k: v.clone() for k, v in det.tensors().items()}
    tensors[name] = value
    header, _ = _header(path)
    bad = tmp_path / "t.safetensors"
    save_file(tensors, str(bad), metadata=header["__metadata__"])
    with pytest.raises(ValueError, match=message):
        PFMDetector.load(bad)


def test_config_that_is_not_json(saved, tmp_path):
    _, path = saved
    header, body = _header(path)
    header["__metadata__"]["config"] = "{not json"
    with pytest.raises(ValueError, match="JSON"):
        PFMDetector.load(_write(tmp_path / "bad.safetensors", header, body))


def test_future_format_version(saved, tmp_path):
    _, path = saved
    header, body = _header(path)
    header["__metadata__"]["format_version"] = "99"
    with pytest.raises(ValueError, match="version"):
        PFMDetector.load(_write(tmp_path / "v99.safetensors", header, body))
