"""Few-shot visual anomaly detection with pre-trained feature mapping (PFM, Wan et al. 2022).

No UI code here: the package works from a REPL, a script or the CLI (``python -m anomaly``).
The names below load on first use, so that importing a torch-free part of the package (its
``settings``, ``image_io`` or ``examples``) does not import torch.
"""
import importlib

_EXPORTS = {"BACKBONE_PAIRS": "settings", "DetectorConfig": "detector", "FitReport": "detector",
            "PFMDetector": "detector", "Prediction": "detector", "WeightsUnavailableError": "backbones",
            "load_image": "image_io"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'anomaly' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
