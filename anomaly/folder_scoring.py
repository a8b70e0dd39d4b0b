"""Scoring many image files into one results table, the part both engines of ``predict`` share.

``python -m anomaly predict MODEL INPUT [INPUT ...] --table results.parquet`` scores in this
process (engine ``local``) or in Ray actors (``--engine ray``, :mod:`anomaly.ray_scoring`).
Either way every image goes through :meth:`ImageScorer.score`, so both engines write the same
rows (``COLUMNS``), and :class:`TableWriter` streams them to one Parquet or CSV file: memory
does not grow with the number of images. Nothing here imports ray; pyarrow is imported only
when a Parquet table is written.
"""
from __future__ import annotations

import csv
import glob
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from .calibration import verdict as verdict_of
from .datasets import IMAGE_EXTENSIONS, list_images
from .detector import PFMDetector
from .image_io import load_image
from .postprocess import normalize

COLUMNS = ("path", "score", "norm_score", "verdict", "threshold", "defect_threshold", "error")
TABLE_SUFFIXES = (".parquet", ".csv")
GLOB_CHARACTERS = frozenset("*?[")


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders -> their images (sorted), glob patterns -> the images they match
    (sorted; ``**`` matches any depth, e.g. ``'line/**/*.png'``).

    Raises ValueError for a path that does not exist and a folder or pattern without images.
    """
    images = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = list_images(path)
            if not found:
                raise ValueError(f"{path}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            images.extend(found)
        elif path.is_file():
            images.append(path)
        elif GLOB_CHARACTERS & set(str(item)):
            found = sorted(Path(p) for p in glob.glob(str(item), recursive=True)
                           if os.path.isfile(p) and Path(p).suffix.lower() in IMAGE_EXTENSIONS
                           and not Path(p).name.startswith("."))
            if not found:
                raise ValueError(f"{item}: pattern matches no images "
                                 f"({', '.join(IMAGE_EXTENSIONS)})")
            images.extend(found)
        else:
            raise ValueError(f"{path}: no such file or folder")
    return images


def overlay_paths(images: Sequence[Path], folder: Path) -> list[Path]:
    """``folder/<stem>_overlay.png`` per image; ``_2``, ``_3``, ... where an earlier image had
    the same stem, so that no overlay overwrites another."""
    used, paths = set(), []
    for image in images:
        stem = f"{image.stem}_overlay"
        name, n = f"{stem}.png", 1
        while name in used:
            n += 1
            name = f"{stem}_{n}.png"
        used.add(name)
        paths.append(folder / name)
    return paths


class ImageScorer:
    """A saved detector with its two thresholds: one image file -> one table row.

    The thresholds (raw score units) are the detector's calibrated ones; ``false_alarm_budget``
    re-thresholds the detector for that budget instead, and ``threshold`` sets the OK boundary
    (the DEFECT boundary then follows it: ``PFMDetector.defect_threshold_for``); not both.
    ``norm_score`` maps the threshold to 0.5 over the same colour range as the overlays.
    Relative image and overlay paths are taken relative to ``cwd`` (default: this process's
    working folder; a Ray actor is given the driver's).
    """

    def __init__(self, model: str | Path, threshold: float | None = None, alpha: float = 0.5,
                 cwd: str | Path | None = None, false_alarm_budget: float | None = None):
        from . import viz                   # matplotlib: imported only when it is needed

        if threshold is not None and false_alarm_budget is not None:
            raise ValueError("give a threshold or a false-alarm budget, not both")
        if threshold is not None and not math.isfinite(threshold):
            raise ValueError(f"threshold {threshold}; must be a finite number")
        self.detector = PFMDetector.load(model)
        if false_alarm_budget is not None:
            self.detector.set_false_alarm_budget(false_alarm_budget)
        if threshold is None:
            self.threshold, self.defect_threshold = self.detector.threshold, self.detector.defect_threshold
        else:
            self.threshold = float(threshold)
            self.defect_threshold = float(self.detector.defect_threshold_for(self.threshold))
        self.lo, self.hi = viz.colour_range(self.threshold, *self.detector.score_range)
        self.alpha = alpha
        self.cwd = Path(cwd) if cwd is not None else Path.cwd()

    def score(self, path: str | Path, overlay: str | Path | None = None) -> dict:
        """Row for the image at ``path`` (``COLUMNS``); an image that cannot be read gives a row
        with its ``error`` message and no score. With ``overlay``, also writes the heatmap
        overlay PNG there."""
        from . import viz

        thresholds = {"threshold": self.threshold, "defect_threshold": self.defect_threshold}
        try:
            image = load_image(self.cwd / path, name=str(path))
        except (ValueError, OSError) as err:
            return {"path": str(path), "score": None, "norm_score": None, "verdict": None,
                    **thresholds, "error": str(err)}
        pred = self.detector.predict(image)
        score = float(pred.pred_score)
        verdict = verdict_of(score, self.threshold, self.defect_threshold)
        if overlay is not None:
            viz.heatmap_overlay(image, pred.anomaly_map, self.threshold, self.lo, self.hi, self.alpha,
                                outline_colour=viz.OUTLINE_RGB[verdict]).save(self.cwd / overlay)
        return {"path": str(path), "score": score,
                "norm_score": float(normalize(score, self.threshold, self.lo, self.hi)),
                "verdict": verdict, **thresholds, "error": None}


def score_local(scorer: ImageScorer, images: Sequence[Path],
                overlays: Sequence[Path] | None = None) -> Iterator[dict]:
    """Rows of ``images`` in order, scored one by one in this process."""
    for i, path in enumerate(images):
        yield scorer.score(path, overlays[i] if overlays else None)


def arrow_schema():
    """The table's Arrow schema: ``COLUMNS`` with their types, every column but path nullable;
    ``verdict`` is OK, REVIEW or DEFECT."""
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("score", pa.float64()),
                      ("norm_score", pa.float64()), ("verdict", pa.string()),
                      ("threshold", pa.float64()), ("defect_threshold", pa.float64()),
                      ("error", pa.string())])


def check_table_path(path: Path) -> None:
    """ValueError unless ``path`` ends in .parquet or .csv (and pyarrow is there for Parquet)."""
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise ValueError(f"{path}: the table must end in {' or '.join(TABLE_SUFFIXES)}")
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError as err:
            raise ValueError(f"{path}: writing Parquet needs pyarrow "
                             "(pip install -r requirements-ray.txt)") from err


class TableWriter:
    """Rows (dicts with ``COLUMNS``) -> one Parquet or CSV file, by the path's suffix, written
    as they come in chunks of ``chunk`` rows (one Parquet row group each). A context manager;
    the file is complete once it is closed."""

    def __init__(self, path: str | Path, chunk: int = 256):
        self.path = Path(path)
        check_table_path(self.path)
        self.chunk = chunk
        self._rows: list[dict] = []
        if self.path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            self._file = None
            self._writer = pq.ParquetWriter(self.path, arrow_schema())
        else:
            self._file = self.path.open("w", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS)
            self._writer.writeheader()

    def write(self, row: dict) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.chunk:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        if self._file is None:
            import pyarrow as pa

            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=arrow_schema()))
        else:
            self._writer.writerows(self._rows)
        self._rows = []

    def close(self) -> None:
        self._flush()
        if self._file is None:
            self._writer.close()
        else:
            self._file.close()

    def __enter__(self) -> "TableWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
