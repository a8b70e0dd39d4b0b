"""Drawing: heatmap overlays, masks, score and ROC plots as PIL images / matplotlib Figures.

numpy + PIL + matplotlib only (no gradio). Figures are built with ``matplotlib.figure.Figure``
on an Agg canvas, never through pyplot, so several server threads can draw at the same time.
"""
from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageOps

from .calibration import VERDICTS, verdict as verdict_of
from .postprocess import auroc, best_threshold, binary_mask, normalize, region_outline, resize_map, roc_curve

COLORMAP = "jet"                    # blue = normal, red = anomalous; threshold = middle (green)
OUTLINE_COLOUR = (255, 0, 255)      # magenta: not in the colormap and rare in photos
GAP_COLOUR = (255, 255, 255)
REVIEW_LABEL_PX = 48                # the score plot names its REVIEW band when it is this wide
REFERENCE_COLOUR = "tab:blue"
VERDICT_COLOURS = {"OK": "tab:green", "REVIEW": "tab:orange", "DEFECT": "tab:red"}
VERDICT_RGB = {"OK": (44, 160, 44), "REVIEW": (255, 127, 14), "DEFECT": (214, 39, 40)}  # the same
OUTLINE_RGB = {"OK": OUTLINE_COLOUR, "REVIEW": VERDICT_RGB["REVIEW"], "DEFECT": OUTLINE_COLOUR}
OUTLINE_NAMES = {"OK": "magenta", "REVIEW": "amber", "DEFECT": "magenta"}    # for the UI's text
# REVIEW's outline is its amber; DEFECT's stays magenta, since red is the colormap's own top
# (an OK image has a region above the threshold only where its map and score differ by rounding)


def _check_map(anomaly_map) -> np.ndarray:
    amap = np.asarray(anomaly_map, dtype=np.float32)
    if amap.ndim != 2 or 0 in amap.shape:
        raise ValueError(f"anomaly_map must be a non-empty 2-D array (H, W), got shape {amap.shape}")
    if not np.all(np.isfinite(amap)):
        raise ValueError("anomaly_map contains NaN or infinite values")
    return amap


def colour_range(threshold: float, lo: float, hi: float) -> tuple[float, float]:
    """(lo, hi) widened so that lo < threshold < hi, keeping the threshold mid-scale.

    A threshold slider can leave the detector's score range; the colour scale then extends
    by half the old span beyond the threshold instead of collapsing.
    """
    span = (hi - lo) if hi > lo else max(abs(threshold), 1.0)
    if threshold <= lo:
        lo = threshold - span / 2
    if threshold >= hi:
        hi = threshold + span / 2
    return lo, hi


def outline_width(size: tuple[int, int]) -> int:
    """Outline thickness in px for an image of PIL ``size`` (W, H): 2 px at 256, 3 at 512."""
    return max(2, round(min(size) / 160))


