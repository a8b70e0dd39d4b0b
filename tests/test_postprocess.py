"""anomaly.postprocess: normalisation, masks, outlines, ROC and thresholds on tiny inputs."""
import numpy as np
import pytest

from anomaly.calibration import verdict
from anomaly.postprocess import (auroc, best_threshold, binary_mask, normalize, region_outline, roc_curve,
                                 thresholds_with_labels)

# (x, threshold, lo, hi, expected)
NORMALIZE_CASES = [
    (0.0, 1.0, 0.0, 2.0, 0.0),        # lo -> 0
    (1.0, 1.0, 0.0, 2.0, 0.5),        # threshold -> 0.5
    (2.0, 1.0, 0.0, 2.0, 1.0),        # hi -> 1
    (0.5, 1.0, 0.0, 2.0, 0.25),       # linear below the threshold
    (1.5, 1.0, 0.0, 3.0, 0.625),      # linear above, with its own slope
    (-5.0, 1.0, 0.0, 2.0, 0.0),       # clipped below lo
    (9.0, 1.0, 0.0, 2.0, 1.0),        # clipped above hi
    (0.2, 0.5, 0.5, 1.0, 0.0),        # lo == threshold: below -> 0
    (0.5, 0.5, 0.5, 0.5, 0.5),        # all equal: the threshold itself -> 0.5
    (0.7, 0.5, 0.5, 0.5, 1.0),        # all equal: above -> 1
]


@pytest.mark.parametrize("x, threshold, lo, hi, expected", NORMALIZE_CASES)
def test_normalize_table(x, threshold, lo, hi, expected):
    out = normalize(x, threshold, lo, hi)
    assert isinstance(out, float)
    assert out == pytest.approx(expected)


def test_normalize_arrays_keep_shape_and_float_dtype():
    x = np.linspace(-1, 4, 24, dtype=np.float32).reshape(2, 3, 4)
    out = normalize(x, 1.0, 0.0, 2.0)
    assert out.shape == x.shape and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    assert normalize(np.array([0, 1, 2]), 1.0, 0.0, 2.0).dtype == np.float64   # ints -> float


def test_normalize_is_monotonic():
    x = np.linspace(-3, 10, 500)
    assert np.all(np.diff(normalize(x, 2.0, 0.5, 7.0)) >= 0)


@pytest.mark.parametrize("threshold, lo, hi", [(1.0, 2.0, 3.0), (3.0, 0.0, 2.0), (float("nan"), 0.0, 1.0)])
def test_normalize_rejects_bad_ranges(threshold, lo, hi):
    with pytest.raises(ValueError, match="threshold"):
        normalize(0.5, threshold, lo, hi)


def test_binary_mask_is_strictly_above():
    amap = np.array([[0.1, 0.5], [0.51, 0.9]])
    assert binary_mask(amap, 0.5).tolist() == [[False, False], [True, True]]


# (mask rows, expected outline rows)
OUTLINE_CASES = [
    (["00000", "01110", "01110", "01110", "00000"], ["00000", "01110", "01010", "01110", "00000"]),
    (["000", "010", "000"], ["000", "010", "000"]),                       # single pixel
    (["111", "111", "111"], ["111", "101", "111"]),                       # touches the border
    (["000", "000", "000"], ["000", "000", "000"]),                       # empty
]


@pytest.mark.parametrize("rows, expected", OUTLINE_CASES)
def test_region_outline_table(rows, expected):
    mask = np.array([[c == "1" for c in r] for r in rows])
    want = np.array([[c == "1" for c in r] for r in expected])
    assert np.array_equal(region_outline(mask), want)


def test_region_outline_rejects_3d():
    with pytest.raises(ValueError, match="2-D"):
        region_outline(np.zeros((2, 2, 2), bool))


# (scores, labels, threshold must lie strictly between these)
SEPARABLE_CASES = [
    ([0.1, 0.2, 0.3, 0.9, 1.0], [0, 0, 0, 1, 1], (0.3, 0.9)),
    ([5.0, 1.0, 4.0, 2.0], [1, 0, 1, 0], (2.0, 4.0)),                    # unsorted
    ([1.0, 2.0], [0, 1], (1.0, 2.0)),                                     # one of each
    ([1.0, 1.0, 1.0, 3.0], [0, 0, 0, 1], (1.0, 3.0)),                     # tied good scores
]


