"""A fitted detector as one self-contained ONNX file for the line: ``export_onnx(detector, path)``.

The graph computes what ``PFMDetector.predict(image, resolution="model")`` computes, from the
pixels of an image already resized to the model's square size S:

    image    (1, S, S, 3) uint8 RGB          -> anomaly_map (1, S, S) float32
    content  (2,) int64 (h, w), "pad" only   -> score       (1,) float32, the map's maximum

Inside: uint8 -> [0, 1], both backbones behind their input normalisation, PFM's mapping nets,
the memory bank search, the maps' combination, smoothing and upsampling (the detector's own
``FittedHeads``, its fitted tensors as float32 constants). For ``resize="pad"`` the runner
mirror-pads the resized image as ``anomaly.detector.to_tensor`` does and passes the content's
size: the graph crops the map to it and stretches it back to S x S, as the detector does.

The file's ``metadata_props`` (strings) say how to use it: the thresholds and verdict rule,
the image size and resize mode, the 0-1 score's range and rule, the project version and the
detector's config as JSON (``METADATA_KEYS``). ``anomaly.edge`` runs it without PyTorch.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from .heads import BANK_CHUNKS, FittedHeads, ScoringHeads, mapping_parameters
from .runtime import _EXPORT_LOCK
from .scoring import SCORES
from .viz import colour_range

FORMAT = "pfm-anomaly-onnx"
FORMAT_VERSION = "1"
OPSET = 17
INPUTS = ("image", "content")           # content: "pad" mode only
OUTPUTS = ("anomaly_map", "score")
VERDICT_RULE = ("DEFECT if score > threshold_defect, else REVIEW if score > threshold_review, "
                "else OK (score: the raw score, the output 'score')")
NORM_RULE = ("norm_score = piecewise linear in score: score_lo -> 0, norm_threshold -> 0.5, "
             "score_hi -> 1, clipped to [0, 1] (anomaly.postprocess.normalize)")
RESIZE_RULE = {
    "stretch": "RGB image resized to (S, S) with Pillow's bilinear filter (Image.resize), no crop",
    "pad": ("RGB image resized with Pillow's bilinear filter so that its longer side is S "
            "(each side round(side * S / longer side), at least 1), placed at the top left and "
            "mirror-padded to (S, S) (numpy.pad mode 'symmetric'); input 'content' = (h, w) of "
            "the resized image"),
}
METADATA_KEYS = ("format", "format_version", "project_version", "image_size", "resize",
                 "resize_rule", "inputs", "outputs", "threshold_review", "threshold_defect",
                 "verdict_rule", "norm_threshold", "score_lo", "score_hi", "norm_rule",
                 "source_backbone", "target_backbone", "config")


class EdgeGraph(nn.Module):
    """forward(image (1, S, S, 3) uint8[, content (2,) int64 (h, w)]) ->
    (anomaly_map (1, S, S) float32, score (1,) float32) of one fitted detector.

    Holds the detector's shared backbone modules (not copied, not changed) and a ``FittedHeads``
    with its fitted tensors as constants."""

    def __init__(self, detector):
        super().__init__()
        cfg = detector.config
        self.size, self.pad = cfg.image_size, cfg.resize == "pad"
        self.source = detector.backbones.source.normalised
        self.target = detector.backbones.target.normalised
        bank = detector.bank if len(detector.bank) else torch.zeros(1, detector.embedding_channels)
        constants = mapping_parameters(detector.mappings) + [
            bank.detach().numpy().astype(np.float32), detector.scales.detach().numpy().astype(np.float32),
            np.array(SCORES[cfg.score], np.float32)]
        heads = ScoringHeads(detector.mappings, cfg.sigma, cfg.image_size,
                             bank_chunks=min(BANK_CHUNKS, len(bank)))
        self.heads = FittedHeads(heads, constants)

    def forward(self, image: torch.Tensor, content: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        x = image.permute(0, 3, 1, 2).to(torch.float32) / 255.0                   # (1, 3, S, S)
        features = [*self.source(x), *self.target(x)]
        _, _, amap = self.heads(*features)                                         # (1, S, S)
        if self.pad:
            rows = crop_stretch_matrix(content[0], self.size)                      # (S, S)
            cols = crop_stretch_matrix(content[1], self.size)
            amap = (rows @ amap[0] @ cols.T)[None]
        return amap, amap.flatten(1).amax(1)


def crop_stretch_matrix(n: torch.Tensor, size: int) -> torch.Tensor:
    """(size, size) matrix M such that M @ v stretches v[:n] to length ``size`` as
    F.interpolate's linear mode (align_corners=False) does; ``n`` a 0-d int64 tensor in
    [1, size]. Built from arithmetic on ``n``, so the graph's shapes stay fixed."""
    n = n.to(torch.float32)
    i = torch.arange(size, dtype=torch.float32)
    src = ((i + 0.5) * (n / size) - 0.5).clamp_min(0.0)                             # (size,)
    lower = src.floor()
    frac = src - lower
    upper = torch.minimum(lower + 1.0, n - 1.0)
    j = torch.arange(size, dtype=torch.float32)[None]                               # (1, size)
    return ((j == lower[:, None]).to(torch.float32) * (1.0 - frac)[:, None]
            + (j == upper[:, None]).to(torch.float32) * frac[:, None])