def heatmap_overlay(image: Image.Image, anomaly_map, threshold: float, lo: float, hi: float,
                    alpha: float = 0.5, outline: bool = True,
                    outline_colour: tuple[int, int, int] = OUTLINE_COLOUR) -> Image.Image:
    """Photo with the coloured anomaly map blended over it -> RGB image of the photo's size.

    anomaly_map (h, w) in raw score units, resized bilinearly to the photo's (H, W) if needed;
    colours come from ``normalize(map, threshold, lo, hi)`` so the threshold is mid-scale.
    alpha in [0, 1] is the heatmap's opacity. With ``outline``, the boundary of the region
    ``map > threshold`` is drawn in ``outline_colour`` (RGB; the image's verdict's is
    ``OUTLINE_RGB[verdict]``), ``outline_width`` px wide.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = image.convert("RGB")
    amap = resize_map(_check_map(anomaly_map), rgb.size)                  # (H, W)
    norm = normalize(amap, threshold, *colour_range(threshold, lo, hi))     # (H, W) in [0, 1]
    lut = matplotlib.colormaps[COLORMAP](np.linspace(0.0, 1.0, 256), bytes=True)[:, :3]  # (256, 3)
    heat = lut[np.rint(norm * 255.0).astype(np.uint8)].astype(np.float32)   # (H, W, 3)
    photo = np.asarray(rgb, dtype=np.float32)                               # (H, W, 3)
    out = np.rint((1.0 - alpha) * photo + alpha * heat).astype(np.uint8)
    if outline:
        edge = region_outline(binary_mask(amap, threshold), outline_width(rgb.size))
        out[edge] = outline_colour
    return Image.fromarray(out)


def framed(image: Image.Image, verdict: str) -> Image.Image:
    """``image`` in a frame of its verdict's colour (VERDICT_RGB: OK, REVIEW or DEFECT), 1/32
    of its width (>= 4 px)."""
    return ImageOps.expand(image, border=max(4, image.width // 32), fill=VERDICT_RGB[verdict])


def side_by_side(image: Image.Image, overlay: Image.Image) -> Image.Image:
    """Original | overlay, left to right, with a thin white gap; overlay scaled to the image's height."""
    left = image.convert("RGB")
    right = overlay.convert("RGB")
    if right.height != left.height:
        width = max(1, round(right.width * left.height / right.height))
        right = right.resize((width, left.height), Image.BILINEAR)
    gap = max(4, left.width // 64)
    canvas = Image.new("RGB", (left.width + gap + right.width, left.height), GAP_COLOUR)
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + gap, 0))
    return canvas


def mask_image(anomaly_map, threshold: float) -> Image.Image:
    """(H, W) map -> mode "L" image of the same size, 255 where map > threshold, else 0."""
    mask = binary_mask(_check_map(anomaly_map), threshold)
    return Image.fromarray(mask.astype(np.uint8) * 255)


def _new_figure(width_in: float, height_in: float, margins: dict | None = None) -> Figure:
    """A figure on an Agg canvas; laid out by matplotlib's constrained layout, or with fixed
    ``margins`` (subplots_adjust's fractions: a third faster to draw, for figures drawn often)."""
    fig = Figure(figsize=(width_in, height_in), dpi=100, layout=None if margins else "constrained")
    FigureCanvasAgg(fig)                                                    # attaches itself
    if margins:
        fig.subplots_adjust(**margins)
    return fig


