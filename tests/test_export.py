"""The detector exported to one ONNX file (anomaly.export) and run without PyTorch (anomaly.edge):
the same maps, scores and verdicts as the detector on real photos, in OpenVINO and ONNX Runtime.

The reference is ``PFMDetector(config, runtime="torch").predict(..., resolution="model")``
(PyTorch eager, float32); the exported graph runs in float32 in both runtimes. Tolerance: each
map within ``MAP_TOLERANCE`` x the reference map's maximum of it, pixel by pixel, and each score
within ``MAP_TOLERANCE`` relative; measured on bottle (stretch) and magnetic_tile (pad) test
photos at 320 px: maps within 5e-6 of their peak, scores within 7e-7, in both runtimes (1.3e-5
of the peak at 128 px).
"""
import dataclasses
import io
import json
import os
import subprocess
import sys
import tomllib
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import onnx
import pytest

from anomaly import DetectorConfig, PFMDetector, cli
from anomaly.detector import to_tensor
from anomaly.edge import RUNTIMES, EdgeDetector
from anomaly.export import METADATA_KEYS, export_onnx
from anomaly.image_io import load_image
from conftest import REPO, category_files

pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.slow
SMALL = dict(steps=60, views=16)
MAP_TOLERANCE = 1e-4


def _reference(detector: PFMDetector) -> PFMDetector:
    """The same fitted detector computing in PyTorch eager, float32."""
    twin = PFMDetector(detector.config, runtime="torch")
    twin.load_tensors(detector.tensors())
    return twin


@pytest.fixture(scope="module")
def exported(data_dir, tmp_path_factory):
    """(fitted detector, its float32 PyTorch twin, exported .onnx path) on 4 bottle photos."""
    det = PFMDetector(DetectorConfig(**SMALL))
    det.fit(category_files(data_dir, "bottle", "train/good", 4))
    path = export_onnx(det, tmp_path_factory.mktemp("export") / "bottle.onnx")
    return det, _reference(det), path


@pytest.fixture(scope="module")
def test_images(data_dir):
    """Good and defective bottles, and a tile (not square, grey JPEG) that is far from normal."""
    return [*category_files(data_dir, "bottle", "test/good", 3),
            *category_files(data_dir, "bottle", "test/broken_large", 2),
            *category_files(data_dir, "bottle", "test/contamination", 2),
            *category_files(data_dir, "magnetic_tile", "test/good", 1)]


def _verdict(score: float, review: float, defect: float) -> str:
    return "DEFECT" if score > defect else "REVIEW" if score > review else "OK"


def _assert_same(edge: EdgeDetector, reference: PFMDetector, images) -> list[str]:
    """Every image's map, score, 0-1 score and verdict as the reference's -> the verdicts."""
    review = reference.threshold
    defect = getattr(reference, "defect_threshold", review)
    verdicts = []
    for path in images:
        want = reference.predict(path, resolution="model")
        got = edge.predict(path)
        assert got.anomaly_map.shape == want.anomaly_map.shape and got.anomaly_map.dtype == np.float32
        peak = float(want.anomaly_map.max())
        np.testing.assert_allclose(got.anomaly_map, want.anomaly_map, rtol=0, atol=MAP_TOLERANCE * peak,
                                   err_msg=f"{path.name} ({edge.runtime})")
        assert got.score == pytest.approx(want.pred_score, rel=MAP_TOLERANCE), path.name
        assert got.norm_score == pytest.approx(want.norm_score, abs=MAP_TOLERANCE), path.name
        assert got.verdict == want.verdict == _verdict(want.pred_score, review, defect), path.name
        verdicts.append(got.verdict)
    return verdicts


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_exported_file_gives_the_detectors_maps_scores_and_verdicts(exported, test_images, runtime):
    _, reference, path = exported
    verdicts = _assert_same(EdgeDetector(path, runtime), reference, test_images)
    assert "OK" in verdicts and "DEFECT" in verdicts          # both sides of the threshold seen


