"""Gradio app: fit an anomaly detector on a few good photos, then inspect test photos.

    python app.py                          # http://127.0.0.1:7860
    python app.py --host 0.0.0.0 --port 8080   # or $ANOMALY_HOST / $ANOMALY_PORT

A thin UI over ``anomaly/``: every handler calls one method of ``anomaly.session.
InspectionSession`` (kept per browser tab in a ``gr.State``) and turns its ``ValueError`` into a
``gr.Error`` message. Drawing lives in ``anomaly.viz``.

For a public deployment, $ANOMALY_MAX_SESSIONS caps the live sessions and
$ANOMALY_MAX_STORED_MB the images they keep in memory; past either, new work is refused with a
"busy, try again in a minute" message and running sessions lose nothing.
"""
import argparse
import ctypes
import ctypes.util
import functools
import gc
import hashlib
import importlib
import logging
import math
import os
import sys
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from pathlib import Path

import gradio as gr

# Only torch-free parts of the package here: the page is built and served from these while the
# models load in the background (preload_models); handlers import the rest when first called.
from anomaly.examples import EXAMPLES_DIR, example_sets
from anomaly.image_io import MAX_FILE_BYTES, MAX_PIXELS
from anomaly.settings import (BACKBONE_PAIRS, DEFAULT_FALSE_ALARM_BUDGET, DEFAULT_IMAGE_SIZE, DEFAULT_PAIR,
                              FALSE_ALARM_BUDGETS, MAX_RESULTS, MAX_TEST_BATCH, NO_DETECTOR,
                              SMALL_DEFECTS_SIZE, WORK_SIDE)
from anomaly.settings import MAX_SESSION_REFERENCES as MAX_REFERENCES

log = logging.getLogger("app")

SESSION_TTL_S = 2 * 3600        # an open tab's session is freed this long after its last use
REAP_EVERY_S = 60               # how often idle sessions are looked for
FIT_CONCURRENCY = 1             # fits (and refits) run one at a time, in their own queue ...
PREDICT_CONCURRENCY = 2         # ... so they never block the inspections of other visitors
LIVE_EVERY_S = 0.1              # the browser sends a camera frame this often (<= 10 answered per s)
LIVE_TURN_S = 60                # a camera stream's turn: then it queues again behind waiting ones
LIVE_STREAMS = 2                # camera streams answered at once; their frames share CPU_TURN
BACKBONE_LABELS = {
    "effnet-lite": "EfficientNet-Lite (default: fast, works offline)",
    "resnet34-resnet50": "ResNet34 → ResNet50 (the paper's pair; needs downloaded weights)",
    "resnet18-resnet34": "ResNet18 → ResNet34 (needs downloaded weights)",
}
PARTS_TURN_LABEL = ("Parts lie at any angle (screws, bolts): learn them at every rotation. "
                    "Leave off for parts that always face the same way.")
SMALL_DEFECTS_LABEL = (f"Small defects: model at {SMALL_DEFECTS_SIZE} px instead of "
                       f"{DEFAULT_IMAGE_SIZE} (finer, about 1.5x slower to fit and inspect)")
STEADY_REFERENCES = 4          # below this many good images the app calls the threshold rough
SUGGESTIONS = 3                # images proposed for a label after an inspection
TABLE_ORDER_CHOICES = [("highest score first", "score"), ("REVIEW first", "review")]
LIMITS = (f"Limits: up to {MAX_REFERENCES} good images, {MAX_TEST_BATCH} test images per batch "
          f"(the last {MAX_RESULTS} unmarked results are kept), {MAX_FILE_BYTES // 2**20} MB and "
          f"{MAX_PIXELS // 10**6} megapixels per image. Larger photos are shrunk to "
          f"{WORK_SIDE} px on the longer side before scoring.")
MAX_SESSIONS = int(os.environ.get("ANOMALY_MAX_SESSIONS") or 40)          # live sessions
MAX_STORED_BYTES = int(float(os.environ.get("ANOMALY_MAX_STORED_MB") or 4096) * 2**20)  # their images
SCORE_FOLDER = Path(tempfile.mkdtemp(prefix="anomaly-score-api-"))   # stateless score calls' files
DETECTORS = OrderedDict()       # sha256 of a detector file -> PFMDetector, the last few sent to /score
DETECTORS_KEPT = 4
DETECTORS_LOCK = threading.Lock()
SHOWN_GALLERY = weakref.WeakKeyDictionary()   # session -> the results gallery last sent to its tab
OPEN_SESSIONS = {}              # Gradio session hash -> InspectionSession, for end_session
OPEN_SESSIONS_LOCK = threading.Lock()
LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None
if LIBC is not None and not hasattr(LIBC, "malloc_trim"):   # musl, macOS: nothing to trim
    LIBC = None
CSS = """
.step-title h2 {margin-bottom: 0}
#results-summary p {font-size: 1.1em}
#results-gallery .caption-label, #ref-gallery .caption-label {white-space: normal; max-width: 100%;
  overflow-wrap: anywhere; font-size: var(--text-xs); padding: 1px 4px}
"""


# --------------------------------------------------------------------------- handler plumbing

