"""The scoring heads compiled by OpenVINO compute what PyTorch eager computes, on real photos."""
import numpy as np
import pytest
import torch

from anomaly import DetectorConfig, PFMDetector, runtime
from anomaly.detector import to_tensor
from anomaly import heads as heads_module
from anomaly.heads import FittedHeads, ScoringHeads
from anomaly.image_io import load_image
from conftest import category_files


@pytest.fixture(scope="module")
def fitted(data_dir):
    """A small detector fitted in PyTorch eager, and real test photos (screw defects, good bottles)."""
    eager = PFMDetector(DetectorConfig(steps=20, views=8), runtime="torch")
    eager.fit(category_files(data_dir, "bottle", "train/good", 3))
    paths = category_files(data_dir, "screw", "test/thread_side", 2) + category_files(data_dir, "bottle", "test/good", 2)
    return eager, paths


def _twin(eager: PFMDetector, config: DetectorConfig | None = None) -> PFMDetector:
    compiled = PFMDetector(config or eager.config, runtime="openvino")
    compiled.load_tensors(eager.tensors())
    return compiled


@pytest.mark.parametrize("score", ["hybrid", "pfm", "knn"])
def test_compiled_heads_give_pytorchs_maps_in_float32(fitted, monkeypatch, score):
    """Both components (what the fit calibrates on) and the final maps, within 1e-4 of the
    threshold; "pfm" has an empty bank, "knn" zeroes PFM's map."""
    monkeypatch.setenv("ANOMALY_PRECISION", "f32")
    eager, paths = fitted
    config = DetectorConfig(**{**vars(eager.config), "score": score})
    reference = PFMDetector(config, runtime="torch")
    reference.load_tensors(eager.tensors())
    if score == "pfm":
        reference.bank = torch.empty(0, reference.embedding_channels)
    compiled = _twin(reference, config)
    x, _ = to_tensor([load_image(p) for p in paths], config.image_size)
    features = reference.backbones.features(x)
    for a, b in zip(compiled._components(compiled.mappings, compiled.bank, *features),
                    reference._components(reference.mappings, reference.bank, *features)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * float(b.abs().max().clamp_min(1.0)))
    maps_a, scores_a = compiled.anomaly_maps(paths)
    maps_b, scores_b = reference.anomaly_maps(paths)
    assert compiled.runtime == "openvino"
    assert np.abs(maps_a - maps_b).max() < 1e-4 * reference.threshold
    np.testing.assert_allclose(scores_a, scores_b, rtol=1e-4)


def test_position_encoding_is_part_of_the_compiled_heads(fitted, data_dir, monkeypatch):
    monkeypatch.setenv("ANOMALY_PRECISION", "f32")
    eager, paths = fitted
    config = DetectorConfig(steps=5, views=4, position_encoding=True)
    reference = PFMDetector(config, runtime="torch")
    reference.fit(category_files(data_dir, "bottle", "train/good", 2))
    compiled = _twin(reference)
    maps_a, _ = compiled.anomaly_maps(paths)
    maps_b, _ = reference.anomaly_maps(paths)
    assert np.abs(maps_a - maps_b).max() < 1e-4 * reference.threshold


@pytest.mark.skipif(not runtime.native_bf16(), reason="this CPU has no native bfloat16")
def test_bfloat16_keeps_the_maps_and_verdicts(fitted):
    """bfloat16, the default where the CPU has it: maps within 10 % of the threshold, scores
    within 3 %, and the same verdict for every image not within 3 % of the threshold."""
    eager, paths = fitted
    compiled = _twin(eager)
    assert runtime.default_precision() == "bf16"
    maps_a, scores_a = compiled.anomaly_maps(paths)
    maps_b, scores_b = eager.anomaly_maps(paths)
    assert np.abs(maps_a - maps_b).max() < 0.1 * eager.threshold
    np.testing.assert_allclose(scores_a, scores_b, rtol=0.03)
    clear = np.abs(scores_b - eager.threshold) > 0.03 * eager.threshold
    assert ((scores_a > eager.threshold) == (scores_b > eager.threshold))[clear].all()


