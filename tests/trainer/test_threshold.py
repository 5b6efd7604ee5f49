"""The sampling-threshold sweep and the calibration figures on held-out sets with known scores, checked
against counts worked out by hand (trainer/threshold.py, trainer/calibration.py: pure, no TensorFlow)."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.calibration import reliability
from trainer.threshold import analyse, point, resolve, sweep, wilson

# Ten held-out frames of a 3-class model: (scores, true class). Wrong: frames 2, 4, 6 and 8 (4 errors).
#            top   margin  normalized entropy (edge.inference.normalized_entropy)
FRAMES = [
    ([0.95, 0.03, 0.02], 0),  # 0.95  0.92  0.2113  right
    ([0.90, 0.05, 0.05], 0),  # 0.90  0.85  0.3590  right
    ([0.85, 0.10, 0.05], 1),  # 0.85  0.75  0.4717  WRONG
    ([0.70, 0.20, 0.10], 0),  # 0.70  0.50  0.7298  right
    ([0.60, 0.30, 0.10], 1),  # 0.60  0.30  0.8173  WRONG
    ([0.55, 0.40, 0.05], 0),  # 0.55  0.15  0.7693  right
    ([0.50, 0.45, 0.05], 1),  # 0.50  0.05  0.7789  WRONG
    ([0.45, 0.35, 0.20], 0),  # 0.45  0.10  0.9545  right
    ([0.40, 0.35, 0.25], 2),  # 0.40  0.05  0.9835  WRONG
    ([0.98, 0.01, 0.01], 0),  # 0.98  0.97  0.1019  right
]
SCORES = np.array([s for s, _ in FRAMES], np.float32)   # float32: what the device's runtime returns
LABELS = np.array([y for _, y in FRAMES])


def _at(points, t):  # noqa: ANN001, ANN202
    return next(p for p in points if p["threshold"] == t)


def test_sweep_counts_are_the_hand_computed_ones():
    res = analyse(SCORES, LABELS, target=0.8)
    assert res["n"] == 10 and res["n_errors"] == 4 and res["frames"]["error"] == [i in (2, 4, 6, 8) for i in range(10)]
    conf = res["rules"]["confidence"]["points"]
    # confidence: sent when top < t
    assert _at(conf, 0.4) == {"threshold": 0.4, "sent": 0, "caught": 0}        # 0.40 is not below 0.40
    assert _at(conf, 0.41) == {"threshold": 0.41, "sent": 1, "caught": 1}      # frame 8
    assert _at(conf, 0.5) == {"threshold": 0.5, "sent": 2, "caught": 1}        # frames 7, 8
    assert _at(conf, 0.61) == {"threshold": 0.61, "sent": 5, "caught": 3}      # frames 4..8
    assert _at(conf, 0.86) == {"threshold": 0.86, "sent": 7, "caught": 4}      # frames 2..8
    assert _at(conf, 1.0) == {"threshold": 1.0, "sent": 10, "caught": 4}
    margin = res["rules"]["margin"]["points"]
    assert _at(margin, 0.06) == {"threshold": 0.06, "sent": 2, "caught": 2}    # frames 6, 8 (margin 0.05)
    assert _at(margin, 0.76) == {"threshold": 0.76, "sent": 7, "caught": 4}    # frames 2..8
    entropy = res["rules"]["entropy"]["points"]                                 # sent when entropy > t
    assert _at(entropy, 0.97) == {"threshold": 0.97, "sent": 1, "caught": 1}   # frame 8
    assert _at(entropy, 0.77) == {"threshold": 0.77, "sent": 4, "caught": 3}   # frames 4, 6, 7, 8
    assert _at(entropy, 0.47) == {"threshold": 0.47, "sent": 7, "caught": 4}   # frames 2..8


@pytest.mark.parametrize("target, rule, threshold, sent, caught", [
    # 80 % of 4 errors = 3.2: all four. Confidence must exceed frame 2's 0.85 -> 0.86, sending 7 of 10.
    (0.8, "confidence", 0.86, 7, 4),
    (0.8, "margin", 0.76, 7, 4),       # must exceed frame 2's margin 0.75
    (0.8, "entropy", 0.47, 7, 4),      # must stay below frame 2's entropy 0.4717
    # 75 %: three of four. Confidence above frame 4's 0.60 (0.61, 5 frames); entropy below frame 6's 0.7789
    # (0.77: 4 frames, so at this share the entropy rule sends fewer frames for the same errors).
    (0.75, "confidence", 0.61, 5, 3),
    (0.75, "entropy", 0.77, 4, 3),
    (0.5, "confidence", 0.51, 3, 2),   # frames 6, 7, 8
    (0.5, "margin", 0.06, 2, 2),
])
def test_choice_is_the_fewest_frames_that_catch_the_share(target, rule, threshold, sent, caught):  # noqa: ANN001
    ch = analyse(SCORES, LABELS, target=target)["rules"][rule]["chosen"]
    assert (ch["threshold"], ch["sent"], ch["caught"], ch["target_met"]) == (threshold, sent, caught, True)
    assert ch["sent_share"] == pytest.approx(sent / 10) and ch["caught_share"] == pytest.approx(caught / 4)
    lo, hi = ch["sent_ci"]
    assert lo < sent / 10 < hi


@pytest.mark.parametrize("target, caught", [
    # 80 %: the choice needs all four errors (0.86). Left out in turn, each is caught by the threshold the
    # other three give, except frame 2 (0.85): without it the choice is 0.61. So 3 of 4 on new frames.
    (0.8, 3),
    # 50 %: two of four (0.51). Without frame 6 or 8 the choice rises to 0.61 and catches it; without frame 2
    # or 4 it stays 0.51 and misses them: 2 of 4.
    (0.5, 2),
])
def test_expected_share_on_new_frames_is_leave_one_out(target, caught):  # noqa: ANN001
    ch = analyse(SCORES, LABELS, target=target)["rules"]["confidence"]["chosen"]
    assert ch["expected"]["caught"] == caught and ch["expected"]["n_errors"] == 4
    assert ch["expected"]["caught_share"] <= ch["caught_share"]       # the held-out figure is the optimistic one


def test_the_confidence_choice_becomes_the_default_and_a_configured_threshold_wins():
    res = analyse(SCORES, LABELS, target=0.8)
    assert res["chosen"] == 0.86
    data = resolve(res, None)
    assert (data["source"], data["threshold"], data["sent"], data["caught"]) == ("data", 0.86, 7, 4)
    assert data["expected"]["caught"] == 3                            # leave-one-out, for the data's choice
    cfg = resolve(res, 0.5)          # [gate] default_threshold set: it wins, and is placed on the same curve
    assert (cfg["source"], cfg["threshold"], cfg["sent"], cfg["caught"]) == ("config", 0.5, 2, 1)
    assert cfg["caught_share"] == 0.25
    assert cfg["expected"]["caught"] == 1          # not chosen on these errors: the held-out figure is fair
    # thresholds off the 0.01 grid are measured exactly, not rounded to a candidate
    assert point(np.array(res["frames"]["confidence"]), np.array(res["frames"]["error"]), "confidence",
                 0.855)["sent"] == 7


def test_no_errors_means_no_choice_and_the_device_default():
    right = SCORES.argmax(1)
    res = analyse(SCORES, right, target=0.8)
    assert res["n_errors"] == 0 and res["chosen"] is None
    assert all(r["chosen"] is None for r in res["rules"].values())
    assert any("no errors" in w for w in res["warnings"])
    got = resolve(res, None)
    assert got["source"] == "device default" and got["threshold"] == 0.6 and got["caught_share"] is None
    assert got["sent"] == 4      # tops below 0.6: frames 5..8 (frame 4's 0.60 is not below it)
    assert got["caught_ci"] is None


def test_an_unreachable_share_is_said_and_the_best_is_taken():
    scores = np.vstack([SCORES, [[1.0, 0.0, 0.0]]]).astype(np.float32)   # confidently wrong: top 1.0, not < 1.0
    labels = np.append(LABELS, 1)
    res = analyse(scores, labels, target=1.0)
    ch = res["rules"]["confidence"]["chosen"]
    assert ch["target_met"] is False and (ch["threshold"], ch["caught"]) == (0.86, 4)  # 4 of 5, fewest frames
    assert any("no confidence threshold sends 100%" in w for w in res["warnings"])
    assert any("only 5 held-out errors" in w for w in res["warnings"])


def test_sweep_is_monotone_and_uses_the_candidates_given():
    vals = np.array([0.2, 0.5, 0.9])
    pts = sweep(vals, np.array([True, False, True]), "confidence", candidates=(0.1, 0.5, 0.95))
    assert [(p["sent"], p["caught"]) for p in pts] == [(0, 0), (1, 1), (3, 2)]


def test_wilson_interval_matches_the_textbook_values():
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.2775, abs=1e-4)
    assert wilson(0, 0) is None


def test_reliability_bins_and_ece_by_hand():
    # tops 0.95 right, 0.85 wrong, 0.62 right, 0.68 wrong, 0.45 wrong
    scores = np.array([[0.95, 0.05], [0.85, 0.15], [0.62, 0.38], [0.68, 0.32], [0.45, 0.55]])
    labels = np.array([0, 1, 0, 1, 0])   # the last: top 0.55 for class 1, truth 0 -> wrong
    r = reliability(scores, labels)
    bins = {round(b["low"], 1): b for b in r["bins"] if b["count"]}
    assert set(bins) == {0.9, 0.8, 0.6, 0.5}
    assert bins[0.6]["count"] == 2 and bins[0.6]["confidence"] == pytest.approx(0.65) and bins[0.6]["accuracy"] == 0.5
    assert bins[0.5]["confidence"] == pytest.approx(0.55) and bins[0.5]["accuracy"] == 0.0
    # ECE = (1/5)|1-0.95| + (1/5)|0-0.85| + (2/5)|0.5-0.65| + (1/5)|0-0.55| = (0.05+0.85+0.30+0.55)/5 = 0.35
    assert r["ece"] == pytest.approx(0.35)
    assert r["accuracy"] == pytest.approx(0.4) and sum(b["count"] for b in r["bins"]) == 5
    perfect = reliability(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1]))
    assert perfect["ece"] == pytest.approx(0.0)
