"""One visitor's inspection session: references, detector, results and marks, without any UI.

``app.py`` keeps one ``InspectionSession`` per browser tab (in a ``gr.State``) and every Gradio
handler is a thin call into a method here, so the whole workflow can be tested without a
browser:

    s = InspectionSession()
    s.set_references(["good1.png", "good2.png"])
    s.fit()
    s.inspect([("test.png", "test.png")])
    s.set_threshold(0.9); s.table()         # verdicts redrawn from the stored maps
    s.suggestions()                         # the results worth a label most
    s.live_frame(frame)                     # a camera frame answered: overlay, score, verdict
    s.capture()                             # ... and the last one added to the results

Images are shrunk to at most ``WORK_SIDE`` px on the longer side when they enter the session;
that copy is what is scored, shown and exported, which bounds the memory of a session
(``MAX_REFERENCES`` + ``MAX_RESULTS`` images). Anomaly maps are kept at the model's resolution
(S x S), so moving the threshold never recomputes them. Methods that can fail on user input
raise ``ValueError`` (or ``RuntimeError`` from the core) with a message meant for the user, and
leave the session as it was.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import zipfile
from collections import deque
from dataclasses import dataclass, field, fields
from functools import wraps
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .calibration import VERDICTS, verdict as verdict_of
from .detector import DetectorConfig, FitReport, PFMDetector
from .image_io import ImageLike, load_image
from .postprocess import auroc, best_threshold, binary_mask, normalize, resize_map, thresholds_with_labels
from .settings import (DEFAULT_PAIR, MAX_RESULTS, MAX_TEST_BATCH, NO_DETECTOR, PARTS_TURN_ROTATION,
                       SMALL_DEFECTS_SIZE, THUMB_SIDE, WORK_SIDE)
from .settings import MAX_SESSION_REFERENCES as MAX_REFERENCES
from .viz import OUTLINE_RGB, colour_range, framed, heatmap_overlay, mask_image, roc_figure, score_plot

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]

CONFIG_ENV = "ANOMALY_APP_CONFIG"               # JSON of DetectorConfig overrides (tests: fast fits)
RETIRED_FILES_GRACE_S = 60                      # drawings no longer shown are deleted after this
TABLE_ORDERS = ("score", "review")              # the table: highest score first, or REVIEW first
REVIEW_FIRST = ("REVIEW", "DEFECT", "OK")       # the verdicts in the "review" order
LIVE_SIDE = 480                 # live overlays are drawn at most this long (px): the live view's size
LIVE_RATE_WINDOW_S = 3.0        # the live frame rate counts the frames answered in this window
NO_CAMERA_FRAME = "No camera frame yet: start the camera in the Live camera tab first."


def detector_config(backbone: str = DEFAULT_PAIR, parts_turn: bool = False,
                    small_defects: bool = False, false_alarm_budget: float | None = None
                    ) -> DetectorConfig:
    """The config the app fits with: defaults, plus overrides from $ANOMALY_APP_CONFIG (JSON),
    plus the visitor's choices (``parts_turn``, ``small_defects``, ``false_alarm_budget``:
    None keeps the config's)."""
    overrides = json.loads(os.environ.get(CONFIG_ENV) or "{}")
    known = {f.name for f in fields(DetectorConfig)}
    if not isinstance(overrides, dict) or set(overrides) - known:
        raise ValueError(f"${CONFIG_ENV} must be a JSON object with keys from {sorted(known)}, "
                         f"got {overrides!r}")
    overrides["backbone"] = backbone
    if parts_turn:
        overrides["rotation"] = PARTS_TURN_ROTATION
    if small_defects:
        overrides["image_size"] = SMALL_DEFECTS_SIZE
    if false_alarm_budget is not None:
        overrides["false_alarm_budget"] = float(false_alarm_budget)
    return DetectorConfig(**overrides)


def shrink(image: Image.Image, side: int = WORK_SIDE) -> Image.Image:
    """A copy of ``image`` whose longer side is at most ``side`` px (aspect ratio kept)."""
    out = image.copy()
    out.thumbnail((side, side), Image.BILINEAR)
    return out


def _locked(method):
    """Run a method that changes the session under the session's lock (one change at a time)."""
    @wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


@dataclass
class Reference:
    key: str                        # where it came from (upload path): kept, never read again
    name: str
    image: Image.Image              # RGB, longer side <= WORK_SIDE
    camera: bool = False            # taken from the live camera (kept when the uploads change)


@dataclass(eq=False)
class Result:
    """One scored test image; ``label`` is the user's mark (True defect, False good, None)."""

    key: str                        # where it came from (upload path), to skip re-uploads
    name: str                       # its file name, made unique in the session ("a (2).png")
    image: Image.Image              # RGB, longer side <= WORK_SIDE
    anomaly_map: np.ndarray         # (S, S) float32, raw score units, model resolution
    score: float                    # raw image score = max of the map
    label: bool | None = None
    uploaded_as: str | None = None  # the file name, when another result already had it
    version: int = 0                # bumped when a new detector rescores it (drawings' cache key)
    files: dict = field(default_factory=dict)   # drawings on disk (see InspectionSession.thumbnail_file)