@pytest.mark.skipif(not runtime.native_bf16(), reason="this CPU has no native bfloat16")
def test_bfloat16_predictions_give_scores_of_float32_resolution(fitted, data_dir):
    """The graph computes in bfloat16, but the map is smoothed and its maximum taken in float32:
    as many distinct scores as PyTorch gives, within 3 % of PyTorch's, and not bfloat16 numbers
    (whose steps near a score of 2-4 are 0.0156: many images would share one score)."""
    eager, _ = fitted
    compiled = _twin(eager)
    paths = category_files(data_dir, "bottle", "test/good") + category_files(data_dir, "bottle", "test/broken_small")
    maps_a, scores_a = compiled.anomaly_maps(paths)
    _, scores_b = eager.anomaly_maps(paths)
    assert len(np.unique(scores_a)) == len(np.unique(scores_b)) == len(paths)
    np.testing.assert_allclose(scores_a, scores_b, rtol=0.03)
    as_bf16 = torch.from_numpy(scores_a).to(torch.bfloat16).float().numpy()
    assert (as_bf16 != scores_a).mean() > 0.9
    assert maps_a.dtype == np.float32 and len(np.unique(maps_a[0])) > 1000


def test_one_heads_graph_serves_every_fit_and_each_detector_compiles_its_own_once(data_dir, compilations):
    """Every fit's held-out scoring runs one shared heads graph; each fitted detector's
    predictions run its own (its nets and bank as constants), compiled on its first prediction
    only. A second detector of the same architecture compiles nothing else."""
    config = DetectorConfig(steps=10, views=6, image_size=112)            # a size no other test uses
    references = category_files(data_dir, "bottle", "train/good", 3)
    first = PFMDetector(config, runtime="openvino")
    first.fit(references)
    first.predict(references[0])
    first.predict(references[1:])
    backbones = 4 if runtime.native_bf16() else 2       # the fit's float32 and the predictions' bfloat16
    assert sorted(set(compilations)) == ["FittedHeads", "ScoringHeads", "_Normalised"]
    assert compilations.count("ScoringHeads") == 1 and compilations.count("FittedHeads") == 1
    assert len(compilations) == 2 + backbones
    second = PFMDetector(config, runtime="openvino")
    second.fit(references[1:])
    second.predict(references[0])
    assert compilations.count("FittedHeads") == 2 and len(compilations) == 3 + backbones
    assert second.runtime == "openvino"