def test_the_runner_resizes_exactly_as_the_detector(exported, test_images):
    det, _, path = exported
    edge = EdgeDetector(path, "onnxruntime")
    for image in test_images[:1] + test_images[-1:]:
        pixels, content = edge.prepare(image)
        x, want = to_tensor([load_image(image)], det.config.image_size, det.config.resize)
        assert content == want[0]
        np.testing.assert_array_equal(pixels[0].astype(np.float32) / np.float32(255.0),
                                      x[0].numpy().transpose(1, 2, 0))


def test_metadata_says_how_to_use_the_file(exported):
    det, _, path = exported
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert set(METADATA_KEYS) <= set(meta)
    S = det.config.image_size
    assert (meta["image_size"], meta["resize"]) == (str(S), "stretch")
    assert float(meta["threshold_review"]) == det.threshold
    assert float(meta["threshold_defect"]) == getattr(det, "defect_threshold", det.threshold)
    assert (float(meta["score_lo"]), float(meta["score_hi"])) == det.score_range
    assert json.loads(meta["config"]) == dataclasses.asdict(det.config)
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert meta["project_version"] == version
    assert "threshold_defect" in meta["verdict_rule"] and "REVIEW" in meta["verdict_rule"]
    # one self-contained file: float32 weights, the graph's inputs and outputs as documented
    assert {t.data_type for t in model.graph.initializer} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    shape = lambda v: [d.dim_value for d in v.type.tensor_type.shape.dim]       # noqa: E731
    (image,) = model.graph.input
    assert (image.name, image.type.tensor_type.elem_type, shape(image)) == ("image", onnx.TensorProto.UINT8,
                                                                            [1, S, S, 3])
    assert [(o.name, shape(o)) for o in model.graph.output] == [("anomaly_map", [1, S, S]), ("score", [1])]
    edge = EdgeDetector(path, "openvino")                   # OpenVINO reads the same metadata
    assert (edge.image_size, edge.resize, edge.threshold_review) == (S, "stretch", det.threshold)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_wrong_input_gets_a_clear_error_not_a_score(exported, runtime, tmp_path):
    _, _, path = exported
    edge = EdgeDetector(path, runtime)
    S = edge.image_size
    pixels, _ = edge.prepare(np.full((50, 70, 3), 128, np.uint8))
    wrong = [(pixels.astype(np.float32) / 255, "dtype float32"),
             (pixels.astype(np.float32), "dtype float32"),
             (pixels[0], "add the batch axis"),
             (pixels[:, : S - 16, : S - 16], f"resize to {S} x {S}"),
             (pixels.transpose(0, 3, 1, 2), "got (1, 3,"),
             (pixels.tolist(), "numpy array")]
    for bad, message in wrong:
        with pytest.raises(ValueError, match="pixels must") as err:
            edge.run(bad)
        assert message in str(err.value)
    other = onnx.helper.make_model(onnx.helper.make_graph(                 # an ONNX file, not ours
        [onnx.helper.make_node("Relu", ["image"], ["score"])], "relu",
        [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("score", onnx.TensorProto.FLOAT, [1])]),
        opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.save(other, str(tmp_path / "other.onnx"))
    with pytest.raises(ValueError, match="not a detector exported"):
        EdgeDetector(tmp_path / "other.onnx", runtime)
    with pytest.raises(ValueError, match="no such file"):
        EdgeDetector(tmp_path / "missing.onnx", runtime)


def test_runner_needs_no_torch(exported, test_images):
    """``anomaly.edge`` imported and run in a fresh process: torch (and scipy) never load, and the
    command line prints the scores the runner computes here."""
    _, _, path = exported
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = ("import json, sys\nimport anomaly.edge as edge\n"
              "loaded = sorted(m for m in ('torch', 'scipy', 'anomaly.detector') if m in sys.modules)\n"
              "r = edge.EdgeDetector(sys.argv[1]).predict(sys.argv[2])\n"
              "after = sorted(m for m in ('torch', 'scipy') if m in sys.modules)\n"
              "print(json.dumps([loaded, after, r.score, r.verdict]))\n")
    run = subprocess.run([sys.executable, "-c", script, str(path), str(test_images[0])], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    loaded, after, score, verdict = json.loads(run.stdout)
    assert loaded == [] and after == []
    here = EdgeDetector(path).predict(test_images[0])
    assert (score, verdict) == pytest.approx((here.score, here.verdict))

    images = [test_images[0], test_images[4]]
    cmd = subprocess.run([sys.executable, "-m", "anomaly.edge", str(path), *map(str, images),
                          "--runtime", "onnxruntime"], env=env, capture_output=True, text=True, timeout=300)
    assert cmd.returncode == 0, cmd.stderr
    lines = [line.split("\t") for line in cmd.stdout.strip().splitlines()]
    assert [line[0] for line in lines] == [p.name for p in images]
    assert [line[3] for line in lines] == [EdgeDetector(path, "onnxruntime").predict(p).verdict for p in images]


def test_cli_export_writes_a_runnable_file(exported, test_images, tmp_path):
    det, reference, _ = exported
    model = det.save(tmp_path / "part.safetensors")
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(["export", str(model), "-o", str(tmp_path / "part.onnx")])
    assert code == 0, err.getvalue()
    assert out.getvalue().startswith(f"exported {tmp_path / 'part.onnx'} (") and "MB)" in out.getvalue()
    edge = EdgeDetector(tmp_path / "part.onnx", "onnxruntime")
    assert edge.predict(test_images[3]).score == pytest.approx(reference.predict(test_images[3]).pred_score,
                                                               rel=MAP_TOLERANCE)
    (tmp_path / "junk.safetensors").write_text("not a detector")
    for argv, message in [(["export", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "m.onnx")],
                           "no such file"),
                          (["export", str(tmp_path / "junk.safetensors"), "-o", str(tmp_path / "m.onnx")],
                           "not a detector file"),
                          (["export", str(model), "-o", str(tmp_path / "no" / "m.onnx")], "does not exist")]:
        err = io.StringIO()
        with redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2 and message in err.getvalue(), err.getvalue()


def test_an_unfitted_detector_is_not_exported(tmp_path):
    with pytest.raises(RuntimeError, match="not fitted"):
        export_onnx(PFMDetector(DetectorConfig(**SMALL)), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_pad_mode_is_exported_with_the_content_size(data_dir, tmp_path):
    """resize="pad": the runner mirror-pads as the detector does, the graph crops the map to the
    content and stretches it back; the same maps on tiles of several aspect ratios."""
    det = PFMDetector(DetectorConfig(**SMALL, image_size=160, resize="pad"))
    det.fit(category_files(data_dir, "magnetic_tile", "train/good", 3))
    path = export_onnx(det, tmp_path / "tile.onnx")
    inputs = [i.name for i in onnx.load(str(path)).graph.input]
    assert inputs == ["image", "content"]
    images = [*category_files(data_dir, "magnetic_tile", "test/good", 2),
              *category_files(data_dir, "magnetic_tile", "test/crack", 2),
              *category_files(data_dir, "bottle", "test/good", 1)]                 # square
    reference = _reference(det)
    for runtime in RUNTIMES:
        edge = EdgeDetector(path, runtime)
        contents = {edge.prepare(p)[1] for p in images}
        assert len(contents) >= 3 and (160, 160) in contents
        _assert_same(edge, reference, images)
        pixels, _ = edge.prepare(images[0])
        with pytest.raises(ValueError, match="pass the content"):
            edge.run(pixels)
        with pytest.raises(ValueError, match="content must be"):
            edge.run(pixels, (0, 160))