@dataclass
class LiveAnswer:
    """One camera frame answered by ``InspectionSession.live_frame``."""

    overlay: Image.Image            # RGB, longer side <= LIVE_SIDE; the bare frame without a detector
    score: float | None             # raw image score; None without a detector
    verdict: str | None             # OK, REVIEW or DEFECT at ``thresholds``; None without a detector
    thresholds: tuple[float, float] | None   # (threshold, defect threshold) it was judged at
    message: str | None             # why there is no verdict (no detector yet, or still fitting)
    fps: float | None               # frames answered per second lately; None for the first
    seconds: float                  # time spent on it in the session: decode, predict, overlay


@dataclass
class LabelSummary:
    n_good: int
    n_defect: int
    auroc: float
    best_threshold: float


class InspectionSession:
    """Everything one visitor has: references, a detector, results, marks and two thresholds:
    ``threshold`` (OK up to it; the app's slider) and ``defect_threshold`` (DEFECT above it,
    REVIEW between the two)."""

    def __init__(self) -> None:
        self.references: list[Reference] = []
        self.detector: PFMDetector | None = None
        self.fit_report: FitReport | None = None
        self.loaded_from_file = False
        self.results: list[Result] = []
        self.threshold: float | None = None
        self.defect_threshold: float | None = None
        self.false_alarm_budget: float | None = None   # the visitor's choice; None: the config's
        self.table_order = "score"            # one of TABLE_ORDERS
        self.selected: int | None = None      # index into self.results
        self.fitting = False              # a fit (or a detector's rescoring) is under way
        self._photos = 0
        self._drawings = 0                # files written by _write
        self._retired: list[tuple[float, Path]] = []   # drawings no longer shown, to delete
        self._tmp: Path | None = None
        self._generation = 0              # bumped by close(): a fit started before it is dropped
        self._lock = threading.RLock()    # short changes of state; never held while training
        self._fit_lock = threading.Lock() # one fit or detector switch at a time
        self._live_busy = threading.Lock()    # held while a camera frame is answered
        self._live_frame: Image.Image | None = None   # the last camera frame answered
        self._live_times: deque[float] = deque()      # when the recent ones were answered
        self.last_used = time.monotonic()  # of any kind; see touch()

    def stored_bytes(self) -> int:
        """Memory held by the session's images and maps, in bytes (what the app's capacity
        guard counts)."""
        images = [r.image for r in self.references] + [r.image for r in self.results]
        images += [self._live_frame] if self._live_frame is not None else []
        return (sum(im.width * im.height * len(im.getbands()) for im in images)
                + sum(r.anomaly_map.nbytes for r in self.results))

    def touch(self) -> None:
        """Note a use of this session (any action, reading included): idle time counts from here."""
        self.last_used = time.monotonic()

    # ------------------------------------------------------------------ references

    @_locked
    def set_references(self, paths: Sequence[str | Path]) -> list[str]:
        """Replace the uploaded references by these files; returns messages about skipped ones.

        Files already among the references are kept as they were loaded, not read again (the
        app's upload cache deletes files after an hour; the session keeps its own copy). The
        references taken from the camera stay (``remove_camera_references`` drops them)."""
        paths = list(paths or [])
        camera = [r for r in self.references if r.camera]
        if len(paths) + len(camera) > MAX_REFERENCES:
            also = f" (and {len(camera)} from the camera)" if camera else ""
            raise ValueError(f"{len(paths)} reference images uploaded{also}; the limit is "
                             f"{MAX_REFERENCES}. Remove some (a dozen good images is usually plenty).")
        known = {r.key: r for r in self.references}
        references, problems = [], []
        for path in paths:
            key, name = str(path), Path(path).name
            if key in known:
                references.append(known[key])
                continue
            try:
                references.append(Reference(key, name, shrink(load_image(path, name=name))))
            except ValueError as err:
                problems.append(f"skipped {err}")
        self.references = references + camera
        return problems

    @_locked
    def add_camera_reference(self) -> None:
        """Add the last camera frame (``live_frame``) to the good images, as camera_<n>.png,
        for the next fit."""
        frame = self._camera_frame()
        if len(self.references) >= MAX_REFERENCES:
            raise ValueError(f"There are {len(self.references)} good images already, the limit. "
                             f"Remove some before adding more.")
        key = self.next_photo_key("camera")
        self.references.append(Reference(key, key, frame, camera=True))

    @_locked
    def remove_camera_references(self) -> int:
        """Drop the good images taken from the camera -> how many were dropped."""
        kept = [r for r in self.references if not r.camera]
        dropped, self.references = len(self.references) - len(kept), kept
        return dropped

    def reference_keys(self) -> set[str]:
        return {r.key for r in self.references}

    @property
    def marked_good(self) -> list[Result]:
        return [r for r in self.results if r.label is False]

    def training_images(self) -> list[Image.Image]:
        """What a fit learns from: the uploaded references and the results marked good."""
        return [r.image for r in self.references] + [r.image for r in self.marked_good]

    def reference_gallery(self) -> list[tuple[Image.Image, str]]:
        """(thumbnail, caption) of every training image, uploaded ones first."""
        items = [(shrink(r.image, THUMB_SIDE), r.name) for r in self.references]
        items += [(shrink(r.image, THUMB_SIDE), f"{r.name} (marked good)") for r in self.marked_good]
        return items

    # ------------------------------------------------------------------ fitting

    @property
    def is_fitted(self) -> bool:
        return self.detector is not None

    def fit(self, backbone: str = DEFAULT_PAIR, progress: Progress | None = None, *,
            parts_turn: bool = False, small_defects: bool = False) -> FitReport:
        """Fit a new detector on ``training_images()`` and rescore the results with it.

        The session keeps working while it fits (inspections use the current detector); the new
        detector replaces it at the end. One fit at a time per session. The fit's false-alarm
        budget is the session's (``set_false_alarm_budget``)."""
        return self._fit(detector_config(backbone, parts_turn, small_defects, self.false_alarm_budget),
                         progress)

    def _fit(self, config: DetectorConfig, progress: Progress | None) -> FitReport:
        with self._fit_lock:
            with self._lock:
                images = self.training_images()
                if not images:
                    raise ValueError("Add at least one good reference image (step 1) before fitting.")
                if len(images) > MAX_REFERENCES:
                    raise ValueError(f"{len(images)} good images; the limit is {MAX_REFERENCES}. "
                                     f"Remove some references or unmark some results.")
                share = 0.9 if self.results else 1.0
                self.fitting = True
            try:
                detector = PFMDetector(config)
                report = detector.fit(images, _scaled(progress, 0.0, share))
                if not self.results:       # nothing to rescore: build its graphs before the first inspection
                    _warm_in_background(detector)
                self._switch_to(detector, report, _scaled(progress, share, 1.0))
            finally:
                self.fitting = False
            return report

    def load_detector(self, path: str | Path) -> None:
        """Use a detector file saved earlier (``save_detector``) instead of fitting."""
        detector = PFMDetector.load(path)
        if not self.results:
            _warm_in_background(detector)
        with self._fit_lock:
            self.fitting = True
            try:
                self._switch_to(detector, None)
            finally:
                self.fitting = False

    def score_files(self, files: Sequence[str | Path], alpha: float = 0.5) -> list[dict]:
        """``score_records`` of these files by the session's detector at its current thresholds;
        the session's results are left as they are."""
        self.require_detector()
        with self._lock:
            detector, thresholds = self.detector, (self.threshold, self.defect_threshold)
        return score_records(detector, files, fresh_folder(self._folder()), alpha, thresholds)

    def save_detector(self) -> Path:
        """Write the fitted detector to this session's folder -> the .safetensors path."""
        self.require_detector()
        return self.detector.save(self._folder() / "detector.safetensors")

    def export_onnx(self) -> Path:
        """Write the fitted detector, at the session's current thresholds, as one ONNX file for
        the line (``anomaly.export``; run it with ``anomaly.edge``) -> its path."""
        from .export import export_onnx

        with self._lock:
            self.require_detector()
            detector, thresholds = self.detector, (self.threshold, self.defect_threshold)
        return export_onnx(detector, self._folder() / "detector.onnx", thresholds)

    def _switch_to(self, detector: PFMDetector, report: FitReport | None,
                   progress: Progress | None = None) -> None:
        """Make ``detector`` current (``report`` None: loaded from a file): rescore every result,
        thresholds back to calibrated (with the marks' rule, ``reset_threshold``) and the
        session's false-alarm budget the detector's. The rescoring runs outside the session's
        lock; results added meanwhile are scored at the end. Nothing changes if the session was
        closed since."""
        with self._lock:
            pending, generation = list(self.results), self._generation
        scored = dict(zip(map(id, pending), _score(detector, [r.image for r in pending], progress)))
        with self._lock:
            if generation != self._generation:
                return
            later = [r for r in self.results if id(r) not in scored]
            scored.update(zip(map(id, later), _score(detector, [r.image for r in later])))
            for result in self.results:
                result.anomaly_map, result.score = scored[id(result)]
                result.version += 1
                self._retire(result)
            self.detector, self.false_alarm_budget = detector, detector.config.false_alarm_budget
            self.fit_report, self.loaded_from_file = report, report is None
            self.reset_threshold()

    def require_detector(self) -> None:
        """A ValueError that says what to do when there is no detector yet."""
        if self.detector is None:
            if self.fitting:
                raise ValueError("The detector is still being fitted; inspect when the fit is done.")
            raise ValueError(NO_DETECTOR)

    # ------------------------------------------------------------------ inspecting

    @_locked
    def inspect(self, items: Sequence[tuple[str, ImageLike]], progress: Progress | None = None
                ) -> tuple[int, list[str]]:
        """Score (key, image) pairs not seen before -> (number scored, messages about the rest).

        ``key`` is the upload's path (its file name names the result; a name already taken gets
        a number, "a (2).png", and a message says so). The new results are appended; beyond
        MAX_RESULTS unmarked results the oldest unmarked are dropped (results marked good or
        defective are kept).
        """
        self.require_detector()
        items = list(items or [])
        if not items:
            raise ValueError("Add one or more test images first.")
        if len(items) > MAX_TEST_BATCH:
            raise ValueError(f"{len(items)} test images at once; the limit is {MAX_TEST_BATCH} per "
                             f"batch. Inspect them in smaller batches.")
        seen = {r.key for r in self.results}
        names = {r.name for r in self.results}
        fresh, problems = [], []
        for key, src in items:
            if str(key) in seen:
                continue
            uploaded_as = Path(str(key)).name
            name = _unique(uploaded_as, names)
            try:
                image = shrink(load_image(src, name=name))
            except ValueError as err:
                problems.append(f"skipped {err}")
                continue
            seen.add(str(key))
            names.add(name)
            if name != uploaded_as:
                problems.append(f"another image is already named {uploaded_as}; this later upload "
                                f"of that name is shown as {name}")
            fresh.append((str(key), name, image, uploaded_as if name != uploaded_as else None))
        if not fresh:
            return 0, problems
        scored = _score(self.detector, [image for _, _, image, _ in fresh], progress)
        new = [Result(key, name, image, amap, score, uploaded_as=uploaded_as)
               for (key, name, image, uploaded_as), (amap, score) in zip(fresh, scored)]
        self.results.extend(new)
        unmarked = [r for r in self.results if r.label is None]
        dropped = len(unmarked) - MAX_RESULTS
        if dropped > 0:      # marked results are references or feed the ROC: never evicted
            for result in unmarked[:dropped]:
                self._retire(result)
            gone = {id(r) for r in unmarked[:dropped]}
            self.results = [r for r in self.results if id(r) not in gone]
            problems.append(f"only the last {MAX_RESULTS} unmarked results are kept; the {dropped} "
                            f"oldest unmarked were removed (marked ones are always kept)")
        self.selected = self.results.index(max(new, key=lambda r: r.score))
        return len(new), problems

    def next_photo_key(self, kind: str = "photo") -> str:
        """A name for a pasted, webcam or camera photo, which has no file name of its own:
        ``<kind>_<n>.png``, n counting all kinds."""
        self._photos += 1
        return f"{kind}_{self._photos}.png"

    # ------------------------------------------------------------------ live camera

    def live_frame(self, image: ImageLike, alpha: float = 0.5, outline: bool = True
                   ) -> LiveAnswer | None:
        """Answer one camera frame with the current detector at the current thresholds (the
        overlay as ``overlay`` draws it, at most LIVE_SIDE px) -> LiveAnswer; None, at once,
        while the previous frame is still being answered: this one is dropped, so the answers
        follow the latest frame instead of a queue. The frame is kept (shrunk to WORK_SIDE) for
        ``capture`` and ``add_camera_reference``. Without a detector the answer is the bare
        frame and a message saying what to do."""
        if not self._live_busy.acquire(blocking=False):
            return None
        try:
            start = time.perf_counter()
            frame = shrink(load_image(image, name="camera frame"))
            with self._lock:            # one consistent (detector, thresholds); close() waits
                self._live_frame = frame
                try:
                    self.require_detector()
                except ValueError as err:
                    drawn, score, verdict, thresholds, message = (shrink(frame, LIVE_SIDE), None,
                                                                  None, None, str(err))
                else:
                    (amap, score), = _score(self.detector, [frame])
                    live = Result("camera", "camera", frame, amap, score)
                    drawn, verdict, message = (self.overlay(live, alpha, outline, side=LIVE_SIDE),
                                               self.verdict(live), None)
                    thresholds = (self.threshold, self.defect_threshold)
                fps = self._answered_rate()
        finally:
            self._live_busy.release()
        return LiveAnswer(drawn, score, verdict, thresholds, message, fps, time.perf_counter() - start)

    def _answered_rate(self) -> float | None:
        """Note a live frame answered now -> frames answered per second over the last
        LIVE_RATE_WINDOW_S; None for the first one in it."""
        now, times = time.monotonic(), self._live_times
        times.append(now)
        while now - times[0] > LIVE_RATE_WINDOW_S:
            times.popleft()
        return (len(times) - 1) / (now - times[0]) if now > times[0] else None

    @_locked
    def capture(self) -> list[str]:
        """Add the last camera frame to the results as camera_<n>.png, scored exactly as an
        upload of it is; it becomes the selected result -> messages (``inspect``'s)."""
        self.require_detector()
        frame = self._camera_frame()
        return self.inspect([(self.next_photo_key("camera"), frame)])[1]

    def _camera_frame(self) -> Image.Image:
        if self._live_frame is None:
            raise ValueError(NO_CAMERA_FRAME)
        return self._live_frame

    @_locked
    def clear_results(self) -> None:
        if self.marked_good:
            raise ValueError("Some results are marked good and are part of the references; "
                             "clear their marks first (that refits the detector).")
        for result in self.results:
            self._retire(result)
        self.results, self.selected = [], None

    # ------------------------------------------------------------------ threshold and verdicts

    @property
    def calibrated_threshold(self) -> float:
        """The detector's own OK / REVIEW boundary (its false-alarm budget's)."""
        self.require_detector()
        return self.detector.threshold

    @_locked
    def set_threshold(self, value: float) -> None:
        """The OK / REVIEW boundary (the slider); the DEFECT boundary follows it
        (``PFMDetector.defect_threshold_for``)."""
        self.require_detector()
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"threshold must be a number >= 0, got {value}")
        self.threshold, self.defect_threshold = value, self.detector.defect_threshold_for(value)

    @_locked
    def reset_threshold(self) -> float:
        """Back to the detector's calibrated thresholds, moved by the marks
        (``postprocess.thresholds_with_labels``) -> the threshold."""
        self.require_detector()
        marked = [r for r in self.results if r.label is not None]
        self.threshold, self.defect_threshold = thresholds_with_labels(
            self.detector.threshold, self.detector.defect_threshold,
            [r.score for r in marked if not r.label], [r.score for r in marked if r.label])
        return self.threshold

    @_locked
    def set_false_alarm_budget(self, rate: float) -> None:
        """The expected share of good parts not called OK (0 < rate < 1): the detector is
        re-thresholded for it (nothing is refitted; later fits and saved files keep it) and the
        session's thresholds go back to calibrated. Before a fit it is kept for the fit."""
        rate = float(rate)
        if not 0.0 < rate < 1.0:
            raise ValueError(f"a false-alarm budget must lie strictly between 0 and 1, got {rate}")
        if self.detector is not None:
            self.detector.set_false_alarm_budget(rate)
            self.reset_threshold()
        self.false_alarm_budget = rate

    def expected_false_alarm_rate(self) -> float:
        """Estimated share of good parts that the current threshold does not call OK."""
        self.require_detector()
        return self.detector.expected_false_alarm_rate(self.threshold)

    def threshold_range(self) -> tuple[float, float, float]:
        """(minimum, maximum, step) for a threshold slider covering every score in the session."""
        self.require_detector()
        lo, hi = self.detector.score_range
        values = [lo, hi, self.threshold, *self.detector.calibration_scores.tolist(),
                  *(r.score for r in self.results)]
        top = max(values) * 1.05
        bottom = max(0.0, min(values) * 0.9)
        step = 10.0 ** math.floor(math.log10(max(top - bottom, 1e-9) / 500))
        return (math.floor(bottom / step) * step, math.ceil(top / step) * step, step)

    def _norm_args(self) -> tuple[float, float, float]:
        return (self.threshold, *colour_range(self.threshold, *self.detector.score_range))

    def norm_score(self, result: Result) -> float:
        """The result's score on the 0-1 scale where the current threshold is 0.5."""
        return float(normalize(result.score, *self._norm_args()))

    def verdict(self, result: Result) -> str:
        """OK, REVIEW or DEFECT at the current thresholds."""
        return verdict_of(result.score, self.threshold, self.defect_threshold)

    def ranked(self) -> list[Result]:
        """The results, highest score first (a snapshot: later changes do not affect it)."""
        return sorted(list(self.results), key=lambda r: -r.score)

    def current(self) -> Result | None:
        """The selected result, if any."""
        with self._lock:
            i = self.selected
            return self.results[i] if i is not None and i < len(self.results) else None

    def counts(self) -> dict[str, int]:
        """{verdict: number of results} at the current thresholds, for every one of VERDICTS."""
        verdicts = [self.verdict(r) for r in self.results]
        return {v: verdicts.count(v) for v in VERDICTS}

    def set_table_order(self, order: str) -> None:
        """The order ``table()`` gives by default, one of TABLE_ORDERS."""
        self.table_order = _checked_order(order)

    def table(self, order: str | None = None) -> list[list]:
        """Rows [image, verdict, score, score 0-1, your mark]; ``order`` (default: the session's
        ``table_order``) "score": highest score first; "review": REVIEW first, then DEFECT, then
        OK, each highest score first."""
        order = self.table_order if order is None else _checked_order(order)
        rows = [[r.name, self.verdict(r), round(r.score, 4), round(self.norm_score(r), 3),
                 _mark_text(r.label)] for r in self.ranked()]
        if order == "review":
            rows.sort(key=lambda row: REVIEW_FIRST.index(row[1]))     # stable: by score within
        return rows

    def suggestions(self, n: int = 3) -> list[Result]:
        """The unmarked results a label would teach the most, at most ``n``: those in the REVIEW
        band first, then the others; each group nearest the threshold first (in log score, the
        scale on which good scores are modelled)."""
        with self._lock:
            self.require_detector()
            unmarked = [r for r in self.results if r.label is None]
            log_t = math.log(max(self.threshold, 1e-12))
            return sorted(unmarked, key=lambda r: (self.verdict(r) != "REVIEW",
                                                   abs(math.log(max(r.score, 1e-12)) - log_t)))[:n]

    def overlay(self, result: Result, alpha: float = 0.5, outline: bool = True,
                side: int | None = None, thresholds: tuple[float, float] | None = None) -> Image.Image:
        """The result's photo (optionally shrunk to ``side``) with heatmap and the outline of
        the region above the threshold, in its verdict's colour; ``thresholds`` (threshold,
        defect threshold), default: the current ones."""
        image = result.image if side is None else shrink(result.image, side)
        lo, hi = self.detector.score_range
        threshold, defect = (self.threshold, self.defect_threshold) if thresholds is None else thresholds
        return heatmap_overlay(image, result.anomaly_map, threshold, lo, hi, alpha, outline,
                               OUTLINE_RGB[verdict_of(result.score, threshold, defect)])

    def result_map(self, result: Result) -> np.ndarray:
        """(H, W) float32 anomaly map at the size of the result's (kept) image."""
        return resize_map(result.anomaly_map, result.image.size)

    def area_above(self, result: Result) -> float:
        """Fraction of the image whose map value is above the threshold."""
        return float(binary_mask(result.anomaly_map, self.threshold).mean())

    def score_figure(self):
        """Reference and test scores with both threshold lines (matplotlib Figure)."""
        self.require_detector()
        labels = [r.label for r in self.results]
        return score_plot(self.detector.calibration_scores.numpy(), [r.score for r in self.results],
                          self.threshold, self.defect_threshold,
                          labels if any(x is not None for x in labels) else None)

    # ------------------------------------------------------------------ feedback

    @_locked
    def select(self, which: int | str) -> Result:
        """Select a result by its index in ``results`` or by its name."""
        if isinstance(which, str):
            index = next((i for i, r in enumerate(self.results) if r.name == which), None)
            if index is None:
                raise ValueError(f"no result named {which!r}")
        else:
            index = which
            if not 0 <= index < len(self.results):
                raise ValueError(f"no result number {index}; there are {len(self.results)}")
        self.selected = index
        return self.results[index]

    @_locked
    def select_ranked(self, position: int) -> Result:
        """Select the result at ``position`` in ``ranked()`` (as the gallery shows them)."""
        return self._select_in(self.ranked(), position)

    @_locked
    def select_suggested(self, position: int) -> Result:
        """Select the result at ``position`` in ``suggestions()`` (as the app lists them)."""
        return self._select_in(self.suggestions(), position)

    def _select_in(self, shown: list[Result], position: int) -> Result:
        if not 0 <= position < len(shown):
            raise ValueError(f"no result number {position}; there are {len(shown)}")
        return self.select(self.results.index(shown[position]))

    def mark(self, which: int | str, label: bool | None, progress: Progress | None = None) -> FitReport | None:
        """Mark a result (its index or its name, looked up under the lock) good (False), defect
        (True) or unmarked (None); it becomes the selected one.

        Marking good adds the image to the references, and taking that mark away removes it;
        both refit the detector (-> its FitReport). If the refit fails the mark is undone.
        Marking defective moves the thresholds (``postprocess.thresholds_with_labels``: the
        lowest score marked defective is DEFECT); taking that mark away puts them back to
        calibrated with the remaining marks (``reset_threshold``), as does every refit.
        """
        with self._lock:
            result = self.select(which)
            old = result.label
            if (old is False) == (label is False):
                result.label = label
                if label:
                    self.threshold, self.defect_threshold = thresholds_with_labels(
                        self.threshold, self.defect_threshold, [r.score for r in self.marked_good],
                        [r.score for r in self.results if r.label])
                elif old:
                    self.reset_threshold()
                return None
            if self.loaded_from_file and not self.references:
                raise ValueError("This detector was loaded from a file, which does not contain its "
                                 "reference images. Upload the good reference images in step 1 "
                                 "first, then mark images as good.")
            result.label = label
            config = self.detector.config                   # refit with the same choices
        try:
            return self._fit(config, progress)
        except Exception:
            with self._lock:
                result.label = old
            raise

    def label_summary(self) -> LabelSummary | None:
        """AUROC and the best threshold over the marked results; None unless both kinds are marked."""
        marked = [r for r in self.results if r.label is not None]
        n_defect = sum(bool(r.label) for r in marked)
        if not marked or n_defect in (0, len(marked)):
            return None
        scores = [r.score for r in marked]
        labels = [bool(r.label) for r in marked]
        return LabelSummary(len(marked) - n_defect, n_defect, auroc(scores, labels),
                            best_threshold(scores, labels))

    def roc(self):
        """ROC curve of the marked results (matplotlib Figure); needs both kinds marked."""
        marked = [r for r in self.results if r.label is not None]
        return roc_figure([r.score for r in marked], [bool(r.label) for r in marked])

    # ------------------------------------------------------------------ export

    @_locked
    def export_zip(self) -> Path:
        """ZIP of per image ``<name>_overlay.png``, ``_mask.png``, ``_map.npy`` and results.csv.

        Maps and masks (above the threshold) are at the size of the kept image (longer side <=
        WORK_SIDE); the CSV lists file name, score, normalised score, verdict (OK, REVIEW or
        DEFECT), threshold, defect threshold and the user's mark.
        """
        self.require_detector()
        if not self.results:
            raise ValueError("Nothing to export yet: inspect some test images first.")
        path = self._folder() / "inspection_results.zip"
        table = io.StringIO()
        writer = csv.writer(table)
        writer.writerow(["file", "score", "normalised_score", "verdict", "threshold",
                         "defect_threshold", "mark"])
        stems: set[str] = set()
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            for r in self.ranked():
                stem = _unique(Path(r.name).stem, stems)      # a.png and a.jpg both exist
                stems.add(stem)
                amap = self.result_map(r)
                archive.writestr(f"{stem}_overlay.png", _png(self.overlay(r)))
                archive.writestr(f"{stem}_mask.png", _png(mask_image(amap, self.threshold)))
                buffer = io.BytesIO()
                np.save(buffer, amap)
                archive.writestr(f"{stem}_map.npy", buffer.getvalue())
                writer.writerow([r.name, f"{r.score:.6g}", f"{self.norm_score(r):.4f}",
                                 self.verdict(r), f"{self.threshold:.6g}",
                                 f"{self.defect_threshold:.6g}", _mark_text(r.label)])
            archive.writestr("results.csv", table.getvalue())
        return path

    def _folder(self) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="anomaly-session-"))
        return self._tmp

    @_locked
    def close(self) -> None:
        """Free everything (called when the visitor's session ends); a fit under way is dropped
        when it finishes. The session can be used again from scratch."""
        self.references, self.results, self.detector = [], [], None
        self.threshold, self.defect_threshold, self.selected, self.fit_report = None, None, None, None
        self._generation += 1
        self._retired = []
        self._live_frame = None
        self._live_times.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # ------------------------------------------------------------------ drawings on disk

    def thumbnail_file(self, result: Result, alpha: float = 0.5) -> Path:
        """PNG of the result's heatmap at THUMB_SIDE px, framed in its verdict's colour.

        Drawn once per (opacity, verdict) and kept in the session's folder, so moving the
        threshold redraws no thumbnail: its colours use the calibrated threshold's scale and it
        has no outline (the selected image shows the current threshold's outline)."""
        with self._lock:        # one consistent (map, version, detector)
            verdict, version, amap = self.verdict(result), result.version, result.anomaly_map
            detector = self.detector
        key = ("thumbnail", version, round(float(alpha), 3), verdict)
        if key not in result.files:
            lo, hi = detector.score_range
            heat = heatmap_overlay(shrink(result.image, THUMB_SIDE), amap, detector.threshold,
                                   lo, hi, alpha, outline=False)
            result.files[key] = self._write(framed(heat, verdict))
        return result.files[key]

    def overlay_file(self, result: Result, alpha: float = 0.5, outline: bool = True) -> Path:
        """JPEG of ``overlay(result, alpha, outline)`` at the current thresholds (quality 92: 20x
        faster to write than a PNG); only the latest one per result is kept."""
        with self._lock:
            thresholds, version = (self.threshold, self.defect_threshold), result.version
        key = ("overlay", version, thresholds, round(float(alpha), 3), bool(outline))
        if key not in result.files:
            stale = [k for k in list(result.files) if k[0] == "overlay"]
            self._retire(result, stale)
            drawn = self.overlay(result, alpha, outline, thresholds=thresholds)
            result.files[key] = self._write(drawn, "jpg")
        return result.files[key]

    def photo_file(self, result: Result) -> Path:
        """PNG of the result's photo as the session keeps it, written once."""
        if "photo" not in result.files:
            result.files["photo"] = self._write(result.image)
        return result.files["photo"]

    def _write(self, image: Image.Image, kind: str = "png") -> Path:
        folder = self._folder() / "drawings"
        folder.mkdir(exist_ok=True)
        self._drawings += 1
        path = folder / f"{self._drawings}.{kind}"
        if kind == "png":
            image.save(path, compress_level=1)      # 5x faster than the default, ~1.3x larger
        else:
            image.save(path, quality=92)
        return path

    def _retire(self, result: Result, keys: list | None = None) -> None:
        """Forget the result's drawings (``keys`` of ``result.files``, default all: its map or
        its place changed); their files go a minute later, when no page being drawn from them
        can still need them."""
        now = time.monotonic()
        keys = list(result.files) if keys is None else keys
        gone = [result.files.pop(key, None) for key in keys]      # another thread may be first
        self._retired += [(now, path) for path in gone if path is not None]
        keep = []
        for when, path in self._retired:
            if now - when > RETIRED_FILES_GRACE_S:
                path.unlink(missing_ok=True)
            else:
                keep.append((when, path))
        self._retired = keep


