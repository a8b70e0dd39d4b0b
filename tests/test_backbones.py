"""The default backbones carry real ImageNet weights, mapped onto timm correctly."""
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data

from anomaly.backbones import (BACKBONE_PAIRS, WeightsUnavailableError, build_effnet_lite_classifier,
                               load_pair, map_effnet_checkpoint)


def _classify(model, image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.inference_mode():
        return model((x - 0.5) / 0.5).softmax(-1)[0]


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1"])
def test_effnet_lite_weights_classify_photos_like_imagenet(name):
    model = build_effnet_lite_classifier(name)
    coffee = _classify(model, data.coffee())
    assert coffee.argmax().item() == 967          # espresso
    assert coffee.max().item() > 0.5
    cat = _classify(model, data.chelsea())
    assert 281 <= cat.argmax().item() <= 285       # a domestic cat class


def test_checkpoint_mapping_rejects_shape_mismatch():
    target = {"a.weight": torch.zeros(3, 4), "b.weight": torch.zeros(5)}
    good = {"_x.weight": torch.ones(3, 4), "_y.weight": torch.ones(5)}
    assert set(map_effnet_checkpoint(good, target)) == {"a.weight", "b.weight"}
    with pytest.raises(ValueError, match="shape mismatch"):
        map_effnet_checkpoint({"_x.weight": torch.ones(4, 3), "_y.weight": torch.ones(5)}, target)
    with pytest.raises(ValueError, match="tensors"):
        map_effnet_checkpoint({"_x.weight": torch.ones(3, 4)}, target)


def test_default_pair_gives_three_unit_norm_levels_at_strides_4_8_16():
    source, target = load_pair("effnet-lite")
    x = torch.rand(2, 3, 128, 96)
    for extractor in (source, target):
        feats = extractor(x)
        assert [f.shape[2:] for f in feats] == [(32, 24), (16, 12), (8, 6)]
        assert [f.shape[1] for f in feats] == extractor.channels
        for f in feats:
            assert torch.allclose(f.norm(dim=1), torch.ones(1), atol=1e-4)


def test_pairs_are_shared_not_reloaded():
    assert load_pair("effnet-lite")[0] is load_pair("effnet-lite")[0]


def test_unknown_pair_is_a_clear_error():
    with pytest.raises(ValueError, match="choose one of"):
        load_pair("vgg")


def test_resnet_pair_without_weights_says_where_to_put_them(monkeypatch, tmp_path):
    """No internet here: torchvision's download fails and the error names the cache file."""
    import torch.hub
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    from anomaly import backbones
    backbones._load.cache_clear()
    try:
        extractor = backbones.load_extractor("resnet18")
    except WeightsUnavailableError as err:
        assert "resnet18" in str(err) and str(tmp_path) in str(err)
    else:  # a machine with internet downloaded real weights: they must classify like ImageNet
        assert extractor.channels == [64, 128, 256]
    finally:
        backbones._load.cache_clear()
    assert "resnet34-resnet50" in BACKBONE_PAIRS


def test_openvino_float32_gives_the_same_features_and_maps_as_torch_on_real_photos(data_dir, monkeypatch):
    """In float32 OpenVINO is PyTorch's twin. Tolerances: features within 1e-4 of their largest
    magnitude; anomaly maps within 1e-4 of the threshold; image scores within 0.01 %."""
    from anomaly import DetectorConfig, PFMDetector
    from anomaly.detector import to_tensor
    from anomaly.image_io import load_image
    from conftest import category_files
    monkeypatch.setenv("ANOMALY_PRECISION", "f32")
    paths = category_files(data_dir, "screw", "test/thread_side", 2) + category_files(data_dir, "bottle", "test/good", 2)
    fast, reference = load_pair("effnet-lite", "openvino"), load_pair("effnet-lite", "torch")
    assert fast.source.runtime == "openvino" and reference.source.runtime == "torch"
    for size in (256, 192):            # one compiled graph per input size
        x, _ = to_tensor([load_image(p) for p in paths], size)
        for a, b in zip(fast.features(x), reference.features(x)):
            for level_a, level_b in zip(a, b):
                assert level_a.shape == level_b.shape
                torch.testing.assert_close(level_a, level_b, rtol=0, atol=1e-4 * float(level_b.abs().max()))
    config = DetectorConfig(steps=20, views=8)
    eager = PFMDetector(config, runtime="torch")
    eager.fit(category_files(data_dir, "bottle", "train/good", 2))
    compiled = PFMDetector(config, runtime="openvino")
    compiled.load_tensors(eager.tensors())
    maps_a, scores_a = compiled.anomaly_maps(paths)
    maps_b, scores_b = eager.anomaly_maps(paths)
    assert compiled.runtime == "openvino" and eager.runtime == "torch"
    assert np.abs(maps_a - maps_b).max() < 1e-4 * eager.threshold
    np.testing.assert_allclose(scores_a, scores_b, rtol=1e-4)


def test_runtime_is_chosen_by_environment(monkeypatch):
    from anomaly.runtime import default_runtime
    monkeypatch.setenv("ANOMALY_RUNTIME", "torch")
    assert default_runtime() == "torch"
    monkeypatch.setenv("ANOMALY_RUNTIME", "tensorrt")
    with pytest.raises(ValueError, match="choose one of"):
        default_runtime()
    monkeypatch.delenv("ANOMALY_RUNTIME")
    assert default_runtime() == "openvino"               # installed by requirements.txt


def test_a_failed_export_falls_back_to_pytorch_for_that_size(monkeypatch):
    """OpenVINO is an accelerator, never a requirement: if exporting fails for a size, that size
    gives PyTorch's features (``runtime`` then says "torch"); other sizes still export."""
    from anomaly import backbones, runtime
    real, exported = runtime.compile_module, []

    def broken_at_64(module, inputs, dynamic, precision, threads=None):
        if inputs[0].shape[2] == 64:
            raise RuntimeError("exporter broke")
        exported.append(inputs[0].shape[2])
        return real(module, inputs, dynamic, precision, threads)
    monkeypatch.setattr(runtime, "compile_module", broken_at_64)
    monkeypatch.setenv("ANOMALY_PRECISION", "f32")
    torch_extractor = backbones.load_extractor("efficientnet_lite0", "torch")
    extractor = backbones.FeatureExtractor("lite0", torch_extractor.body, torch_extractor.channels,
                                           torch_extractor.strides, backbones.EFFNET_LITE_NORM, "openvino")
    assert extractor.runtime == "openvino"
    for size in (64, 64, 96):
        x = torch.rand(2, 3, size, size)
        for a, b in zip(extractor.unnormalised(x), torch_extractor.unnormalised(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * float(b.abs().max()))
    assert exported == [96] and extractor.runtime == "torch"


def test_each_size_is_compiled_once_and_kept(monkeypatch):
    """Batches of any length at one size compile each network once; a new size
    or precision compiles again; the least recently used of more than ``max_shapes`` (8) is dropped."""
    from anomaly import backbones, runtime
    compiled = []
    real = runtime.compile_module

    def counting(module, inputs, dynamic, precision, threads=None):
        compiled.append(inputs[0].shape[2])
        return real(module, inputs, dynamic, precision, threads)
    monkeypatch.setattr(runtime, "compile_module", counting)
    body = backbones.load_extractor("efficientnet_lite0", "torch")
    extractor = backbones.FeatureExtractor("lite0", body.body, body.channels, body.strides,
                                           backbones.EFFNET_LITE_NORM, "openvino")
    for batch in (1, 3, 2):
        extractor.unnormalised(torch.rand(batch, 3, 64, 64))
    assert compiled == [64]
    sizes = [80, 96, 112, 128, 144, 160, 176, 192]          # the ninth size drops 64
    for size in sizes + [80, 64]:
        extractor.unnormalised(torch.rand(1, 3, size, size))
    assert compiled == [64, *sizes, 64]
    monkeypatch.setenv("ANOMALY_PRECISION", "f32")
    extractor.unnormalised(torch.rand(1, 3, 64, 64))
    assert compiled == [64, *sizes, 64] + ([64] if runtime.native_bf16() else [])
    assert extractor.runtime == "openvino"
    assert [f.shape[0] for f in extractor.unnormalised(torch.rand(0, 3, 64, 64))] == [0, 0, 0]


def test_the_two_networks_run_side_by_side_on_half_the_threads_each(data_dir, monkeypatch):
    """On OpenVINO with 2 threads, each network runs on 1 of them, unpinned, beside the other
    (robust to a busy vCPU), starting no Python thread, and gives the features it gives on both
    threads; on 1 thread they run one after the other."""
    from anomaly import runtime
    from anomaly.detector import to_tensor
    from anomaly.image_io import load_image
    from conftest import category_files
    real, lanes = runtime.compile_module, []

    def recording(module, inputs, dynamic, precision, threads=None):
        compiled = real(module, inputs, dynamic, precision, threads)
        lanes.append((threads, compiled.get_property("ENABLE_CPU_PINNING")))
        return compiled
    monkeypatch.setattr(runtime, "compile_module", recording)
    pair = load_pair("effnet-lite", "openvino")
    x, _ = to_tensor([load_image(p) for p in category_files(data_dir, "bottle", "test/good", 3)], 176)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        python_threads = set(threading.enumerate())
        side_by_side = pair.features(x)
        assert lanes == [(1, False), (1, False)]
        # the source runs on OpenVINO's own thread: a Python thread of ours that ran torch
        # work would keep an OpenMP pool, and libgomp would stop spinning for the process
        assert set(threading.enumerate()) == python_threads
        one_after_the_other = pair.source.unnormalised(x), pair.target.unnormalised(x)
        assert lanes[2:] == [(2, True), (2, True)]
        for a, b in zip(side_by_side, one_after_the_other):
            for level_a, level_b in zip(a, b):
                torch.testing.assert_close(level_a, level_b, rtol=0, atol=1e-5 * float(level_b.abs().max()))
        torch.set_num_threads(1)                     # one after the other, on the lanes' graphs
        for a, b in zip(pair.features(x), side_by_side):
            for level_a, level_b in zip(a, b):
                torch.testing.assert_close(level_a, level_b, rtol=0, atol=0)
        assert len(lanes) == 4
    finally:
        torch.set_num_threads(before)


def test_a_pair_whose_source_fails_to_export_gives_pytorchs_features_and_stays_usable(monkeypatch):
    """Side by side, a network that OpenVINO cannot build runs in PyTorch, and neither graph is
    left held by the failed or the finished run (a second call answers, the same)."""
    from anomaly import backbones, runtime
    real = runtime.compile_module

    def source_broken(module, inputs, dynamic, precision, threads=None):
        if module is pair.source.normalised:
            raise RuntimeError("exporter broke")
        return real(module, inputs, dynamic, precision, threads)
    monkeypatch.setattr(runtime, "compile_module", source_broken)
    monkeypatch.setenv("ANOMALY_PRECISION", "f32")
    reference = [backbones.load_extractor(n, "torch") for n in ("efficientnet_lite0", "efficientnet_lite1")]
    pair = backbones.BackbonePair(*(backbones.FeatureExtractor(e.name, e.body, e.channels, e.strides,
                                                               backbones.EFFNET_LITE_NORM, "openvino")
                                    for e in reference))
    x = torch.rand(2, 3, 80, 80)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for _ in range(2):
            source, target = pair.features(x)
            for features, extractor in zip((source, target), reference):
                for a, b in zip(features, extractor.unnormalised(x)):
                    torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * float(b.abs().max()))
    finally:
        torch.set_num_threads(before)
    assert pair.source.runtime == "torch" and pair.target.runtime == "openvino"