def project_version() -> str:
    """The version in the repository's pyproject.toml, else the installed distribution's."""
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        import tomllib

        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    except (ImportError, OSError, KeyError, ValueError):
        pass
    try:
        from importlib.metadata import version

        return version("anomaly-inspect")
    except Exception:  # noqa: BLE001 - not installed
        return "unknown"


def metadata(detector, thresholds: tuple[float, float] | None = None) -> dict[str, str]:
    """The ONNX file's metadata_props for a fitted detector, every value a string; ``thresholds``
    (OK / REVIEW, REVIEW / DEFECT) default to the detector's calibrated ones."""
    cfg = detector.config
    review, defect = (detector.threshold, detector.defect_threshold) if thresholds is None else thresholds
    review, defect = float(review), float(defect)
    if not 0 < review <= defect:
        raise ValueError(f"thresholds must satisfy 0 < threshold <= defect threshold, got {review}, {defect}")
    lo, hi = colour_range(review, *detector.score_range)
    inputs = {"image": ["uint8", [1, cfg.image_size, cfg.image_size, 3], "RGB"]}
    if cfg.resize == "pad":
        inputs["content"] = ["int64", [2], "(h, w) of the resized image before padding"]
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "project_version": project_version(),
        "image_size": str(cfg.image_size), "resize": cfg.resize, "resize_rule": RESIZE_RULE[cfg.resize],
        "inputs": json.dumps(inputs),
        "outputs": json.dumps({"anomaly_map": ["float32", [1, cfg.image_size, cfg.image_size]],
                               "score": ["float32", [1]]}),
        "threshold_review": repr(review), "threshold_defect": repr(defect), "verdict_rule": VERDICT_RULE,
        "norm_threshold": repr(review), "score_lo": repr(float(lo)), "score_hi": repr(float(hi)),
        "norm_rule": NORM_RULE,
        "source_backbone": detector.backbones.source.name, "target_backbone": detector.backbones.target.name,
        "config": json.dumps(dataclasses.asdict(cfg)),
    }


def export_onnx(detector, path: str | Path, thresholds: tuple[float, float] | None = None) -> Path:
    """Write a fitted ``PFMDetector`` to ``path`` as one ONNX file (opset 17, float32
    weights, metadata as in ``metadata``, with ``thresholds`` if given) -> the path.
    RuntimeError if it is not fitted."""
    detector._require_fitted()
    path = Path(path)
    S = detector.config.image_size
    graph = EdgeGraph(detector).eval()
    example = (torch.zeros(1, S, S, 3, dtype=torch.uint8),)
    names = list(INPUTS[:1])
    if graph.pad:
        example += (torch.tensor([S, S], dtype=torch.int64),)
        names.append(INPUTS[1])
    buffer = io.BytesIO()
    with _EXPORT_LOCK, torch.no_grad():
        torch.onnx.export(graph, example, buffer, input_names=names, output_names=list(OUTPUTS),
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    model = onnx.load_from_string(buffer.getvalue())
    for output, shape in zip(model.graph.output, ([1, S, S], [1])):     # the exporter leaves them open
        dims = output.type.tensor_type.shape.dim
        del dims[:]
        for n in shape:
            dims.add().dim_value = n
    model.producer_name, model.producer_version = "anomaly-inspect", project_version()
    model.doc_string = "PFM anomaly detector: image (1, S, S, 3) uint8 -> anomaly_map (1, S, S), score (1,)"
    onnx.helper.set_model_props(model, metadata(detector, thresholds))
    onnx.checker.check_model(model)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