def score_records(detector: PFMDetector, files: Sequence[str | Path], folder: Path,
                  alpha: float = 0.5, thresholds: tuple[float, float] | None = None) -> list[dict]:
    """Image files -> one JSON-ready record each, in order (the app's ``score`` API):

    ``file`` (name), ``score`` (raw), ``score_0_1`` (threshold at 0.5), ``verdict`` (OK, REVIEW
    or DEFECT), ``threshold`` and ``defect_threshold`` (``thresholds``, default: the
    detector's), ``area_above_threshold`` (fraction of the image), ``overlay`` (path of a JPEG
    heatmap overlay written to ``folder``) and ``error`` (None, or why the file was not
    scored; its other values are then None). Images are shrunk to WORK_SIDE as in a session.
    """
    if len(files) > MAX_TEST_BATCH:
        raise ValueError(f"{len(files)} images at once; the limit is {MAX_TEST_BATCH} per call.")
    threshold, defect = (detector.threshold, detector.defect_threshold) if thresholds is None else thresholds
    lo, hi = colour_range(threshold, *detector.score_range)
    records = []
    for i, path in enumerate(files):
        name = Path(path).name
        record = dict.fromkeys(("file", "score", "score_0_1", "verdict", "threshold",
                                "defect_threshold", "area_above_threshold", "overlay", "error"))
        record.update(file=name, threshold=threshold, defect_threshold=defect)
        try:
            image = shrink(load_image(path, name=name))
        except (ValueError, OSError) as err:
            records.append({**record, "error": str(err)})
            continue
        (amap, score), = _score(detector, [image])
        verdict = verdict_of(score, threshold, defect)
        overlay = folder / f"{i + 1:03d}_{Path(name).stem}_overlay.jpg"
        heatmap_overlay(image, amap, threshold, lo, hi, alpha,
                        outline_colour=OUTLINE_RGB[verdict]).save(overlay, quality=92)
        records.append({**record, "score": score, "score_0_1": float(normalize(score, threshold, lo, hi)),
                        "verdict": verdict,
                        "area_above_threshold": float(binary_mask(amap, threshold).mean()),
                        "overlay": str(overlay)})
    return records


