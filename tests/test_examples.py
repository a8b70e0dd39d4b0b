"""The shipped example sets with the real detector: what a first-time visitor sees after one click.

Every ``defect_*`` test image must be flagged and every ``good_*`` one must pass, with the
default configuration fitted on the set's own references. If this fails after a detector
change, the example defects (scripts/make_assets.py) need to be made clearer, not the test.
"""
import pytest

from anomaly import DetectorConfig, PFMDetector
from anomaly.examples import example_sets

SETS = example_sets()


def test_the_app_has_an_example_set():
    assert SETS, "assets/examples is empty: run python scripts/make_assets.py"


@pytest.mark.slow
@pytest.mark.parametrize("category", sorted(SETS))
def test_example_defects_are_flagged_and_good_images_pass(category):
    references, tests = SETS[category]
    labels = SETS[category].test_labels
    assert None not in labels, "example test images must be named good_* or defect_*"
    assert any(labels) and not all(labels), "an example set needs good and defective test images"

    det = PFMDetector(DetectorConfig())
    det.fit(references)
    preds = det.predict(tests)

    got = {p.name: (pred.pred_score, pred.verdict) for p, pred in zip(tests, preds)}
    wrong = {name: score for (name, (score, verdict)), defect in zip(got.items(), labels)
             if (verdict == "DEFECT") != defect}
    assert not wrong, f"{category}: threshold {det.threshold:.4f}, misjudged {wrong}, all {got}"