def user_errors(fn):
    """Show the session's ValueError / RuntimeError as a gr.Error; hide anything unexpected."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except ValueError as err:               # the session's messages are meant for the user
            raise gr.Error(str(err), print_exception=False) from None
        except Exception as err:                # torch's RuntimeErrors included: logged, not shown
            if missing_weights(err):
                raise gr.Error(f"This feature extractor is not available here: {err}",
                               title="Weights not available", print_exception=False) from None
            log.exception("unexpected error in %s", fn.__name__)
            raise gr.Error("Something went wrong on the server. Your detector and results are "
                           "unchanged; please try again.", print_exception=False) from None
    return wrapper


def missing_weights(err: Exception) -> bool:
    """Whether ``err`` is anomaly.backbones.WeightsUnavailableError (only raised once that
    module is loaded, so this never imports it)."""
    backbones = sys.modules.get("anomaly.backbones")
    return backbones is not None and isinstance(err, backbones.WeightsUnavailableError)


def warn(messages):
    for message in messages:
        gr.Warning(message)


def session_for(session, request):
    """The visitor's session, created if the tab has none, and registered so that closing the
    tab frees it (see ``end_session``); a "busy" gr.Error when MAX_SESSIONS others are open."""
    from anomaly.session import InspectionSession

    session = session or InspectionSession()
    session.touch()
    if request is not None and request.session_hash:
        with OPEN_SESSIONS_LOCK:
            if OPEN_SESSIONS.get(request.session_hash) is not session:
                if len(OPEN_SESSIONS) >= MAX_SESSIONS:
                    raise busy(f"{len(OPEN_SESSIONS)} visitors are using it (its limit)")
                OPEN_SESSIONS[request.session_hash] = session
    return session


def busy(why: str) -> gr.Error:
    return gr.Error(f"The server is busy: {why}. Please try again in a minute; nothing you have "
                    f"done so far is lost.", title="Busy", print_exception=False)


def room_for_images():
    """A "busy" gr.Error when the open sessions keep MAX_STORED_BYTES of images or more."""
    with OPEN_SESSIONS_LOCK:
        sessions = list(OPEN_SESSIONS.values())
    stored = sum(s.stored_bytes() for s in sessions)
    if stored >= MAX_STORED_BYTES:
        raise busy(f"it holds {stored / 2**20:.0f} MB of images for its visitors (its limit is "
                   f"{MAX_STORED_BYTES / 2**20:.0f} MB)")


def existing(session):
    """The visitor's session, which has a detector; the session's ValueError (shown by
    ``user_errors``) when it has none, was never started or has expired."""
    if session is None:
        raise ValueError(NO_DETECTOR)
    session.require_detector()
    session.touch()
    return session


def as_progress(progress):
    """gr.Progress -> the core's progress(fraction, message) callback."""
    return lambda fraction, message: progress(fraction, desc=message)


def paths(files):
    """Value of a gr.File(file_count="multiple") -> list of file paths."""
    return [str(f) for f in (files or [])]


# --------------------------------------------------------------------------- views

def reference_views(s):
    """(gallery, count text) of the training images."""
    items = s.reference_gallery()
    n = len(items)
    text = (f"**{n} good image{'s' * (n != 1)}** ready (limit {MAX_REFERENCES})." if n else
            "No good images yet. Upload a few photos of parts **without** defects.")
    return items, text


def fit_text(s):
    if not s.is_fitted:
        return "Not fitted yet."
    lo, hi = s.detector.calibration_scores.min().item(), s.detector.calibration_scores.max().item()
    backbone = BACKBONE_LABELS.get(s.detector.config.backbone, s.detector.config.backbone)
    if s.fit_report is None:
        head = "**Detector loaded from file.**"
    else:
        r = s.fit_report
        head = (f"**Fitted on {r.n_references} good image{'s' * (r.n_references != 1)} "
                f"in {r.seconds:.1f} s.**")
    from anomaly.session import false_alarm_words

    budget = s.detector.config.false_alarm_budget
    text = (f"{head} False-alarm budget **{percent(budget)}**: {false_alarm_words(budget)} "
            f"Calibrated thresholds: REVIEW above **{s.calibrated_threshold:.4g}**, DEFECT above "
            f"**{s.detector.defect_threshold:.4g}** (good images scored {lo:.4g} – {hi:.4g}). "
            f"Feature extractor: {backbone}.")
    if s.fit_report is not None and s.fit_report.n_references < STEADY_REFERENCES:
        text += "\n\n" + rough_threshold_text(s.fit_report.n_references)
    return text


def rough_threshold_text(n: int) -> str:
    """Why the thresholds of a fit on 1-3 good images are rough, with the rates we measured."""
    if n == 1:
        basis = ("how far your parts' scores spread is a default that carries over between "
                 "parts, and their level comes from augmented copies of your one image")
    else:
        basis = (f"they rest on {n} good parts, each scored against the others, so how far your "
                 f"parts' scores spread is partly a default that carries over between parts")
    return (f"⚠️ **Rough thresholds.** With {n} good image{'s' * (n != 1)} {basis}. Measured on "
            f"three public test sets (bottle, magnetic tile, screw) with 2 good images and a 5 % "
            f"budget, single fits flagged 0–28 % of good parts (3–9 % on average per part) and "
            f"missed 0–100 % of defects. Add good images ({STEADY_REFERENCES}–8 or more) for "
            f"steadier thresholds, or move the slider and mark the suggested results as good or "
            f"defective to see where they should be.")