def false_alarm_words(rate: float) -> str:
    """An expected false-alarm rate in words and as a percentage, e.g. 0.05 -> "About 1 in 20
    good parts will be flagged (REVIEW or DEFECT): 5.0 % expected."."""
    if rate < 1e-4:
        share = "Fewer than 1 in 10,000 good parts"
    elif rate >= 0.95:
        share = "Nearly all good parts"
    elif rate >= 0.2:
        share = f"About {round(10 * rate)} in 10 good parts"
    else:
        n = 1.0 / rate
        n = round(n) if n < 100 else int(round(n, 1 - int(math.log10(n))))   # 2 significant digits
        share = f"About 1 in {n:,} good parts"
    percent = f"{100 * rate:.1f}" if rate >= 0.01 else f"{100 * rate:.2g}"
    return f"{share} will be flagged (REVIEW or DEFECT): {percent} % expected."


def fresh_folder(parent: Path) -> Path:
    """A new ``parent/scored-*`` folder for one call's files; the folders of earlier calls go
    once they are RETIRED_FILES_GRACE_S old (the app has copied their files by then)."""
    now = time.time()
    for old in parent.glob("scored-*"):
        with contextlib.suppress(FileNotFoundError):      # a concurrent call was first
            if now - old.stat().st_mtime > RETIRED_FILES_GRACE_S:
                shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix="scored-", dir=parent))


