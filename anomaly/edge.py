"""Run an exported detector (``python -m anomaly export``) on the line, without PyTorch.

Needs numpy, Pillow and one of OpenVINO or ONNX Runtime (``pip install openvino pillow numpy``);
importing this module imports neither torch nor scipy, nor the rest of this package but its
``image_io``.

    from anomaly.edge import EdgeDetector
    detector = EdgeDetector("part.onnx")             # OpenVINO if installed, else ONNX Runtime
    result = detector.predict("photo.png")           # path, bytes, PIL image or array
    print(result.score, result.norm_score, result.verdict)   # raw, 0-1, OK / REVIEW / DEFECT
    result.anomaly_map                               # (S, S) float32 over the image's content

    python -m anomaly.edge part.onnx photo1.png photo2.png [--runtime onnxruntime]

Images are resized with Pillow exactly as the detector does (``anomaly.image_io``), so the
exported graph gets the pixels the detector would; the scores are the detector's to float32
rounding (see tests/test_export.py for the tolerance).
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .image_io import ImageLike, load_image, square_pixels
from .postprocess import normalize
from .verdicts import verdict

FORMAT = "pfm-anomaly-onnx"            # anomaly.export.FORMAT (not imported: that needs torch)
FORMAT_VERSION = "1"
RUNTIMES = ("openvino", "onnxruntime")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class EdgeResult:
    """One scored image: raw ``score``, ``norm_score`` in [0, 1], ``verdict`` OK / REVIEW /
    DEFECT, ``anomaly_map`` (S, S) float32 (over the image's content in "pad" mode)."""

    score: float
    norm_score: float
    verdict: str
    anomaly_map: np.ndarray


def default_runtime() -> str:
    """OpenVINO where it is installed, else ONNX Runtime; ImportError if neither is."""
    for name, module in (("openvino", "openvino"), ("onnxruntime", "onnxruntime")):
        try:
            __import__(module)
            return name
        except ImportError:
            continue
    raise ImportError("neither OpenVINO nor ONNX Runtime is installed: pip install openvino (or onnxruntime)")


class EdgeDetector:
    """An exported detector file, compiled for the CPU in float32 by ``runtime``
    ("openvino" or "onnxruntime", default ``default_runtime()``) on ``threads`` threads
    (default: the runtime's own choice). ValueError for a file that is not one."""

    def __init__(self, path: str | Path, runtime: str | None = None, threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"{self.path}: no such file")
        self.runtime = runtime or default_runtime()
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime {self.runtime!r} unknown; choose one of {RUNTIMES}")
        self._lock = threading.Lock()
        if self.runtime == "openvino":
            self.metadata = self._open_openvino(threads)
        else:
            self.metadata = self._open_onnxruntime(threads)
        meta = self.metadata
        if meta.get("format") != FORMAT:
            raise ValueError(f"{self.path.name}: not a detector exported by 'python -m anomaly export'")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{self.path.name}: export format version {meta.get('format_version')!r}, "
                             f"this runner reads {FORMAT_VERSION!r}")
        try:
            self.image_size = int(meta["image_size"])
            self.resize = meta["resize"]
            self.threshold_review = float(meta["threshold_review"])
            self.threshold_defect = float(meta["threshold_defect"])
            self.norm_threshold = float(meta["norm_threshold"])
            self.score_range = (float(meta["score_lo"]), float(meta["score_hi"]))
            self.config = json.loads(meta["config"])
        except (KeyError, ValueError) as err:
            raise ValueError(f"{self.path.name}: incomplete metadata ({err!r})") from err
        if self.resize not in ("stretch", "pad"):
            raise ValueError(f"{self.path.name}: resize mode {self.resize!r} unknown")

    def _open_openvino(self, threads: int | None) -> dict[str, str]:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(self.path))
        framework = model.get_rt_info()["framework"] if model.has_rt_info("framework") else {}
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self._request = core.compile_model(model, "CPU", config).create_infer_request()
        return {k: v.astype(str) for k, v in framework.items()}

    def _open_onnxruntime(self, threads: int | None) -> dict[str, str]:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        return dict(self._session.get_modelmeta().custom_metadata_map)

    # ------------------------------------------------------------------ pixels

    def prepare(self, image: ImageLike) -> tuple[np.ndarray, tuple[int, int]]:
        """Any image ``anomaly.image_io.load_image`` reads -> (pixels (1, S, S, 3) uint8, content
        (h, w)): resized as the detector resizes (``anomaly.detector.to_tensor``)."""
        pixels, content = square_pixels(load_image(image), self.image_size, self.resize)
        return np.ascontiguousarray(pixels[None]), content

    def check(self, pixels: np.ndarray, content: tuple[int, int] | None = None) -> None:
        """ValueError unless ``pixels`` is (1, S, S, 3) uint8 (and ``content`` 1..S each)."""
        S = self.image_size
        expected = (1, S, S, 3)
        if not isinstance(pixels, np.ndarray):
            raise ValueError(f"pixels must be a numpy array of shape {expected}, uint8; got {type(pixels).__name__}")
        if pixels.dtype != np.uint8:
            raise ValueError(f"pixels must be uint8 RGB values 0-255 of shape {expected}, got dtype {pixels.dtype} "
                             f"(do not scale to [0, 1]: the model does that; prepare() or predict() "
                             f"take care of it)")
        if pixels.shape != expected:
            hint = " (add the batch axis: pixels[None])" if pixels.shape == expected[1:] else \
                   f" (resize to {S} x {S} first: prepare() or predict() do it as the detector does)"
            raise ValueError(f"pixels must have shape {expected} (batch, height, width, RGB), "
                             f"got {pixels.shape}{hint}")
        if content is not None and not all(isinstance(n, (int, np.integer)) and 1 <= n <= S for n in content):
            raise ValueError(f"content must be (h, w), each an integer in [1, {S}], got {content!r}")

    def run(self, pixels: np.ndarray, content: tuple[int, int] | None = None) -> tuple[np.ndarray, float]:
        """pixels (1, S, S, 3) uint8, as ``prepare`` gives them (and its content (h, w), needed
        in "pad" mode) -> (anomaly map (S, S) float32, score). ValueError for any other input."""
        self.check(pixels, content)
        feeds = {"image": np.ascontiguousarray(pixels)}
        if self.resize == "pad":
            if content is None:
                raise ValueError("this detector pads images (resize 'pad'): pass the content (h, w) "
                                 "that prepare() returns")
            feeds["content"] = np.asarray(content, dtype=np.int64)
        if self.runtime == "openvino":
            with self._lock:                       # one infer request: one call at a time
                outputs = self._request.infer(feeds)
                amap, score = (np.array(outputs[self._request.model_outputs[i]]) for i in range(2))
        else:
            amap, score = self._session.run(["anomaly_map", "score"], feeds)
        return amap[0].astype(np.float32, copy=False), float(score[0])

    # ------------------------------------------------------------------ verdicts

    def verdict(self, score: float) -> str:
        """DEFECT above ``threshold_defect``, REVIEW above ``threshold_review``, else OK."""
        return verdict(score, self.threshold_review, self.threshold_defect)

    def norm_score(self, score: float) -> float:
        """Raw score -> [0, 1] by the file's rule (``anomaly.postprocess.normalize``)."""
        return float(normalize(float(score), self.norm_threshold, *self.score_range))

    def predict(self, image: ImageLike) -> EdgeResult:
        """One image (path, bytes, PIL image or array) -> its EdgeResult."""
        amap, score = self.run(*self.prepare(image))
        return EdgeResult(score, self.norm_score(score), self.verdict(score), amap)


