"""anomaly.viz and anomaly.examples: overlays, masks, figures, and the shipped example images."""
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image
from scipy import ndimage

from anomaly.examples import EXAMPLES_DIR, example_label, example_sets
from anomaly.postprocess import region_outline
from anomaly.viz import (OUTLINE_COLOUR, OUTLINE_RGB, VERDICT_RGB, colour_range, figure_to_image, framed,
                         heatmap_overlay, mask_image, outline_width, roc_figure, score_plot, side_by_side)

H, W = 64, 80


def gray_image(value: int = 128) -> Image.Image:
    return Image.new("RGB", (W, H), (value, value, value))


def square_map(top=20, left=30, side=16, inside=2.0, outside=0.2) -> np.ndarray:
    amap = np.full((H, W), outside, np.float32)
    amap[top:top + side, left:left + side] = inside
    return amap


def test_viz_never_imports_gradio():
    code = "import sys, anomaly.viz, anomaly.session; assert 'gradio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_overlay_keeps_size_and_mode():
    out = heatmap_overlay(Image.new("L", (W, H), 90), square_map(), 1.0, 0.0, 2.0)
    assert out.mode == "RGB" and out.size == (W, H)


def test_overlay_resizes_a_map_of_another_size():
    out = heatmap_overlay(gray_image(), np.zeros((16, 16), np.float32), 1.0, 0.0, 2.0)
    assert out.size == (W, H)


def test_alpha_zero_keeps_the_image_except_the_outline():
    image = gray_image()
    amap = square_map()
    out = np.asarray(heatmap_overlay(image, amap, 1.0, 0.0, 2.0, alpha=0.0))
    changed = np.any(out != np.asarray(image), axis=-1)
    band = region_outline(amap > 1.0, outline_width((W, H)))
    assert band.any()
    assert np.array_equal(changed, band)                        # exactly the outline, nothing else
    assert (out[band] == OUTLINE_COLOUR).all()


def test_outline_hugs_the_region_boundary():
    amap = square_map()
    out = np.asarray(heatmap_overlay(gray_image(), amap, 1.0, 0.0, 2.0, alpha=0.3))
    drawn = np.all(out == OUTLINE_COLOUR, axis=-1)
    region = amap > 1.0
    edge = region & ~ndimage.binary_erosion(region)
    near = ndimage.binary_dilation(edge, np.ones((3, 3), bool), iterations=outline_width((W, H)))
    assert drawn[edge].all() and not drawn[~near].any()


def test_no_outline_when_the_map_is_all_below_threshold():
    image = gray_image()
    out = heatmap_overlay(image, np.full((H, W), 0.9, np.float32), 1.0, 0.0, 2.0, alpha=0.0)
    assert np.array_equal(np.asarray(out), np.asarray(image))


def test_outline_in_the_verdicts_colour():
    amap = square_map()
    out = np.asarray(heatmap_overlay(gray_image(), amap, 1.0, 0.0, 2.0, alpha=0.0,
                                     outline_colour=OUTLINE_RGB["REVIEW"]))
    band = region_outline(amap > 1.0, outline_width((W, H)))
    assert (out[band] == VERDICT_RGB["REVIEW"]).all() and OUTLINE_RGB["DEFECT"] == OUTLINE_COLOUR
    assert len({*OUTLINE_RGB.values()}) == 2                   # REVIEW stands apart from DEFECT


@pytest.mark.parametrize("verdict", ["OK", "REVIEW", "DEFECT"])
def test_framed_in_the_verdicts_colour(verdict):
    out = framed(gray_image(), verdict)
    assert out.getpixel((0, 0)) == VERDICT_RGB[verdict] and out.width > W
    assert len(set(VERDICT_RGB.values())) == 3


def test_outline_flag_off_draws_nothing():
    image = gray_image()
    out = heatmap_overlay(image, square_map(), 1.0, 0.0, 2.0, alpha=0.0, outline=False)
    assert np.array_equal(np.asarray(out), np.asarray(image))


def test_heat_colours_follow_the_normalised_map():
    out = np.asarray(heatmap_overlay(gray_image(), square_map(), 1.0, 0.0, 2.0, alpha=1.0,
                                     outline=False)).astype(int)
    hot, cold = out[27, 37], out[5, 5]                          # inside / far outside the square
    assert hot[0] > hot[2] and cold[2] > cold[0]                # red vs blue in "jet"


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_overlay_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        heatmap_overlay(gray_image(), square_map(), 1.0, 0.0, 2.0, alpha=alpha)


def test_side_by_side_places_both_with_a_gap():
    left, right = gray_image(10), gray_image(240)
    out = side_by_side(left, right)
    assert out.height == H and out.width > 2 * W
    arr = np.asarray(out)
    assert (arr[:, :W] == 10).all() and (arr[:, -W:] == 240).all()