def _score(detector: PFMDetector, images: list[Image.Image], progress: Progress | None = None,
           chunk: int = 8) -> list[tuple[np.ndarray, float]]:
    """Images -> [(map (S, S) float32, score)], ``chunk`` images per forward pass."""
    out = []
    for start in range(0, len(images), chunk):
        if progress:
            progress(start / len(images), f"scoring image {start + 1} of {len(images)}")
        preds = detector.predict(images[start:start + chunk], resolution="model")
        out += [(p.anomaly_map, p.pred_score) for p in preds]
    return out


def _warm_in_background(detector: PFMDetector) -> None:
    """``detector.warm()`` on its own thread (an inspection that comes meanwhile waits for the
    graph being built, then goes ahead). Not a daemon: a process that exits while the thread is
    inside OpenVINO aborts ("terminate called without an active exception"), so exit waits for
    it (about 0.5 s)."""
    def warm():
        try:
            detector.warm()
        except Exception:  # the first inspection will report it to the user
            log.exception("preparing the detector's predictions failed")
    threading.Thread(target=warm, name="warm-detector").start()


def _scaled(progress: Progress | None, start: float, end: float) -> Progress | None:
    if progress is None:
        return None
    return lambda fraction, message: progress(start + (end - start) * fraction, message)


def _unique(name: str, taken: set[str]) -> str:
    """``name``, or ``stem (2).ext``, ``stem (3).ext``... if already taken."""
    if name not in taken:
        return name
    stem, suffix = Path(name).stem, Path(name).suffix
    n = 2
    while f"{stem} ({n}){suffix}" in taken:
        n += 1
    return f"{stem} ({n}){suffix}"


def _checked_order(order: str) -> str:
    if order not in TABLE_ORDERS:
        raise ValueError(f"the table can be sorted by one of {TABLE_ORDERS}, not {order!r}")
    return order


def _mark_text(label: bool | None) -> str:
    return {None: "", False: "good", True: "defect"}[label]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