def score_plot(reference_scores, test_scores, threshold: float, defect_threshold: float,
               test_labels: Sequence[bool | None] | None = None) -> Figure:
    """Strip plot of image scores against the two thresholds, 750 x 300 px.

    One row for the good references (k >= 1), one row of test scores, split into "marked good",
    "marked defect" and "unmarked" rows when ``test_labels`` (True = defect, None = unmarked)
    is given. Test points are coloured by verdict (``calibration.verdict``): OK up to
    ``threshold`` (dashed line), DEFECT above ``defect_threshold`` (dotted line, >= threshold),
    REVIEW in the shaded band between them.
    """
    refs = np.asarray(reference_scores, dtype=np.float64).ravel()
    tests = np.asarray(test_scores, dtype=np.float64).ravel()
    if test_labels is not None and len(test_labels) != tests.size:
        raise ValueError(f"test_labels has {len(test_labels)} entries for {tests.size} test scores")
    if not (np.all(np.isfinite(refs)) and np.all(np.isfinite(tests))
            and np.isfinite(threshold) and np.isfinite(defect_threshold)):
        raise ValueError("scores and thresholds must be finite numbers")
    if defect_threshold < threshold:
        raise ValueError(f"defect_threshold {defect_threshold} is below threshold {threshold}")

    rows: list[tuple[str, np.ndarray]] = [("good references", refs)]       # top to bottom
    if test_labels is None:
        rows.append(("test images", tests))
    else:
        marks = [None if lab is None else bool(lab) for lab in test_labels]
        for name, want in (("marked good", False), ("marked defect", True), ("unmarked", None)):
            rows.append((name, tests[np.array([m is want for m in marks], dtype=bool)]))
    rows = rows[:1] + [(name, values) for name, values in rows[1:] if values.size]

    fig = _new_figure(7.5, 3.0, margins=dict(left=0.23, right=0.7, bottom=0.16, top=0.96))
    ax = fig.add_subplot()
    jitter = np.random.default_rng(0)                       # same picture for the same scores
    handles = {}
    for y, (name, values) in zip(range(len(rows) - 1, -1, -1), rows):
        ys = y + jitter.uniform(-0.15, 0.15, values.size)
        if name == "good references":
            groups = [("reference (good)", REFERENCE_COLOUR, values, ys)]
        else:
            verdicts = np.array([verdict_of(v, threshold, defect_threshold) for v in values])
            groups = [(f"verdict {v}", VERDICT_COLOURS[v], values[verdicts == v], ys[verdicts == v])
                      for v in VERDICTS]
        for label, colour, xs, yy in groups:
            if xs.size:
                handles[label] = ax.scatter(xs, yy, s=36, color=colour, alpha=0.85, zorder=3,
                                            edgecolors="black", linewidths=0.5)
    handles[f"threshold = {threshold:.3g}"] = ax.axvline(threshold, color="black", linestyle="--",
                                                         linewidth=1.5, zorder=2)
    handles[f"DEFECT threshold = {defect_threshold:.3g}"] = ax.axvline(
        defect_threshold, color="black", linestyle=":", linewidth=1.5, zorder=2)

    everything = np.concatenate([refs, tests, [threshold, defect_threshold]])
    low, high = float(everything.min()), float(everything.max())
    pad = 0.08 * (high - low) if high > low else max(abs(high), 1.0) * 0.1
    ax.set_xlim(low - pad, high + pad)
    if defect_threshold > threshold:
        ax.axvspan(threshold, defect_threshold, color=VERDICT_COLOURS["REVIEW"], alpha=0.12, zorder=1)
        band_px = (defect_threshold - threshold) / (high - low + 2 * pad) * ax.bbox.width
        if band_px >= REVIEW_LABEL_PX:                       # named where the name fits
            ax.annotate("REVIEW", ((threshold + defect_threshold) / 2, 1.0),
                        xycoords=("data", "axes fraction"), xytext=(0, -3),
                        textcoords="offset points", va="top", ha="center", fontsize=9)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_yticks(range(len(rows)), [f"{name} ({values.size})" for name, values in reversed(rows)])
    ax.set_xlabel("anomaly score")
    ax.grid(axis="x", alpha=0.3)
    order = [k for k in ("reference (good)", *(f"verdict {v}" for v in VERDICTS)) if k in handles]
    order += [k for k in handles if k not in order]                        # the thresholds last
    ax.legend([handles[k] for k in order], order, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              fontsize=9, frameon=False)
    return fig


def roc_figure(scores, labels) -> Figure:
    """ROC curve of image scores (N,) vs labels (N,) bool (True = defect), AUROC in the title.

    The point of the best threshold (Youden's J) is marked. Needs both labels present.
    """
    fpr, tpr, _ = roc_curve(scores, labels)
    area = auroc(scores, labels)
    best = best_threshold(scores, labels)
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    best_tpr = float(np.mean(s[y] > best))
    best_fpr = float(np.mean(s[~y] > best))

    fig = _new_figure(4.5, 4.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance")
    ax.plot(fpr, tpr, color=VERDICT_COLOURS["DEFECT"], linewidth=2, label="ROC")
    ax.scatter([best_fpr], [best_tpr], s=60, color="black", zorder=3,
               label=f"best threshold = {best:.3g}")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (good flagged)")
    ax.set_ylabel("true positive rate (defects found)")
    ax.set_title(f"ROC curve, AUROC = {area:.3f} ({int(y.sum())} defect, {int((~y).sum())} good)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    return fig


def figure_to_image(fig: Figure) -> Image.Image:
    """Render a Figure at its own size and dpi -> RGB PIL image."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())                                # (H, W, 4)
    return Image.fromarray(np.ascontiguousarray(rgba[..., :3]))