def test_mask_image_is_255_exactly_above_threshold():
    amap = square_map()
    mask = mask_image(amap, 1.0)
    assert mask.mode == "L" and mask.size == (W, H)
    assert np.array_equal(np.asarray(mask) == 255, amap > 1.0)
    assert set(np.unique(np.asarray(mask))) == {0, 255}


@pytest.mark.parametrize("refs, tests, labels, defect", [
    ([0.4], [], None, 0.45),                                    # k = 1, nothing tested yet
    ([0.4], [0.3, 0.9], None, 0.6),
    ([0.3, 0.35, 0.41], [0.2, 0.5, 0.9], [False, True, True], 0.7),
    ([0.5] * 3, [0.5], None, 0.45),                             # all equal scores, no band
    ([0.4], [0.3], None, 3.0),                                  # the DEFECT line far beyond
])
def test_score_plot_renders(refs, tests, labels, defect):
    fig = score_plot(refs, tests, 0.45, defect, test_labels=labels)
    assert isinstance(fig, Figure)
    image = figure_to_image(fig)
    assert image.mode == "RGB" and image.height == 300 and image.width == 750
    ax = fig.axes[0]
    assert ax.get_xlabel() == "anomaly score"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "threshold = 0.45" in legend and f"DEFECT threshold = {defect:.3g}" in legend
    low, high = ax.get_xlim()
    assert low < min(refs + tests + [0.45]) and high > max(refs + tests + [defect])


def test_score_plot_colours_test_points_by_the_three_verdicts():
    fig = score_plot([0.4, 0.5], [0.3, 0.6, 0.9], 0.55, 0.8)
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:4] == ["reference (good)", "verdict OK", "verdict REVIEW", "verdict DEFECT"]
    points = {tuple(np.round(c.get_facecolor()[0][:3], 3)): c.get_offsets()[:, 0].tolist()
              for c in ax.collections if len(c.get_offsets())}
    orange = tuple(np.round(np.array(VERDICT_RGB["REVIEW"]) / 255, 3))
    assert points[orange] == [0.6]
    assert any(t.get_text() == "REVIEW" for t in ax.texts)      # the band is named


def test_score_plot_accepts_unmarked_tests():
    fig = score_plot([0.4, 0.5], [0.3, 0.9, 0.6], 0.55, 0.7, test_labels=[False, True, None])
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert any("unmarked" in t for t in labels)


@pytest.mark.parametrize("refs, tests, labels, defect, match", [
    ([0.1], [0.2, 0.3], [True], 0.6, "test_labels"),
    ([float("nan")], [], None, 0.6, "finite"),
    ([0.1], [], None, float("inf"), "finite"),
    ([0.1], [], None, 0.4, "below threshold"),
])
def test_score_plot_checks_its_input(refs, tests, labels, defect, match):
    with pytest.raises(ValueError, match=match):
        score_plot(refs, tests, 0.5, defect, test_labels=labels)


# (threshold, lo, hi) -> widened range keeps lo < threshold < hi
@pytest.mark.parametrize("threshold, lo, hi", [(1.0, 0.0, 2.0), (3.0, 0.0, 2.0), (-1.0, 0.0, 2.0),
                                               (0.5, 0.5, 0.5)])
def test_colour_range_keeps_the_threshold_inside(threshold, lo, hi):
    new_lo, new_hi = colour_range(threshold, lo, hi)
    assert new_lo < threshold < new_hi
    if lo < threshold < hi:
        assert (new_lo, new_hi) == (lo, hi)


def test_overlay_with_a_threshold_outside_the_score_range():
    out = heatmap_overlay(gray_image(), square_map(), 5.0, 0.0, 2.0)   # slider beyond hi
    assert out.size == (W, H)


def test_roc_figure_shows_auroc():
    fig = roc_figure([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    assert "AUROC = 1.000" in fig.axes[0].get_title()
    assert figure_to_image(fig).mode == "RGB"


def test_example_sets_find_every_shipped_image():
    sets = example_sets()
    assert "brick_wall" in sets
    for name, (references, tests) in sets.items():
        assert len(references) >= 1, name
        labels = sets[name].test_labels
        assert labels == [example_label(p) for p in tests]
        assert True in labels and False in labels, name       # both kinds to try
        assert None not in labels, name
        for path in references + tests:
            with Image.open(path) as im:
                im.verify()
            with Image.open(path) as im:
                assert im.mode == "RGB" and max(im.size) <= 256, path
    total = sum(p.stat().st_size for p in EXAMPLES_DIR.rglob("*") if p.is_file())
    assert total < 3_000_000


def test_example_sets_of_a_missing_folder_is_empty(tmp_path):
    assert example_sets(tmp_path / "nowhere") == {}