@pytest.mark.parametrize("scores, labels, between", SEPARABLE_CASES)
def test_best_threshold_separates_a_separable_set(scores, labels, between):
    t = best_threshold(scores, labels)
    assert between[0] < t < between[1]
    assert t == pytest.approx(sum(between) / 2)                           # the midpoint
    assert auroc(scores, labels) == 1.0


def test_best_threshold_with_overlap_maximises_youden():
    scores = np.array([0.1, 0.2, 0.35, 0.4, 0.5, 0.6, 0.8])
    labels = np.array([0, 0, 1, 0, 1, 1, 1], bool)
    t = best_threshold(scores, labels)
    j = lambda thr: (scores[labels] > thr).mean() - (scores[~labels] > thr).mean()
    assert j(t) == max(j(s - 1e-9) for s in scores)


def test_best_threshold_is_never_negative_for_anomaly_scores():
    t = best_threshold([0.01, 0.9], [1, 0])           # reversed: calling everything defect wins
    assert 0.0 <= t < 0.01
    assert best_threshold([0.0, 0.9], [1, 0]) == 0.0


def test_roc_curve_and_auroc_with_ties():
    fpr, tpr, thr = roc_curve([0.5, 0.5, 0.1, 0.9], [0, 1, 0, 1])
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.isinf(thr[0]) and len(fpr) == len(thr) == 4                # 3 distinct scores + origin
    assert auroc([0.5, 0.5], [0, 1]) == 0.5                               # a tie counts half
    assert auroc([0.9, 0.1], [0, 1]) == 0.0


@pytest.mark.parametrize("scores, labels, match", [
    ([1.0, 2.0], [0, 0], "both"),
    ([1.0, 2.0], [0, 1, 1], "length"),
    ([1.0, float("nan")], [0, 1], "finite"),
])
def test_threshold_inputs_are_checked(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        best_threshold(scores, labels)


# (width, px of the band inside the region, px outside it) for a 5 x 5 square
@pytest.mark.parametrize("width, inside, outside", [(1, 1, 0), (2, 1, 1), (3, 2, 1), (4, 2, 2)])
def test_region_outline_width_straddles_the_boundary(width, inside, outside):
    mask = np.zeros((15, 15), bool)
    mask[5:10, 5:10] = True
    band = region_outline(mask, width)
    row = band[7]                                   # the middle row crosses both edges
    assert row[5 - outside:5 + inside].all() and not row[:5 - outside].any()
    assert not row[5 + inside:10 - inside].any()
    assert row[10 - inside:10 + outside].all() and not row[10 + outside:].any()


@pytest.mark.parametrize("width", [0, -1, 1.5, True])
def test_region_outline_rejects_bad_width(width):
    with pytest.raises(ValueError, match="width"):
        region_outline(np.ones((3, 3), bool), width)


# (threshold, defect_threshold, good scores, defect scores) -> (threshold, defect_threshold);
# "s-" is just below the score s
LABEL_CASES = [
    ((1.0, 2.0, [], []), (1.0, 2.0)),                     # no marks: nothing moves
    ((1.0, 2.0, [0.5], []), (1.0, 2.0)),                  # good marks alone move nothing
    ((1.0, 2.0, [], [2.5]), (1.0, 2.0)),                  # already DEFECT: nothing moves
    ((1.0, 2.0, [0.7], [1.6, 1.3]), (1.0, "1.3-")),       # the lowest defective score decides
    ((1.0, 2.0, [], [0.6]), ("0.6-", "0.6-")),            # below the OK boundary: both follow
    ((1.0, 2.0, [1.2], [0.8]), (1.0, 1.2)),               # overlap: the good one is not DEFECT
    ((1.0, 2.0, [2.4], [1.5]), (1.0, 2.0)),               # ... and the boundary never goes up
    ((1.0, 2.0, [], [2.0]), (1.0, "2.0-")),               # at the boundary: moves below it
]


@pytest.mark.parametrize("args, expected", LABEL_CASES)
def test_thresholds_with_labels(args, expected):
    got = thresholds_with_labels(*args)
    for value, want in zip(got, expected):
        if isinstance(want, str):
            score = float(want[:-1])
            assert score * (1 - 1e-5) < value < score
            assert np.float32(value) < np.float32(score)          # survives rounding to float32
        else:
            assert value == want
    threshold, defect = got
    goods, defects = args[2:]
    assert threshold <= defect
    if defects and min(defects) > max(goods, default=0.0):       # the marks can be honoured
        assert {verdict(s, threshold, defect) for s in defects} == {"DEFECT"}
