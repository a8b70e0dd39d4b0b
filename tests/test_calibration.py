"""The good-score model: thresholds for a false-alarm budget, the expected rate of a threshold,
and the one verdict rule."""
import math

import numpy as np
import pytest

from anomaly.calibration import VERDICTS, GoodScoreModel, verdict


def model(n_views=18, n_refs=8, references=8, seed=0, sd=0.1):
    rng = np.random.default_rng(seed)
    return GoodScoreModel.fit(np.exp(rng.normal(0.4, sd, n_views)), np.exp(rng.normal(0.4, sd, n_refs)),
                              references, view_groups=3)


@pytest.mark.parametrize("rate", [0.001, 0.01, 0.05, 0.2])
def test_the_threshold_for_a_rate_is_expected_to_flag_that_rate(rate):
    m = model()
    assert m.false_alarm_rate(m.threshold_for(rate)) == pytest.approx(rate, rel=1e-9)


def test_the_expected_rate_falls_as_the_threshold_rises():
    m = model()
    thresholds = np.linspace(1.0, 3.0, 50)
    rates = m.false_alarm_rate(thresholds)
    assert rates.shape == (50,) and np.all(np.diff(rates) < 0)
    assert m.false_alarm_rate(0.0) == pytest.approx(1.0) and m.false_alarm_rate(1e6) < 1e-9


def test_the_model_matches_a_large_log_normal_sample():
    """With many references the estimate is the distribution's own quantile."""
    rng = np.random.default_rng(1)
    m = GoodScoreModel.fit(np.exp(rng.normal(0.5, 0.2, 4000)), np.exp(rng.normal(0.5, 0.2, 4000)), 4000,
                           view_groups=4000)
    assert m.threshold_for(0.05) == pytest.approx(math.exp(0.5 + 0.2 * 1.6449), rel=0.01)


def test_references_that_differ_more_than_their_views_widen_the_spread():
    """The same tight views, but leave-one-out scores of the references far apart: the spread
    between images counts, not only the pooled one."""
    rng = np.random.default_rng(2)
    views = np.exp(0.4 + rng.normal(0, 0.01, 18))
    close = GoodScoreModel.fit(views, np.exp(np.linspace(0.38, 0.42, 8)), 8, view_groups=3)
    apart = GoodScoreModel.fit(views, np.exp(np.linspace(0.1, 0.7, 8)), 8, view_groups=3)
    assert apart.log_sd > 1.5 * close.log_sd


def test_with_one_reference_the_spread_is_the_prior():
    from anomaly.calibration import PRIOR_LOG_SD
    m = GoodScoreModel.fit(np.exp(np.full(8, 0.3)), [], 1)
    assert m.log_mean == pytest.approx(0.3) and m.log_sd == pytest.approx(PRIOR_LOG_SD * math.sqrt(2))


def test_fewer_references_give_a_more_cautious_threshold():
    """The same spread of scores from fewer images: a wider predictive tail."""
    few, many = model(references=2), model(references=32)
    assert few.threshold_for(0.05) > many.threshold_for(0.05)
    assert few.false_alarm_rate(many.threshold_for(0.05)) > 0.05


def test_identical_scores_still_give_a_usable_spread():
    m = GoodScoreModel.fit([1.5] * 6, [1.5, 1.5], 2, view_groups=1)
    assert m.log_sd > 0 and m.threshold_for(0.05) > 1.5


def test_views_must_split_into_their_groups():
    with pytest.raises(ValueError, match="groups"):
        GoodScoreModel.fit([1.0] * 7, [], 3, view_groups=2)


@pytest.mark.parametrize("scores", [[], [0.0, 1.0], [1.0, float("nan")], [-1.0]])
def test_unusable_calibration_scores_are_refused(scores):
    with pytest.raises(ValueError, match="positive, finite"):
        GoodScoreModel.fit(scores, [], 3)


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1, 2.0])
def test_a_rate_outside_0_1_is_refused(rate):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        model().threshold_for(rate)


def test_the_model_round_trips_through_an_array():
    m = model()
    assert GoodScoreModel.from_array(m.as_array()) == m
    for bad in ([0.0, -1.0], [0.0, 0.1, 3.0], [float("nan"), 0.1]):
        with pytest.raises(ValueError, match="not a good-score model"):
            GoodScoreModel.from_array(bad)


def test_the_verdict_rule_has_three_bands():
    assert VERDICTS == ("OK", "REVIEW", "DEFECT")
    assert [verdict(s, 1.0, 2.0) for s in (0.5, 1.0, 1.5, 2.0, 2.5)] == ["OK", "OK", "REVIEW", "REVIEW", "DEFECT"]
    assert [verdict(s, 1.0, 1.0) for s in (1.0, 1.01)] == ["OK", "DEFECT"]      # an empty band
