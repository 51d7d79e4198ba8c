"""Format-share tracking and the self-correction convergence law."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from posttrain.evaluation import (
    FormatShareTracker,
    classify_format,
    fit_self_correction,
    fit_self_correction_from_counts,
    format_shares,
)

CLASSIFIERS = {
    "code": r"```python",
    "boxed": re.compile(r"\\boxed\{"),
    "terse": r"^#### ",
}


def test_format_shares_first_match_and_other():
    texts = [
        "```python\nprint(2)\n```",
        "so the answer is \\boxed{2}",
        "```python\nx=1\n```\n\\boxed{1}",  # both match: first classifier (code) wins
        "work\n#### 7",
        "I don't know",
    ]
    shares = format_shares(texts, CLASSIFIERS)
    assert shares == {"code": 0.4, "boxed": 0.2, "terse": 0.2, "other": 0.2}
    assert sum(shares.values()) == pytest.approx(1.0)
    assert classify_format("#### 3", CLASSIFIERS) == "terse"
    assert all(math.isnan(v) for v in format_shares([], CLASSIFIERS).values())
    with pytest.raises(ValueError):
        format_shares(["x"], {"other": "x"})


def test_format_share_tracker_detects_collapse():
    tr = FormatShareTracker(CLASSIFIERS)
    for step, p_code in enumerate([0.3, 0.6, 0.9, 1.0]):
        n_code = int(round(10 * p_code))
        tr.update(step * 10, ["```python\n1```"] * n_code + ["\\boxed{1}"] * (10 - n_code))
    steps, shares = tr.as_arrays()
    assert steps.tolist() == [0, 10, 20, 30]
    assert shares["code"].tolist() == pytest.approx([0.3, 0.6, 0.9, 1.0])
    assert tr.dominant() == ("code", 1.0)
    assert tr.metrics()["format/code"] == 1.0


def test_self_correction_fit_recovers_parameters():
    rng = np.random.default_rng(0)
    p_cc, p_wc, acc0, n = 0.9, 0.3, 0.4, 200_000
    before = rng.uniform(size=n) < acc0
    u = rng.uniform(size=n)
    after = np.where(before, u < p_cc, u < p_wc)
    fit = fit_self_correction(before, after)
    assert fit.p_cc == pytest.approx(p_cc, abs=0.01)
    assert fit.p_wc == pytest.approx(p_wc, abs=0.01)
    assert fit.alpha == pytest.approx(0.6, abs=0.015)
    assert fit.upp == pytest.approx(0.3 / (1 - 0.9 + 0.3), abs=0.015)  # 0.75
    # predict(0) is the observed start, predict(1) the observed accuracy after one round
    assert fit.predict(0) == pytest.approx(before.mean())
    assert fit.predict(1) == pytest.approx(after.mean(), abs=1e-12)
    # multi-round simulation of the same Markov chain follows the law
    state = before.copy()
    for t in range(1, 6):
        u = rng.uniform(size=n)
        state = np.where(state, u < p_cc, u < p_wc)
        assert fit.predict(t) == pytest.approx(state.mean(), abs=0.01)
    assert fit.predict(np.array([0, 50]))[1] == pytest.approx(fit.upp, abs=1e-6)


def test_self_correction_edge_cases():
    fit = fit_self_correction_from_counts(n_cc=5, n_cw=0, n_wc=0, n_ww=5)  # nothing ever changes
    assert fit.alpha == 1.0 and fit.upp == 0.5 and fit.predict(10) == pytest.approx(0.5)
    fit = fit_self_correction_from_counts(0, 0, 3, 7)  # no correct problem before: p_cc unknown
    assert math.isnan(fit.p_cc) and fit.p_wc == pytest.approx(0.3) and fit.predict(0) == 0.0
    with pytest.raises(ValueError):
        fit_self_correction([True], [True, False])