def live_text(answer) -> str:
    """The live view's line for an ``anomaly.session.LiveAnswer``: verdict, score and
    thresholds (or what to do first), the frame rate and the server's time per frame."""
    if answer.verdict is None:
        head = (f"{answer.message} Meanwhile, frames of good parts can be added to the good "
                f"images (step 1) with the button below.")
    else:
        threshold, defect = answer.thresholds
        head = (f"**{answer.verdict}** · score {answer.score:.4g} (REVIEW above {threshold:.4g}, "
                f"DEFECT above {defect:.4g})")
    rate = f"{answer.fps:.1f} frames/s answered" if answer.fps else "first frame"
    return f"{head} · {rate}, {1000 * answer.seconds:.0f} ms per frame here"


def percent(rate: float) -> str:
    """0.05 -> "5 %"."""
    return f"{100 * rate:g} %"


def budget_dropdown(s):
    """The false-alarm budget control showing the session's budget (a detector file's may be
    none of the usual choices)."""
    budget = s.false_alarm_budget if s.false_alarm_budget is not None else DEFAULT_FALSE_ALARM_BUDGET
    choices = sorted({*FALSE_ALARM_BUDGETS, budget})
    return gr.Dropdown(choices=[(percent(b), b) for b in choices], value=budget)


def threshold_slider(s):
    """The threshold slider over every score in the session; its numbers rounded to its step."""
    lo, hi, step = s.threshold_range()
    digits = max(0, -math.floor(math.log10(step)))
    return gr.Slider(minimum=round(lo, digits), maximum=round(hi, digits), step=step,
                     value=round(s.threshold, digits), interactive=True)


def render(s, alpha, outline, marks=True):
    """Everything in step 3 and 4 drawn from the stored maps at the current threshold; with
    ``marks`` False the marks' summary and ROC (which no threshold changes) are left as shown.
    Thumbnails and photos come from the session's files, drawn once each."""
    if s is None or not s.is_fitted:
        return ("No results yet.", [], [], gr.Dropdown(choices=[], value=None), None,
                "", None, "", [], "", gr.Plot(value=None, visible=False))
    from anomaly.session import false_alarm_words
    from anomaly.viz import OUTLINE_NAMES

    ranked = s.ranked()
    if s.results:
        counts = s.counts()
        summary = (f"**{len(s.results)} image{'s' * (len(s.results) != 1)}: {counts['DEFECT']} "
                   f"DEFECT, {counts['REVIEW']} REVIEW, {counts['OK']} OK** at threshold "
                   f"{s.threshold:.4g} (DEFECT above {s.defect_threshold:.4g}).")
    else:
        summary = "Fitted. Now add test images (step 2)."
    gallery = [(str(s.thumbnail_file(r, alpha)), f"{s.verdict(r)} {r.score:.4g} · {r.name}")
               for r in ranked]                     # no text that a threshold move changes
    SHOWN_GALLERY[s] = gallery
    names = [r.name for r in ranked]
    current = s.current()
    selector = gr.Dropdown(choices=names, value=current.name if current else None)
    if current is not None:
        detail = (str(s.photo_file(current)), str(s.overlay_file(current, alpha, outline)))
        mark = {None: "You have not marked it.", False: "You marked it good.",
                True: "You marked it defect."}[current.label]
        also = (f" (uploaded as {current.uploaded_as}: an earlier image has that name)"
                if current.uploaded_as else "")
        verdict = s.verdict(current)
        detail_text = (f"**{current.name}{also}: {verdict}**. Score {current.score:.4g} "
                       f"({s.norm_score(current):.2f} on the 0–1 scale where the threshold is 0.5); "
                       f"{100 * s.area_above(current):.1f} % of the image is above the threshold "
                       f"({OUTLINE_NAMES[verdict]} outline). {mark}")
    else:
        detail, detail_text = None, ""
    rate = (f"**At this threshold:** {false_alarm_words(s.expected_false_alarm_rate())} "
            f"False-alarm budget: {percent(s.detector.config.false_alarm_budget)}.")
    suggested = [(str(s.thumbnail_file(r, alpha)), f"{s.verdict(r)} {r.score:.4g} · {r.name}")
                 for r in s.suggestions(SUGGESTIONS)]
    head = (summary, s.table(), gallery, selector, detail, detail_text, s.score_figure(), rate,
            suggested)
    if not marks:
        return (*head, gr.skip(), gr.skip())
    labels = s.label_summary()
    if labels is None:
        labels_text = ("Mark at least one image good and one defective to see how well the scores "
                       "separate them.")
        roc = gr.Plot(value=None, visible=False)
    else:
        labels_text = (f"On the {labels.n_good + labels.n_defect} marked images ({labels.n_good} "
                       f"good, {labels.n_defect} defect): **AUROC {labels.auroc:.3f}** (1.0 = the "
                       f"scores separate them perfectly). The threshold that separates them best "
                       f"is **{labels.best_threshold:.4g}**. Images marked good are references "
                       f"now, so their scores are optimistic.")
        roc = gr.Plot(value=s.roc(), visible=True)
    return (*head, labels_text, roc)


# --------------------------------------------------------------------------- handlers

