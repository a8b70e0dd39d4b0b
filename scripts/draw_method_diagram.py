"""Draw the detector's data flow (docs/method.md) with matplotlib.

    python scripts/draw_method_diagram.py                     # writes docs/method_diagram.png
    python scripts/draw_method_diagram.py --out /tmp/flow.png

Top row: what one prediction computes; bottom row: what a fit learns from the good references
and hands to the prediction (dashed arrows). Nothing is computed: the boxes are text.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PREDICT, FIT, VERDICT = "#dbe7f7", "#f3e6d0", "#e4f2e0"
W, H = 2.3, 1.25                      # a box's width and height, in data units


def box(ax, x, y, text, colour, w=W, h=H, bold=False):
    """A rounded box centred at (x, y) -> its (left, right, bottom, top)."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.04,rounding_size=0.12",
                                facecolor=colour, edgecolor="#444444", linewidth=1.0))
    ax.text(x, y, text, ha="center", va="center", fontsize=8.3, linespacing=1.25,
            fontweight="bold" if bold else "normal")
    return x - w / 2, x + w / 2, y - h / 2, y + h / 2


def arrow(ax, start, end, dashed=False, colour="#333333"):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, linewidth=1.1,
                                 color=colour, linestyle=(0, (4, 3)) if dashed else "-",
                                 shrinkA=2, shrinkB=2))


def draw(out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(16.5, 7.6))
    ax.set_xlim(0, 18.4)
    ax.set_ylim(0, 8.4)
    ax.axis("off")
    ax.text(0.1, 8.2, "Prediction: one image", fontsize=11, fontweight="bold", va="top")
    ax.text(0.1, 3.6, "Fit: k good references (no defect images)", fontsize=11, fontweight="bold", va="top")
    x = [1.25, 3.8, 6.35, 8.95, 11.55, 14.1, 16.75]   # the columns' centres

    # ---------------------------------------------------------------- prediction row
    y1, y_up, y_down = 6.0, 6.95, 5.05
    img = box(ax, x[0], y1, "Image\nany size, RGB\n(path, bytes, PIL, array)", PREDICT)
    rsz = box(ax, x[1], y1, "Resize to S x S\n(S = 320): stretch,\nor pad by mirroring", PREDICT)
    src = box(ax, x[2], y_up, "Source CNN\nEfficientNet-Lite0\nfeatures, strides 4, 8, 16", PREDICT)
    tgt = box(ax, x[2], y_down, "Target CNN\nEfficientNet-Lite1\nfeatures, strides 4, 8, 16", PREDICT)
    pfm = box(ax, x[3], y_up, "PFM mapping nets\nsource <-> target,\nL2-normalised features\n"
                              "-> mapping error", PREDICT, h=1.4)
    knn = box(ax, x[3], y_down, "Patch vectors (strides\n8 + 16, 152 values)\n-> distance to nearest\n"
                                "memory-bank vector", PREDICT, h=1.4)
    comb = box(ax, x[4], y1, "Each map / its scale\n(a good part's level);\n0.3 PFM + 0.7 bank", PREDICT)
    smo = box(ax, x[5], y1, "Gaussian smoothing,\nupsampled to S x S\n(float32)", PREDICT)
    res = box(ax, x[6], y1, "Anomaly map\n(image size or S x S)\nscore = its maximum", PREDICT)

    arrow(ax, (img[1], y1), (rsz[0], y1))
    arrow(ax, (rsz[1], y1 + 0.2), (src[0], y_up))
    arrow(ax, (rsz[1], y1 - 0.2), (tgt[0], y_down))
    arrow(ax, (src[1], y_up), (pfm[0], y_up))
    arrow(ax, (tgt[1], y_down + 0.3), (pfm[0], y_up - 0.5))
    arrow(ax, (src[1], y_up - 0.3), (knn[0], y_down + 0.5))
    arrow(ax, (pfm[1], y_up), (comb[0], y1 + 0.3))
    arrow(ax, (knn[1], y_down), (comb[0], y1 - 0.3))
    arrow(ax, (comb[1], y1), (smo[0], y1))
    arrow(ax, (smo[1], y1), (res[0], y1))

    verdict = box(ax, x[6], 3.95, "Verdict\nOK up to the threshold,\nREVIEW above it, DEFECT\n"
                                  "above the defect threshold", VERDICT, w=2.75, h=1.3)
    arrow(ax, (x[6], res[2]), (x[6], verdict[3]))

    # ---------------------------------------------------------------- fit row
    y2, y_nets, y_bank = 1.85, 2.7, 0.95
    refs = box(ax, x[0], y2, "k good references\n(1-200 in the API,\n64 in the app)", FIT)
    views = box(ax, x[1], y2, "48 augmented views\nflips, rotations (15 deg,\nor 180), small shifts", FIT)
    feats = box(ax, x[2], y2, "Both CNNs, float32\n(frozen ImageNet\nweights)", FIT)
    nets = box(ax, x[3], y_nets, "Train the mapping nets\n100 Adam steps; held-out\nreferences join late", FIT,
               h=1.15)
    bank = box(ax, x[3], y_bank, "Greedy coreset:\n4096 patch vectors\n= the memory bank", FIT, h=1.15)
    calib = box(ax, x[4], y2, "Calibration scores:\nheld-out references'\nviews, every reference\n"
                              "scored leave-one-out", FIT, h=1.45)
    model = box(ax, x[5], y2, "GoodScoreModel\nlog-normal model of\ngood parts' scores", FIT)
    thr = box(ax, x[6], y2, "Thresholds: the budget's\nquantile (5 %); DEFECT\nat 1/10 of that rate",
              FIT, w=2.75, h=1.2)

    arrow(ax, (refs[1], y2), (views[0], y2))
    arrow(ax, (views[1], y2), (feats[0], y2))
    arrow(ax, (feats[1], y2 + 0.3), (nets[0], y_nets))
    arrow(ax, (feats[1], y2 - 0.3), (bank[0], y_bank))
    arrow(ax, (nets[1], y_nets), (calib[0], y2 + 0.4))
    arrow(ax, (bank[1], y_bank), (calib[0], y2 - 0.4))
    arrow(ax, (calib[1], y2), (model[0], y2))
    arrow(ax, (model[1], y2), (thr[0], y2))

    # ---------------------------------------------------------------- what the fit hands over
    handed = "#8a5a00"
    arrow(ax, (x[3], nets[3]), (x[3], knn[2]), dashed=True, colour=handed)
    arrow(ax, (x[4], calib[3]), (x[4], comb[2]), dashed=True, colour=handed)
    arrow(ax, (x[6], thr[3]), (x[6], verdict[2]), dashed=True, colour=handed)
    ax.text(x[3] + 0.12, 3.85, "fitted nets\nand memory bank", fontsize=8, color=handed, ha="left", va="center")
    ax.text(x[4] + 0.12, 4.35, "the maps' scales", fontsize=8, color=handed, ha="left", va="center")
    ax.text(x[6] + 0.12, 2.9, "thresholds", fontsize=8, color=handed, ha="left", va="center")

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "method_diagram.png")
    print(draw(parser.parse_args().out))


if __name__ == "__main__":
    main()
