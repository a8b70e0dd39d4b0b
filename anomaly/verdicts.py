"""The one verdict rule, OK / REVIEW / DEFECT, with no dependencies: the detector, the app, the
tables and the exported model's runner (``anomaly.edge``, which must not import torch or scipy)
all decide with it."""

VERDICTS = ("OK", "REVIEW", "DEFECT")


def verdict(score: float, threshold: float, defect_threshold: float) -> str:
    """OK up to ``threshold``, DEFECT above ``defect_threshold`` (>= threshold), REVIEW between."""
    if score > defect_threshold:
        return "DEFECT"
    return "REVIEW" if score > threshold else "OK"