@user_errors
def set_references(session, files, request: gr.Request = None):
    if set(paths(files)) - (session.reference_keys() if session else set()):
        room_for_images()                   # new images to keep; removing some always works
    s = session_for(session, request)
    warn(s.set_references(paths(files)))
    return (s, *reference_views(s))


@user_errors
def fit(session, backbone, parts_turn, small_defects, alpha, outline, progress=gr.Progress(),
        request: gr.Request = None):
    s = session_for(session, request)
    s.fit(backbone, as_progress(progress), parts_turn=bool(parts_turn), small_defects=bool(small_defects))
    return (s, fit_text(s), threshold_slider(s), budget_dropdown(s), *reference_views(s),
            *render(s, alpha, outline))


@user_errors
def inspect_files(session, files, alpha, outline, progress=gr.Progress()):
    s = existing(session)
    room_for_images()
    items = [(p, p) for p in paths(files)]
    _, problems = s.inspect(items, as_progress(progress))
    warn(problems)
    return (threshold_slider(s), *render(s, alpha, outline))


@user_errors
def inspect_photo(session, photo, alpha, outline):
    if photo is None:
        return (gr.skip(),) * (1 + len(VIEW))
    s = existing(session)
    room_for_images()
    _, problems = s.inspect([(s.next_photo_key(), photo)])
    warn(problems)
    return (threshold_slider(s), *render(s, alpha, outline))


@user_errors
def live_frame(session, frame, alpha, outline, request: gr.Request = None):
    """The camera stream: one frame -> (state, overlay, status line); all left as shown while
    the session still answers the previous frame (this one is dropped)."""
    if frame is None:
        return (gr.skip(),) * 3
    s = session_for(session, request)
    answer = s.live_frame(frame, alpha, outline)
    if answer is None:
        return (gr.skip(),) * 3
    return s, answer.overlay, live_text(answer)


@user_errors
def capture_frame(session, alpha, outline):
    s = existing(session)
    room_for_images()
    warn(s.capture())
    return (threshold_slider(s), *render(s, alpha, outline))


@user_errors
def add_camera_reference(session, request: gr.Request = None):
    room_for_images()
    s = session_for(session, request)
    s.add_camera_reference()
    return (s, *reference_views(s))


@user_errors
def remove_camera_references(session, request: gr.Request = None):
    s = session_for(session, request)
    s.remove_camera_references()
    return (s, *reference_views(s))


@user_errors
def clear_results(session, alpha, outline):
    s = existing(session)
    s.clear_results()
    return (threshold_slider(s), *render(s, alpha, outline))


@user_errors
def set_threshold(session, value, alpha, outline):
    s = existing(session)
    shown = SHOWN_GALLERY.get(s)
    s.set_threshold(value)
    view = render(s, alpha, outline, marks=False)
    if view[2] == shown:                     # no verdict changed: the page already shows it
        view = (*view[:2], gr.skip(), *view[3:])
    return view


@user_errors
def reset_threshold(session, alpha, outline):
    s = existing(session)
    s.reset_threshold()
    return (threshold_slider(s), *render(s, alpha, outline))


@user_errors
def set_false_alarm_budget(session, budget, alpha, outline, request: gr.Request = None):
    """The budget control: thresholds for it (kept for the next fit when there is no detector)."""
    s = session_for(session, request)
    s.set_false_alarm_budget(budget)
    slider = threshold_slider(s) if s.is_fitted else gr.skip()
    return (s, fit_text(s), slider, *render(s, alpha, outline))


@user_errors
def set_table_order(session, order, request: gr.Request = None):
    s = session_for(session, request)
    s.set_table_order(order)
    return s, s.table()


@user_errors
def use_suggested_threshold(session, alpha, outline):
    s = existing(session)
    labels = s.label_summary()
    if labels is None:
        raise gr.Error("Mark at least one image good and one defective first.", print_exception=False)
    s.set_threshold(labels.best_threshold)
    return (threshold_slider(s), *render(s, alpha, outline))


@user_errors
def redraw(session, alpha, outline):
    if session is None or not session.is_fitted:
        return (gr.skip(),) * len(VIEW)
    return render(session, alpha, outline, marks=False)


@user_errors
def select_from_gallery(session, alpha, outline, evt: gr.SelectData):
    s = existing(session)
    s.select_ranked(evt.index)
    return render(s, alpha, outline, marks=False)


@user_errors
def select_suggestion(session, alpha, outline, evt: gr.SelectData):
    s = existing(session)
    s.select_suggested(evt.index)
    return render(s, alpha, outline, marks=False)


@user_errors
def select_by_name(session, name, alpha, outline):
    s = existing(session)
    if name:
        s.select(name)
    return render(s, alpha, outline, marks=False)


def mark_handler(label):
    @user_errors
    def mark(session, name, alpha, outline, progress=gr.Progress()):
        s = existing(session)
        if not name:
            raise gr.Error("Select a result first (click it in the gallery).", print_exception=False)
        s.mark(name, label, progress=as_progress(progress))
        return (fit_text(s), threshold_slider(s), *reference_views(s), *render(s, alpha, outline))
    mark.__name__ = {False: "mark_good", True: "mark_defect", None: "clear_mark"}[label]
    return mark


@user_errors
def save_detector(session):
    return str(existing(session).save_detector())


