"""Few-shot visual anomaly detection with pre-trained feature mapping (PFM, Wan et al. 2022).

No UI code here: the package works from a REPL, a script or the CLI (``python -m anomaly``).
"""
from .backbones import BACKBONE_PAIRS, WeightsUnavailableError
from .detector import DetectorConfig, FitReport, PFMDetector, Prediction
from .image_io import load_image

__all__ = ["BACKBONE_PAIRS", "DetectorConfig", "FitReport", "PFMDetector", "Prediction",
           "WeightsUnavailableError", "load_image"]
