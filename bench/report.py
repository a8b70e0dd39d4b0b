"""Benchmark results -> markdown tables and the scaling plot (matplotlib, Agg, no pyplot)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .methods import LABELS, METHODS


def markdown(results: dict) -> str:
    """The whole report: machine line, methods table, runtime agreement, targets, speed floor,
    scaling."""
    meta = results["meta"]
    m = meta["machine"]
    parts = [f"Measured {meta['date']} on {m['nproc']} cores ({m['cpu_model']}), torch {m['torch']} "
             f"({m['torch_threads']} threads), OpenVINO {m.get('openvino') or 'not installed'} "
             f"({m.get('precision') or '-'}), anomalib {m['anomalib'] or 'not installed'}; "
             f"load average {_load(m.get('load_average_1_5_15'))} at the start, "
             f"{_load(meta.get('load_average_at_end'))} at the end.",
             methods_table(results["summary"])]
    runtime = meta.get("default_runtime", "torch")
    for other in sorted({s.get("runtime", "torch") for s in results["summary"] if s["method"] == "pfm"} - {"torch"}):
        parts.append(runtime_table(results["summary"], other))
    if results["summary"]:
        parts.append(targets_table(results["summary"], runtime))
    if results["floor"]:
        parts.append(floor_table(results["floor"]))
    if results["scaling"]:
        parts.append(scaling_table(results["scaling"]))
    return "\n\n".join(parts) + "\n"


def methods_table(summary: Sequence[dict]) -> str:
    """Means over seeds per category, shots and method."""
    header = ["category", "shots", "method", "runtime", "seeds", "image AUROC", "pixel AUROC", "AUPRO",
              "fit s", "predict ms", "peak MiB (+RSS)"]
    lines = _header(header)
    for s in summary:
        lines.append(_row([s["category"], s["shots"], LABELS[s["method"]], s.get("runtime", "torch"), s["seeds"],
                           _f(s["image_auroc"], ".3f"), _f(s["pixel_auroc"], ".3f"), _f(s["aupro"], ".3f"),
                           _f(s["fit_seconds"], ".1f"), _f(s["predict_ms"], ".0f"),
                           _f(s["peak_delta_mb"], ".0f")]))
    return "\n".join(lines)


def runtime_table(summary: Sequence[dict], runtime: str) -> str:
    """PFM on ``runtime`` against PFM in PyTorch eager (the reference), same references and
    images: the accuracy must agree, only the time may differ. Rows need both runtimes."""
    header = ["category", "shots", "image AUROC", "pixel AUROC", "AUPRO", "largest difference",
              "fit s", "predict ms"]
    lines = _header(header)
    pfm = {(s["category"], s["shots"], s.get("runtime")): s for s in summary if s["method"] == "pfm"}
    for (category, shots, rt), fast in pfm.items():
        ref = pfm.get((category, shots, "torch"))
        if rt != runtime or ref is None:
            continue
        keys = [k for k in ("image_auroc", "pixel_auroc", "aupro") if fast[k] is not None and ref[k] is not None]
        diff = max((abs(fast[k] - ref[k]) for k in keys), default=None)
        pair = lambda key, spec: f"{_f(fast[key], spec)} / {_f(ref[key], spec)}"
        lines.append(_row([category, shots, pair("image_auroc", ".3f"), pair("pixel_auroc", ".3f"),
                           pair("aupro", ".3f"), _f(diff, ".4f"), pair("fit_seconds", ".1f"),
                           pair("predict_ms", ".0f")]))
    return f"PFM on {runtime} / in PyTorch eager:\n\n" + "\n".join(lines)


def targets_table(summary: Sequence[dict], runtime: str = "torch") -> str:
    """The issue's targets at the largest shot count: PFM against the best baseline, each
    method on ``runtime`` where it ran there (else in PyTorch eager)."""
    shots = max(s["shots"] for s in summary)
    header = ["category", "shots", "image AUROC: PFM vs best baseline", "pixel AUROC: PFM vs best baseline",
              "predict ms: PFM vs PatchCore"]
    lines = _header(header)
    for category in sorted({s["category"] for s in summary}):
        rows = {}
        for s in sorted(summary, key=lambda s: s.get("runtime", "torch") == runtime):   # preferred last
            if s["category"] == category and s["shots"] == shots:
                rows[s["method"]] = s
        pfm = rows.get("pfm")
        if pfm is None:
            continue
        cells = [category, shots]
        for key in ("image_auroc", "pixel_auroc"):
            others = [(r[key], m) for m, r in rows.items() if m != "pfm" and r[key] is not None]
            if pfm[key] is None or not others:
                cells.append("n/a")
                continue
            best, name = max(others)
            mark = "met" if pfm[key] >= best else f"missed by {best - pfm[key]:.3f}"
            cells.append(f"{pfm[key]:.3f} vs {best:.3f} ({LABELS[name]}): {mark}")
        core = rows.get("patchcore")
        if core is None:
            cells.append("n/a")
        else:
            mark = "met" if pfm["predict_ms"] <= core["predict_ms"] else "missed"
            cells.append(f"{pfm['predict_ms']:.0f} vs {core['predict_ms']:.0f}: {mark}")
        lines.append(_row(cells))
    return "\n".join(lines)


def floor_table(floors: Sequence[dict]) -> str:
    header = ["category", "shots", "runtime", "views", "fit floor s", "PFM fit s", "fit ratio",
              "predict floor ms", "PFM predict ms", "predict ratio", "resize ms"]
    lines = _header(header)
    for f in floors:
        lines.append(_row([f["category"], f["shots"], f.get("runtime", "torch"), f["views"], _f(f["fit_floor_seconds"], ".2f"),
                           _f(f["pfm_fit_seconds"], ".2f"), _f(f["fit_ratio"], ".2f"),
                           _f(f["predict_floor_ms"], ".1f"), _f(f["pfm_predict_ms"], ".1f"),
                           _f(f["predict_ratio"], ".2f"), _f(f["resize_ms"], ".1f")]))
    return "\n".join(lines)


def scaling_table(points: Sequence[dict]) -> str:
    header = ["axis", "value", "method", "references", "input px", "fit s", "predict ms",
              "peak MiB (+RSS)", "peak RSS MiB"]
    lines = _header(header)
    for p in points:
        lines.append(_row([p["axis"], p["value"], LABELS[p["method"]], p["shots"], p["image_size"],
                           _f(p["fit_seconds"], ".1f"), _f(p["predict_ms"], ".0f"),
                           _f(p["peak_delta_mb"], ".0f"), _f(p["peak_rss_mb"], ".0f")]))
    return "\n".join(lines)


def scaling_plot(points: Sequence[dict], path: Path) -> Path:
    """Fit s, predict ms and peak MiB against references and input size, one line per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    axes_names = [a for a in ("references", "input size") if any(p["axis"] == a for p in points)]
    fig = Figure(figsize=(12, 3.6 * len(axes_names)), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(len(axes_names), 3, squeeze=False)
    quantities = [("fit_seconds", "fit (s)"), ("predict_ms", "predict, one image (ms)"),
                  ("peak_delta_mb", "peak memory over baseline (MiB)")]
    for row, axis in enumerate(axes_names):
        for col, (key, label) in enumerate(quantities):
            ax = grid[row][col]
            for method in METHODS:
                pts = sorted((p["value"], p[key]) for p in points if p["axis"] == axis and p["method"] == method)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=LABELS[method])
            ax.set_xlabel("references" if axis == "references" else "input side (px)")
            ax.set_ylabel(label)
            if axis == "references":
                ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend()
    fig.suptitle("Scaling on this machine (fresh process per point)")
    fig.savefig(path, dpi=110)
    return path


def _load(values) -> str:
    return "n/a" if not values else "/".join(f"{v:.1f}" for v in values)


def _header(names: Sequence[str]) -> list[str]:
    return ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]


def _row(cells: Sequence) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _f(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