@user_errors
def load_detector(session, file, alpha, outline, request: gr.Request = None):
    if not file:
        return (gr.skip(),) * (4 + len(VIEW))
    s = session_for(session, request)
    s.load_detector(str(file))
    return (s, fit_text(s), threshold_slider(s), budget_dropdown(s), *render(s, alpha, outline))


@user_errors
def export_onnx(session):
    return str(existing(session).export_onnx())


@user_errors
def export_zip(session):
    return str(existing(session).export_zip())


@user_errors
def load_example(session, name, request: gr.Request = None):
    sets = example_sets()
    if name not in sets:
        raise gr.Error(f"No example set named {name!r}; choose one of {sorted(sets)}.",
                       print_exception=False)
    references, tests = sets[name]
    room_for_images()
    s = session_for(session, request)
    warn(s.set_references(references))
    return (s, [str(p) for p in references], [str(p) for p in tests], *reference_views(s))


@user_errors
def score(session, files, detector_file):
    """The scripting API (``api_name="score"``): image files -> (one JSON record per image, the
    heatmap overlays). With a detector file the call is stateless, at the file's thresholds;
    without one it uses this session's fitted detector at its current thresholds and leaves its
    results alone."""
    from anomaly.session import fresh_folder, score_records

    files = paths(files)
    if not files:
        raise gr.Error("Send one or more image files.", print_exception=False)
    if detector_file:
        detector = cached_detector(str(detector_file))
        records = score_records(detector, files, fresh_folder(SCORE_FOLDER))
    else:
        records = existing(session).score_files(files)
    overlays = [r["overlay"] for r in records if r["overlay"]]
    return [{**r, "overlay": r["overlay"] and Path(r["overlay"]).name} for r in records], overlays


def cached_detector(path: str):
    """The PFMDetector in this file, loaded once per distinct content (the last DETECTORS_KEPT)."""
    from anomaly.detector import PFMDetector

    key = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    with DETECTORS_LOCK:
        if key in DETECTORS:
            DETECTORS.move_to_end(key)
            return DETECTORS[key]
    detector = PFMDetector.load(path)
    with DETECTORS_LOCK:
        DETECTORS[key] = detector
        while len(DETECTORS) > DETECTORS_KEPT:
            DETECTORS.popitem(last=False)
    return detector


def reveal():
    return gr.File(visible=True)


def free_session(session, wait: bool = False):
    """gr.State's delete callback (Gradio dropped the tab's state) and the unload handler's
    end: unregister and free the session in a thread of its own, since Gradio may call this
    on its event loop and closing waits for the session's lock (``wait``: join it)."""
    if session is None:
        return
    with OPEN_SESSIONS_LOCK:
        for key in [k for k, s in OPEN_SESSIONS.items() if s is session]:
            del OPEN_SESSIONS[key]

    def close():
        session.close()
        return_freed_memory()
    worker = threading.Thread(target=close, name="free-session", daemon=True)
    worker.start()
    if wait:
        worker.join()


def reap_idle_sessions(now: float | None = None) -> int:
    """Free the sessions unused (no action of any kind) for SESSION_TTL_S -> how many.

    Gradio's own state expiry counts from the last handler that *returned* the state, so an
    engineer who inspects and moves the threshold for two hours would lose the session mid-work;
    this counts from the last use instead (``InspectionSession.touch``)."""
    now = time.monotonic() if now is None else now
    with OPEN_SESSIONS_LOCK:
        idle = [key for key, s in OPEN_SESSIONS.items() if now - s.last_used > SESSION_TTL_S]
        sessions = [OPEN_SESSIONS.pop(key) for key in idle]
    for session in sessions:
        session.close()
    if sessions:
        return_freed_memory()
    return len(sessions)


def _reap_forever():
    while True:
        time.sleep(REAP_EVERY_S)
        try:
            reap_idle_sessions()
        except Exception:  # the reaper must outlive any one failure
            log.exception("freeing idle sessions failed")


def end_session(request: gr.Request):
    """The tab was closed or reloaded (its heartbeat ended): free its session now rather than
    when Gradio drops closed sessions' state (an hour later). A tab that reconnects finds an
    empty session and is asked to fit again."""
    with OPEN_SESSIONS_LOCK:
        session = OPEN_SESSIONS.pop(request.session_hash, None)
        still_open = len(OPEN_SESSIONS)
    if session is not None:
        free_session(session, wait=True)
        log.info("a session ended and was freed; %d still open", still_open)


def return_freed_memory():
    """Collect garbage and hand the allocator's free pages back to the OS (glibc only), so the
    server's memory falls back when sessions end instead of staying at its peak."""
    gc.collect()
    if LIBC is not None:
        LIBC.malloc_trim(0)


# --------------------------------------------------------------------------- layout

