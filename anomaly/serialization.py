"""Saving a fitted detector as one safetensors file, and loading it back without running code.

The file holds the mapping nets' tensors, the memory bank, the maps' scales, the calibration
scores and the threshold; its
metadata holds the format name and version and the config as JSON. Nothing is unpickled:
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

FORMAT = "pfm-anomaly-detector"
FORMAT_VERSION = "2"
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
    try:
        config = _config_from_json(cls.config_class(), metadata["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path.name}: invalid detector config ({err})") from err
    detector = cls(config)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path.name}: corrupt detector file ({err})") from err
    expected = detector.tensors()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path.name}: tensors do not match the config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, value in expected.items():
        shape = tuple(tensors[key].shape)
        if key == "calibration_scores":
            if len(shape) != 1 or not 1 <= shape[0] <= 10_000:
                raise ValueError(f"{path.name}: calibration_scores must be a 1-D tensor of 1..10000 values")
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
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path.name}: detector format version {metadata.get('format_version')!r}, "
                         f"this version reads {FORMAT_VERSION!r}")
    if not isinstance(metadata.get("config"), str):
        raise ValueError(f"{path.name}: detector file has no config")
    return metadata


def _config_from_json(default, text: str):
    """Rebuild a config dataclass from JSON, accepting only its own fields with their types."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"detector config is not valid JSON ({err})") from err
    if not isinstance(values, dict):
        raise ValueError("detector config must be a JSON object")
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