def _images(args: Sequence[str]) -> list[Path]:
    """Files as given, folders as their image files (sorted)."""
    paths = []
    for arg in args:
        p = Path(arg)
        paths.extend(sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [p])
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m anomaly.edge MODEL.onnx IMAGE ...``: one line per image (name, score,
    0-1 score, verdict) -> exit code: 0, or 2 where the model or an image could not be read."""
    parser = argparse.ArgumentParser(prog="python -m anomaly.edge",
                                     description="Score images with an exported detector (no PyTorch).")
    parser.add_argument("model", help="an .onnx file written by 'python -m anomaly export'")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of them")
    parser.add_argument("--runtime", choices=RUNTIMES, help="default: OpenVINO if installed, else ONNX Runtime")
    parser.add_argument("--threads", type=int, help="CPU threads; default: the runtime's choice")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of columns")
    args = parser.parse_args(argv)
    try:
        detector = EdgeDetector(args.model, args.runtime, args.threads)
    except (ValueError, ImportError) as err:
        parser.exit(2, f"error: {err}\n")
    failed = 0
    for path in _images(args.images):
        try:
            result = detector.predict(path)
        except ValueError as err:
            failed += 1
            print(f"error: {err}", file=sys.stderr, flush=True)
            continue
        if args.json:
            print(json.dumps({"image": str(path), "score": result.score, "norm_score": result.norm_score,
                              "verdict": result.verdict}), flush=True)
        else:
            print(f"{path.name}\t{result.score:.4f}\t{result.norm_score:.3f}\t{result.verdict}", flush=True)
    return 2 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
