"""Saving a fitted detector as one safetensors file, and loading it back without running code.

The file holds the mapping nets' tensors, the memory bank, the maps' scales, the calibration
scores, the good-score model and both thresholds; its metadata holds the format name and
version and the config as JSON. Version 2 files (one threshold, no good-score model) still
load: their threshold stays the OK boundary and the model is rebuilt from their calibration
scores (``upgrade_v2``). Nothing is unpickled:
a file is checked (header size, format, config types, tensor names and shapes) before use.
"""
from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .calibration import GoodScoreModel

FORMAT = "pfm-anomaly-detector"
FORMAT_VERSION = "3"
READABLE_VERSIONS = ("2", "3")
V2_CONFIG_FIELDS = ("threshold_margin",)          # config fields that version 3 dropped
V2_REFERENCES = 3       # what a version 2 file's calibration rests on: its ceil(k / 3) held-out
                        # references are not recorded; 3 (k = 7..9) is the tool's usual case
MAX_HEADER_BYTES = 1_000_000


def save_detector(detector, path: str | Path) -> Path:
    """Write a fitted detector to ``path`` (one .safetensors file)."""
    detector._require_fitted()
    tensors = {k: v.detach().contiguous() for k, v in detector.tensors().items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(dataclasses.asdict(detector.config)),
        "source_backbone": detector.backbones.source.name,
        "target_backbone": detector.backbones.target.name,
    }
    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_detector(cls, path: str | Path):
    """Read a file written by ``save_detector``; ValueError if it is not one.

    The config is bounded (``DetectorConfig.RANGES``) before the detector is built, and every
    tensor's name, shape, dtype and values are checked before any is used.
    """
    path = Path(path)
    metadata = read_metadata(path)
    version = metadata["format_version"]
    try:
        config = _config_from_json(cls.config_class(), metadata["config"],
                                   V2_CONFIG_FIELDS if version == "2" else ())
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path.name}: invalid detector config ({err})") from err
    detector = cls(config)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path.name}: corrupt detector file ({err})") from err
    if version == "2" and "calibration_scores" in tensors:
        tensors = upgrade_v2(tensors, config)
    expected = detector.tensors()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path.name}: tensors do not match the config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, value in expected.items():
        shape = tuple(tensors[key].shape)
        if key in ("calibration_scores", "reference_scores"):
            if len(shape) != 1 or not (key == "reference_scores" or shape[0] >= 1) or shape[0] > 10_000:
                raise ValueError(f"{path.name}: {key} must be a 1-D tensor of at most 10000 values")
        elif key == "bank":
            if len(shape) != 2 or shape[1] != value.shape[1] or shape[0] > config.bank_size:
                raise ValueError(f"{path.name}: bank has shape {shape}, the config needs "
                                 f"(at most {config.bank_size}, {value.shape[1]})")
        elif shape != tuple(value.shape):
            raise ValueError(f"{path.name}: tensor {key} has shape {shape}, the config needs {tuple(value.shape)}")
        if tensors[key].dtype != value.dtype:
            raise ValueError(f"{path.name}: tensor {key} has dtype {tensors[key].dtype}, expected {value.dtype}")
        if tensors[key].is_floating_point() and not torch.isfinite(tensors[key]).all():
            raise ValueError(f"{path.name}: tensor {key} holds NaN or infinity")
    if not float(tensors["threshold"]) > 0 or not (tensors["scales"] > 0).all():
        raise ValueError(f"{path.name}: threshold and scales must be positive")
    if not float(tensors["defect_threshold"]) >= float(tensors["threshold"]):
        raise ValueError(f"{path.name}: the defect threshold is below the threshold")
    if not (tensors["calibration_scores"] > 0).all() or not (tensors["reference_scores"] > 0).all():
        raise ValueError(f"{path.name}: calibration scores must be positive")
    try:
        GoodScoreModel.from_array(tensors["good_score_model"].tolist())
    except ValueError as err:
        raise ValueError(f"{path.name}: {err}") from err
    detector.load_tensors(tensors)
    return detector


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata of a detector file, checked for format and version."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path.name}: not a detector file (too short)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or header_len > path.stat().st_size - 8:
            raise ValueError(f"{path.name}: not a detector file (header of {header_len} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path.name}: not a detector file (unreadable header)") from err
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(f"{path.name}: not a detector file saved by this tool")
    if metadata.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"{path.name}: detector format version {metadata.get('format_version')!r}, "
                         f"this version reads {' and '.join(READABLE_VERSIONS)}")
    if not isinstance(metadata.get("config"), str):
        raise ValueError(f"{path.name}: detector file has no config")
    return metadata


def upgrade_v2(tensors: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A version 2 file's tensors -> version 3's: its threshold stays the OK boundary, the
    good-score model is fitted to its calibration scores, the DEFECT boundary follows from both."""
    calibration = tensors["calibration_scores"]
    if not (calibration > 0).all() or not torch.isfinite(calibration).all():
        return tensors                     # left to the checks, which name the problem
    model = GoodScoreModel.fit(calibration.numpy(), [], V2_REFERENCES)
    threshold = float(tensors["threshold"])
    rate = model.false_alarm_rate(threshold) * config.defect_rate_ratio
    defect = max(threshold, model.threshold_for(rate)) if rate > 0 else threshold
    return {**tensors, "reference_scores": torch.empty(0), "defect_threshold": torch.tensor(defect),
            "good_score_model": torch.from_numpy(model.as_array())}


def _config_from_json(default, text: str, dropped: tuple[str, ...] = ()):
    """Rebuild a config dataclass from JSON, accepting only its own fields with their types
    (and ignoring the ``dropped`` fields of an older format)."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"detector config is not valid JSON ({err})") from err
    if not isinstance(values, dict):
        raise ValueError("detector config must be a JSON object")
    for name in dropped:
        values.pop(name, None)
    fields = {f.name: type(getattr(default, f.name)) for f in dataclasses.fields(default)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"detector config has unknown fields {unknown}")
    for name, value in values.items():
        kind = fields[name]
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok, values[name] = True, float(value)
        if not ok:
            raise ValueError(f"detector config field {name!r} must be {kind.__name__}, got {value!r}")
    return dataclasses.replace(default, **values)
