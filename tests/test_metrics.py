"""anomaly.metrics: AUROC, AUPRO and F1-max against hand-computed values and brute force."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anomaly.metrics import aupro, f1_max, image_auroc, pixel_auroc

T, F = True, False

# (scores, labels, expected AUROC)
AUROC_CASES = [
    ([0.1, 0.2, 0.8, 0.9], [F, F, T, T], 1.0),        # perfect
    ([0.9, 0.8, 0.2, 0.1], [F, F, T, T], 0.0),        # inverted
    ([0.5, 0.5, 0.5, 0.5], [F, T, F, T], 0.5),        # all tied: each pair counts one half
    ([1, 2, 2, 3], [F, T, F, T], 0.875),              # one tied pair: (1 + 0.5 + 1 + 1) / 4
    ([3, 1, 2], [T, F, F], 1.0),                      # order of the input does not matter
    ([0.3, 0.1, 0.2, 0.4], [F, T, F, T], 0.5),        # 2 of 4 pairs right
]


@pytest.mark.parametrize("scores, labels, expected", AUROC_CASES)
def test_image_auroc_table(scores, labels, expected):
    assert image_auroc(np.array(scores), np.array(labels)) == pytest.approx(expected)


def test_image_auroc_of_random_scores_is_about_one_half():
    rng = np.random.default_rng(0)
    assert image_auroc(rng.random(4000), rng.random(4000) < 0.3) == pytest.approx(0.5, abs=0.03)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=2, max_size=30))
def test_image_auroc_equals_pairwise_definition(pairs):
    scores = np.array([s for s, _ in pairs], float)
    labels = np.array([y for _, y in pairs])
    if labels.all() or not labels.any():
        return
    pos, neg = scores[labels][:, None], scores[~labels][None, :]
    expected = np.mean((pos > neg) + 0.5 * (pos == neg))
    assert image_auroc(scores, labels) == pytest.approx(expected)


def test_pixel_auroc_perfect_inverted_and_without_defects():
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 1:3, 1:3] = True
    assert pixel_auroc(masks.astype(np.float32), masks) == 1.0
    assert pixel_auroc(-masks.astype(np.float32), masks) == 0.0
    assert pixel_auroc(np.random.default_rng(0).random((2, 4, 4)), np.zeros((2, 4, 4), bool)) is None


def _two_regions() -> tuple[np.ndarray, np.ndarray]:
    """One 2x7 image: region A = 1 pixel, region B = 3 pixels (apart), 10 normal pixels."""
    masks = np.zeros((1, 2, 7), bool)
    masks[0, 0, 0] = True                                   # A
    masks[0, 0, 4:7] = True                                 # B
    maps = np.zeros((1, 2, 7))
    maps[0, 0, 0] = 0.9                                     # A found at threshold 0.9
    maps[0, 0, 4:7] = [0.95, 0.5, 0.1]                      # B found a third at a time
    maps[~masks] = [0.8, 0.7, 0.45, 0.35, 0.3, 0.25, 0.2, 0.15, 0.05, 0.0]
    return maps, masks


def test_aupro_hand_computed_two_regions_of_different_sizes():
    # Descending thresholds -> (FPR, PRO = mean of A's and B's overlap):
    # 0.95 -> (0, 1/6); 0.9 -> (0, 2/3); 0.8 -> (0.1, 2/3); 0.7 -> (0.2, 2/3);
    # 0.5 -> (0.2, 5/6); 0.45 -> (0.3, 5/6). Area to 0.3 = 0.2 * 2/3 + 0.1 * 5/6 = 13/60.
    # (Pooling pixels instead of averaging regions would give 0.2 * 3/4 + 0.1 * 1 = 0.25.)
    maps, masks = _two_regions()
    assert aupro(maps, masks) == pytest.approx(13 / 60 / 0.3)
    assert aupro(maps, masks, fpr_limit=0.2) == pytest.approx((0.2 * 2 / 3) / 0.2)
    assert aupro(maps, masks, fpr_limit=0.25) == pytest.approx((0.2 * 2 / 3 + 0.05 * 5 / 6) / 0.25)


def test_aupro_regions_are_8_connected():
    # (0,0)-(0,1) found, (1,2) touches (0,1) diagonally and is missed: one region of 3 -> 2/3
    # (with 4-connectivity it would be two regions, 1 and 0 -> 1/2).
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 0, :2] = masks[0, 1, 2] = True
    maps = np.linspace(0.0, 0.5, 16).reshape(1, 4, 4)
    maps[0, 0, :2], maps[0, 1, 2] = 1.0, -1.0
    assert aupro(maps, masks) == pytest.approx(2 / 3)


def test_aupro_perfect_random_and_without_defects():
    rng = np.random.default_rng(0)
    masks = np.zeros((12, 32, 32), bool)
    masks[:8, 4:12, 4:12] = True
    masks[:8, 20:22, 16:30] = True
    assert aupro(masks.astype(np.float32), masks) == pytest.approx(1.0)
    # Random scores: PRO(fpr) = fpr, so the area to 0.3 is 0.3^2 / 2, normalised 0.15.
    assert aupro(rng.random(masks.shape), masks) == pytest.approx(0.15, abs=0.02)
    assert aupro(rng.random(masks.shape), np.zeros_like(masks)) is None


def _brute_force_aupro(maps, masks, limit=0.3):
    """The MVTec AD definition evaluated at every distinct score, region by region."""
    from scipy import ndimage
    regions = [(i, labels == r) for i, mask in enumerate(masks)
               for labels, n in [ndimage.label(mask, np.ones((3, 3)))] for r in range(1, n + 1)]
    normal = maps[~masks]
    fpr, pro = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fpr.append(np.mean(normal >= t))
        pro.append(np.mean([np.mean(maps[i][region] >= t) for i, region in regions]))
    fpr, pro = np.array(fpr + [1.0]), np.array(pro + [1.0])
    cut = np.interp(limit, fpr, pro)                                     # fpr is sorted
    inside = fpr <= limit
    x, y = np.append(fpr[inside], limit), np.append(pro[inside], cut)
    return np.trapezoid(y, x) / limit


@pytest.mark.parametrize("seed", range(4))
def test_aupro_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 12, 12), bool)
    masks[0, 2:5, 2:9] = masks[1, 8:10, 1:3] = masks[1, 0, 11] = True   # 3 regions of 3 sizes
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    if seed % 2:
        maps = np.round(maps, 1)                                         # many ties
    expected = _brute_force_aupro(maps, masks)
    assert aupro(maps, masks) == pytest.approx(expected)                 # every threshold: exact
    # Few thresholds: off by at most 0.5 / (num_thresholds - 1).
    assert aupro(maps, masks, num_thresholds=11) == pytest.approx(expected, abs=0.05)


# (scores, labels, expected best F1 of "score >= t")
F1_CASES = [
    ([0.1, 0.2, 0.8, 0.9], [F, F, T, T], 1.0),
    ([0.9, 0.8, 0.7, 0.6], [T, F, T, F], 0.8),        # top 3: 2 * 2 / (3 + 2)
    ([0.5, 0.5], [T, F], 2 / 3),                      # ties are cut together
    ([0.9, 0.1], [F, T], 2 / 3),                      # best is calling everything defective
    ([0.3, 0.7], [T, T], 1.0),                        # all defective
]


@pytest.mark.parametrize("scores, labels, expected", F1_CASES)
def test_f1_max_table(scores, labels, expected):
    assert f1_max(np.array(scores), np.array(labels)) == pytest.approx(expected)


MAPS = np.zeros((2, 4, 4))
ERROR_CASES = [
    (image_auroc, ([0.1, 0.2, 0.3], [T, F]), "same shape"),
    (image_auroc, ([[0.1, 0.2]], [[T, F]]), "1 dimensions"),
    (image_auroc, ([0.1, 0.2], [T, T]), "both classes"),
    (image_auroc, ([0.1, 0.2], [F, F]), "both classes"),
    (image_auroc, ([0.1, np.nan], [T, F]), "NaN"),
    (image_auroc, ([0.1, 0.2], [2, 0]), "boolean"),
    (image_auroc, ([], []), "empty"),
    (pixel_auroc, (np.zeros((4, 4)), np.zeros((4, 4), bool)), "3 dimensions"),
    (pixel_auroc, (MAPS, np.zeros((2, 4, 5), bool)), "same shape"),
    (aupro, (MAPS, np.zeros((2, 5, 4), bool)), "same shape"),
    (aupro, (MAPS, np.ones((2, 4, 4), bool)), "normal pixel"),
    (aupro, (MAPS, MAPS > -1, 0.0), "fpr_limit"),
    (f1_max, ([0.1, 0.2], [F, F]), "defective"),
    (f1_max, ([0.1, 0.2], [T]), "same shape"),
]


@pytest.mark.parametrize("fn, args, message", ERROR_CASES)
def test_bad_input_raises_value_error(fn, args, message):
    with pytest.raises(ValueError, match=message):
        fn(*(np.asarray(a) if isinstance(a, list) else a for a in args))