with gr.Blocks(title="Few-shot visual inspection", delete_cache=(1800, 3600)) as demo:
    state = gr.State(None, delete_callback=free_session)      # idle expiry: reap_idle_sessions

    gr.Markdown(
        "# Find defects from a few good examples\n"
        "Show the tool a few photos of **good** parts. It learns what normal looks like, then "
        "marks anything unusual in new photos: a heatmap (red = unusual), a score and an "
        "**OK / REVIEW / DEFECT** verdict (REVIEW: a person should look). No photos of defects "
        "are needed, and it runs on a CPU.")
    with gr.Row(equal_height=True):
        example_names = list(example_sets())
        example_choice = gr.Dropdown(example_names, value=example_names[0] if example_names else None,
                                     label="New here? Try an example set", scale=2,
                                     elem_id="example-choice")
        example_btn = gr.Button("Load example and run it", scale=1, elem_id="example-btn")

    gr.Markdown("## 1 · Good images", elem_classes="step-title")
    with gr.Row():
        with gr.Column(scale=1):
            ref_files = gr.File(label="Drop several photos of good parts here (remove with ×)",
                                file_count="multiple", file_types=["image"], height=220,
                                elem_id="ref-files")
            backbone = gr.Dropdown([(BACKBONE_LABELS.get(k, k), k) for k in BACKBONE_PAIRS],
                                   value=DEFAULT_PAIR, label="Feature extractor",
                                   elem_id="backbone")
            with gr.Row():
                parts_turn = gr.Checkbox(False, label=PARTS_TURN_LABEL, elem_id="parts-turn")
                small_defects = gr.Checkbox(False, label=SMALL_DEFECTS_LABEL, elem_id="small-defects")
            fit_btn = gr.Button("Fit detector on these good images", variant="primary",
                                elem_id="fit-btn")
        with gr.Column(scale=2):
            ref_count = gr.Markdown("No good images yet. Upload a few photos of parts "
                                    "**without** defects.", elem_id="ref-count")
            ref_gallery = gr.Gallery(label="Good images", columns=6, height=220,
                                     allow_preview=False, interactive=False, elem_id="ref-gallery")
    fit_md = gr.Markdown("Not fitted yet.", elem_id="fit-summary")
    with gr.Accordion("Continue with a detector saved earlier", open=False):
        detector_upload = gr.File(label="Detector file (.safetensors, from step 5)",
                                  file_types=[".safetensors"], elem_id="detector-upload")

    gr.Markdown("## 2 · Test images", elem_classes="step-title")
    with gr.Tabs():
        with gr.Tab("Photos", elem_id="photos-tab"):
            with gr.Row():
                test_files = gr.File(label="Drop one or many photos to inspect", file_count="multiple",
                                     file_types=["image"], height=180, scale=2, elem_id="test-files")
                photo = gr.Image(label="…or paste one (Ctrl+V) or take it with the webcam",
                                 sources=["clipboard", "webcam"], type="filepath", image_mode=None,
                                 height=180, scale=1, elem_id="test-photo")
            with gr.Row():
                inspect_btn = gr.Button("Inspect", variant="primary", elem_id="inspect-btn")
                clear_btn = gr.Button("Clear results", elem_id="clear-btn")
        with gr.Tab("Live camera", elem_id="live-tab"):      # mounted (camera asked) when opened
            gr.Markdown("Hold parts under the camera and watch the heatmap and verdict, at the "
                        "threshold and opacity of step 3. Frames that arrive while one is being "
                        "scored are skipped, so the answer is always about the latest frame. "
                        f"With other visitors streaming, streams take turns of {LIVE_TURN_S} s "
                        f"({LIVE_STREAMS} at a time).", elem_id="live-help")
            with gr.Row():
                live_camera = gr.Image(label="Camera (click Record to start)", sources=["webcam"],
                                       streaming=True, type="pil", height=360,
                                       webcam_options=gr.WebcamOptions(mirror=False),
                                       elem_id="live-camera")
                live_view = gr.Image(label="Heatmap, live", format="jpeg", interactive=False,
                                     height=360, elem_id="live-view")
            live_md = gr.Markdown("Start the camera: click it, then Record.", elem_id="live-status")
            with gr.Row():
                capture_btn = gr.Button("Capture: add this frame to the results",
                                        variant="primary", elem_id="live-capture")
                camera_ref_btn = gr.Button("Add this frame to the good images (step 1)",
                                           elem_id="live-reference")
                drop_camera_refs_btn = gr.Button("Remove the good images taken with the camera",
                                                 elem_id="live-drop-references")
    gr.Markdown(LIMITS, elem_id="limits")

    gr.Markdown("## 3 · Results", elem_classes="step-title")
    with gr.Row(equal_height=True):
        threshold = gr.Slider(0.0, 1.0, value=0.5, step=0.001, interactive=False, scale=4,
                              label="Threshold: images scoring above it are not OK (REVIEW; "
                                    "DEFECT above the second, stricter threshold)",
                              elem_id="threshold")
        budget = gr.Dropdown([(percent(b), b) for b in FALSE_ALARM_BUDGETS],
                             value=DEFAULT_FALSE_ALARM_BUDGET, scale=1, elem_id="budget",
                             label="False-alarm budget: share of good parts that may be flagged")
        reset_btn = gr.Button("Back to calibrated threshold", scale=1, elem_id="reset-threshold")
    rate_md = gr.Markdown(elem_id="expected-rate")
    summary_md = gr.Markdown("No results yet.", elem_id="results-summary")
    with gr.Row():
        with gr.Column(scale=3):
            results_gallery = gr.Gallery(label="Results, most suspicious first (click one)",
                                         columns=3, height=380, allow_preview=False,
                                         interactive=False, elem_id="results-gallery")
            table_order = gr.Radio(TABLE_ORDER_CHOICES, value="score", label="Sort the table",
                                   elem_id="table-order")
            results_table = gr.Dataframe(headers=["image", "verdict", "score", "score 0-1",
                                                  "your mark"],
                                         datatype=["str", "str", "number", "number", "str"],
                                         interactive=False, label="All results",
                                         max_height=300, elem_id="results-table")
        with gr.Column(scale=4):
            selector = gr.Dropdown(choices=[], label="Selected image", elem_id="selected-image")
            detail = gr.ImageSlider(label="Drag the handle: photo ↔ heatmap", type="pil",
                                    interactive=False, elem_id="detail")
            detail_md = gr.Markdown(elem_id="detail-text")
            with gr.Row():
                alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Heatmap opacity",
                                  elem_id="opacity")
                outline = gr.Checkbox(value=True, label="Outline the region above the threshold "
                                                        "(amber: REVIEW, magenta: DEFECT)",
                                      elem_id="outline")
    gr.Markdown("**Why:** every image's score against the thresholds. Good images (blue) set "
                "them: test images left of the dashed line are OK, in the shaded band REVIEW, "
                "right of the dotted line DEFECT.")
    score_plot = gr.Plot(show_label=False, elem_id="score-plot")

    gr.Markdown("## 4 · Teach it (optional)", elem_classes="step-title")
    gr.Markdown("A verdict is wrong? Select the image above, or one the detector is least sure "
                "about below, and mark it. *Good* adds it to the good images and refits the "
                "detector; *defect* lowers the DEFECT threshold just below the lowest score you "
                "marked defective, so that such parts are DEFECT. With both kinds marked, it "
                "shows how well the scores separate the two and suggests a threshold.")
    suggested_gallery = gr.Gallery(label="Suggested for a label (click one, then mark it)",
                                   columns=SUGGESTIONS, height=200, allow_preview=False,
                                   interactive=False, elem_id="suggested-gallery")
    with gr.Row():
        mark_good_btn = gr.Button("Mark as good (refits)", elem_id="mark-good")
        mark_defect_btn = gr.Button("Mark as defect", elem_id="mark-defect")
        unmark_btn = gr.Button("Remove mark", elem_id="unmark")
        suggest_btn = gr.Button("Use the suggested threshold", elem_id="use-suggested")
    labels_md = gr.Markdown(elem_id="label-summary")
    roc_plot = gr.Plot(show_label=False, visible=False, elem_id="roc-plot")

    gr.Markdown("## 5 · Save and export", elem_classes="step-title")
    with gr.Row():
        with gr.Column():
            save_btn = gr.Button("Download the detector (one file, load it in step 1 later)",
                                 elem_id="save-detector")
            detector_file = gr.File(label="Detector file", interactive=False, visible=False,
                                    elem_id="detector-file")
        with gr.Column():
            onnx_btn = gr.Button("Download for the line (one ONNX file, runs without PyTorch: "
                                 "python -m anomaly.edge)", elem_id="export-onnx")
            onnx_file = gr.File(label="ONNX model", interactive=False, visible=False,
                                elem_id="onnx-file")
        with gr.Column():
            zip_btn = gr.Button("Download results (ZIP: overlays, masks, maps, CSV)",
                                elem_id="export-zip")
            zip_file = gr.File(label="Results ZIP", interactive=False, visible=False,
                               elem_id="zip-file")

    with gr.Row(visible=False):      # the scripting API's own inputs and outputs
        score_images = gr.File(file_count="multiple", label="images")
        score_detector = gr.File(label="detector file (optional)")
        score_records_out = gr.JSON(label="records")
        score_overlays = gr.File(file_count="multiple", label="overlays")
        score_btn = gr.Button("score")

    # ----------------------------------------------------------------------- events
    VIEW = [summary_md, results_table, results_gallery, selector, detail, detail_md, score_plot,
            rate_md, suggested_gallery, labels_md, roc_plot]
    REFS = [ref_gallery, ref_count]
    DRAW = [state, alpha, outline]
    fit_queue = dict(concurrency_limit=FIT_CONCURRENCY, concurrency_id="fit")
    predict_queue = dict(concurrency_limit=PREDICT_CONCURRENCY, concurrency_id="predict")

    ref_files.upload(set_references, [state, ref_files], [state, *REFS], api_name="set_references")
    for event in (ref_files.delete, ref_files.clear):
        event(set_references, [state, ref_files], [state, *REFS], api_visibility="private")
    fitting = [fit_md, ref_gallery]          # where a fit's progress bar shows
    fit_btn.click(fit, [state, backbone, parts_turn, small_defects, alpha, outline],
                  [state, fit_md, threshold, budget, *REFS, *VIEW],
                  api_name="fit", show_progress_on=fitting, **fit_queue)
    inspect_args = dict(fn=inspect_files, inputs=[state, test_files, alpha, outline],
                        outputs=[threshold, *VIEW], show_progress_on=summary_md, **predict_queue)
    test_files.upload(api_visibility="private", **inspect_args)
    inspect_btn.click(api_name="inspect", **inspect_args)
    photo.input(inspect_photo, [state, photo, alpha, outline], [threshold, *VIEW],
                api_name="inspect_photo", show_progress_on=summary_md, **predict_queue)
    clear_btn.click(clear_results, DRAW, [threshold, *VIEW], api_name="clear_results")
    live_camera.stream(live_frame, [state, live_camera, alpha, outline], [state, live_view, live_md],
                       stream_every=LIVE_EVERY_S, time_limit=LIVE_TURN_S, concurrency_limit=LIVE_STREAMS,
                       concurrency_id="live", show_progress="hidden", api_visibility="private")
    capture_btn.click(capture_frame, DRAW, [threshold, *VIEW], api_name="capture_frame",
                      show_progress_on=live_md, **predict_queue)
    camera_ref_btn.click(add_camera_reference, [state], [state, *REFS], api_name="add_camera_reference")
    drop_camera_refs_btn.click(remove_camera_references, [state], [state, *REFS],
                               api_name="remove_camera_references")

    threshold.input(set_threshold, [state, threshold, alpha, outline], VIEW,
                    api_name="set_threshold", trigger_mode="always_last", show_progress="hidden")
    reset_btn.click(reset_threshold, DRAW, [threshold, *VIEW], api_name="reset_threshold")
    budget.input(set_false_alarm_budget, [state, budget, alpha, outline],
                 [state, fit_md, threshold, *VIEW], api_name="set_false_alarm_budget")
    table_order.input(set_table_order, [state, table_order], [state, results_table],
                      api_name="set_table_order")
    suggest_btn.click(use_suggested_threshold, DRAW, [threshold, *VIEW],
                      api_name="use_suggested_threshold")
    for control in (alpha, outline):
        control.input(redraw, DRAW, VIEW, api_visibility="private", trigger_mode="always_last",
                      show_progress="hidden")
    results_gallery.select(select_from_gallery, DRAW, VIEW, api_visibility="private")
    suggested_gallery.select(select_suggestion, DRAW, VIEW, api_visibility="private")
    selector.input(select_by_name, [state, selector, alpha, outline], VIEW, api_name="select")

    for button, label in ((mark_good_btn, False), (mark_defect_btn, True), (unmark_btn, None)):
        handler = mark_handler(label)
        button.click(handler, [state, selector, alpha, outline], [fit_md, threshold, *REFS, *VIEW],
                     api_name=handler.__name__, show_progress_on=fitting, **fit_queue)

    for button, fn, output in ((save_btn, save_detector, detector_file),
                               (onnx_btn, export_onnx, onnx_file),
                               (zip_btn, export_zip, zip_file)):
        (button.click(fn, [state], [output], api_name=fn.__name__)
         .success(reveal, None, [output], api_visibility="private", queue=False))
    detector_upload.upload(load_detector, [state, detector_upload, alpha, outline],
                           [state, fit_md, threshold, budget, *VIEW], api_name="load_detector",
                           show_progress_on=fit_md, **fit_queue)

    (example_btn.click(load_example, [state, example_choice], [state, ref_files, test_files, *REFS],
                       api_name="load_example")
     .success(fit, [state, backbone, parts_turn, small_defects, alpha, outline],
              [state, fit_md, threshold, budget, *REFS, *VIEW],
              api_visibility="private", show_progress_on=fitting, **fit_queue)
     .success(api_visibility="private", **inspect_args))
    score_btn.click(score, [state, score_images, score_detector], [score_records_out, score_overlays],
                    api_name="score", **predict_queue)
    demo.unload(end_session)