def test_a_detector_predicts_with_the_state_it_holds_now(fitted, data_dir, monkeypatch):
    """Its own heads graph is rebuilt when it adopts other nets and bank (load_tensors, which
    changes the nets in place) and when its bank is replaced."""
    monkeypatch.setenv("ANOMALY_PRECISION", "f32")
    eager, paths = fitted
    compiled = PFMDetector(eager.config, runtime="openvino")
    other = PFMDetector(DetectorConfig(**{**vars(eager.config), "seed": 1}), runtime="torch")
    other.fit(category_files(data_dir, "bottle", "train/good", 6)[3:])
    for reference in (eager, other, eager):
        compiled.load_tensors(reference.tensors())
        maps, _ = compiled.anomaly_maps(paths[:2])
        assert np.abs(maps - reference.anomaly_maps(paths[:2])[0]).max() < 1e-4 * reference.threshold
    compiled.bank = reference.bank = reference.bank[: len(reference.bank) // 4].clone()
    maps, _ = compiled.anomaly_maps(paths[:2])
    assert np.abs(maps - reference.anomaly_maps(paths[:2])[0]).max() < 1e-4 * reference.threshold


@pytest.mark.parametrize("broken, runs_on", [((FittedHeads,), "openvino"), ((FittedHeads, ScoringHeads), "torch")])
def test_heads_that_fail_to_compile_leave_the_detector_working(fitted, monkeypatch, broken, runs_on):
    """A detector's own heads that fail fall back to the shared heads graph; where that fails
    too, the heads run in PyTorch."""
    eager, paths = fitted
    real = runtime.compile_module

    def heads_broken(module, inputs, dynamic, precision, threads=None):
        if isinstance(module, broken):
            raise RuntimeError("compiler broke")
        return real(module, inputs, dynamic, precision, threads)
    monkeypatch.setattr(runtime, "compile_module", heads_broken)
    config = DetectorConfig(**{**vars(eager.config), "sigma": 3.0 + len(broken)})   # graphs no other test built
    reference = PFMDetector(config, runtime="torch")
    reference.load_tensors(eager.tensors())
    compiled = _twin(reference, config)
    maps_a, _ = compiled.anomaly_maps(paths[:1])
    maps_b, _ = reference.anomaly_maps(paths[:1])
    assert compiled.runtime == runs_on
    assert np.abs(maps_a - maps_b).max() < 0.1 * reference.threshold       # backbones still compiled


def test_precision_is_chosen_by_environment(monkeypatch):
    monkeypatch.setenv("ANOMALY_PRECISION", "f32")
    assert runtime.default_precision() == "f32"
    monkeypatch.setenv("ANOMALY_PRECISION", "fp8")
    with pytest.raises(ValueError, match="choose one of"):
        runtime.default_precision()
    monkeypatch.delenv("ANOMALY_PRECISION")
    assert runtime.default_precision() == ("bf16" if runtime.native_bf16() else "f32")


def test_warm_builds_everything_a_fit_and_predictions_need(data_dir, compilations):
    """What the app does in the background after start: the first visitor's fit compiles nothing."""
    config = DetectorConfig(steps=10, views=6, image_size=96)             # a size no other test uses
    PFMDetector(config, runtime="openvino").warm()
    backbones = 4 if runtime.native_bf16() else 2       # the fit's float32 and the predictions' bfloat16
    assert sorted(compilations) == ["ScoringHeads"] + ["_Normalised"] * backbones
    detector = PFMDetector(config, runtime="openvino")
    references = category_files(data_dir, "bottle", "train/good", 3)
    detector.fit(references)
    assert len(compilations) == 1 + backbones
    detector.predict(references[0])                    # its own heads: all that is left to build
    assert compilations[1 + backbones:] == ["FittedHeads"]


def test_the_fit_learns_from_float32_features_whatever_predictions_compute_in(data_dir, monkeypatch):
    """bfloat16 features in the bank and the nets' training cost screw 0.013 of image AUROC, so
    the fit's features are float32 everywhere: the bank is the same under either precision."""
    config = DetectorConfig(steps=5, views=6, image_size=128)
    references = category_files(data_dir, "bottle", "train/good", 3)
    default = PFMDetector(config, runtime="openvino")
    default.fit(references)
    monkeypatch.setenv("ANOMALY_PRECISION", "f32")
    float32 = PFMDetector(config, runtime="openvino")
    float32.fit(references)
    torch.testing.assert_close(default.bank, float32.bank, rtol=0, atol=0)


def test_the_shared_heads_graphs_are_capped(monkeypatch):
    """One shared graph per (architecture, size, sigma); the MAX_GRAPHS most recently asked for
    are kept."""
    monkeypatch.setattr(heads_module, "_graphs", type(heads_module._graphs)())
    monkeypatch.setattr(heads_module, "MAX_GRAPHS", 2)
    heads = lambda sigma: PFMDetector(DetectorConfig(sigma=sigma), runtime="openvino")._heads
    first, second = heads(1.0), heads(2.0)
    assert heads(1.0) is first                      # shared, and now the most recent
    third = heads(3.0)                              # drops sigma 2, the least recent
    assert len(heads_module._graphs) == 2
    assert heads(1.0) is first and heads(3.0) is third
    assert heads(2.0) is not second                 # built again