# --------------------------------------------------------------------------- launch

def server_address(argv=None, environ=None):
    """(host, port) from --host/--port, else $ANOMALY_HOST/PORT, else $GRADIO_SERVER_NAME/PORT,
    else 127.0.0.1:7860 (local only)."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(description="Few-shot visual inspection app (Gradio).")
    parser.add_argument("--host", help="address to bind; 0.0.0.0 to serve the network "
                                       "(default: $ANOMALY_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: $ANOMALY_PORT or 7860)")
    args = parser.parse_args(argv)
    host = (args.host or environ.get("ANOMALY_HOST") or environ.get("GRADIO_SERVER_NAME")
            or "127.0.0.1")
    port = args.port or int(environ.get("ANOMALY_PORT") or environ.get("GRADIO_SERVER_PORT") or 7860)
    return host, port


def launch(host="127.0.0.1", port=7860, **kwargs):
    """Start the server (queue, limits, allowed paths) -> what ``demo.launch`` returns."""
    demo.queue(default_concurrency_limit=4, max_size=64)
    threading.Thread(target=_reap_forever, name="reap-idle-sessions", daemon=True).start()
    return demo.launch(server_name=host, server_port=port, max_file_size=MAX_FILE_BYTES,
                       allowed_paths=[str(EXAMPLES_DIR)], show_error=False,
                       theme=gr.themes.Soft(), css=CSS, footer_links=["api"], **kwargs)


def preload_models():
    """Import the detection package, load the default backbones and compile what the app's
    default detector runs, in the background, so that the first fit need not."""
    def load():
        try:
            session = importlib.import_module("anomaly.session")     # what the handlers import
            from anomaly.detector import PFMDetector

            PFMDetector(session.detector_config()).warm()
        except Exception:  # the first fit will report it to the user
            log.exception("preloading the %s backbones failed", DEFAULT_PAIR)
    # not a daemon: a process that exits while the thread is inside OpenVINO aborts
    threading.Thread(target=load, name="preload-models").start()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    launch(*server_address(), prevent_thread_lock=True)     # the page is served from here on ...
    preload_models()                                        # ... while the models load
    demo.block_thread()
