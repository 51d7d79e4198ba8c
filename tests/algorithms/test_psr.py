"""PSR, positive sample reinforcement (arXiv:2506.01347): A = +1 on correct samples, 0 on wrong ones."""

from __future__ import annotations

import torch

from posttrain.algorithms import ADVANTAGES, AdvantageConfig, AdvantageInput
from posttrain.algorithms.catalog import catalog


def _input(rewards, groups, lengths, t=3) -> AdvantageInput:
    mask = torch.tensor([[1.0] * k + [0.0] * (t - k) for k in lengths])
    return AdvantageInput(rewards=torch.tensor(rewards, dtype=torch.float32), group_ids=torch.tensor(groups), mask=mask)


def _run(name, x, **cfg) -> torch.Tensor:
    return ADVANTAGES.get(name)(x, AdvantageConfig(**cfg))


def test_psr_by_hand():
    # r > 0 is correct, as in w_reinforce: 1 -> +1, 0 -> 0, -1 -> 0, 0.5 -> +1; no baseline, so a
    # group whose samples are all correct (group 1 here) keeps +1 everywhere. Padding stays 0.
    x = _input([1.0, 0.0, -1.0, 0.5, 2.0], [0, 0, 1, 1, 1], lengths=[2, 3, 1, 3, 1])
    a = _run("psr", x)
    assert a.tolist() == [
        [1.0, 1.0, 0.0],
        [0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0],
        [1.0, 1.0, 1.0],
        [1.0, 0.0, 0.0],
    ]


def test_psr_ignores_w_reinforce_lambda_and_pairs_with_nsr():
    # PSR + NSR (w_reinforce with lambda 0: -1 on wrong, 0 on right) = W-REINFORCE with lambda 1 (+1 / -1).
    x = _input([1.0, 0.0, 1.0, -1.0], [0, 0, 1, 1], lengths=[3, 2, 1, 3])
    psr = _run("psr", x, psr_weight=0.7)
    assert torch.equal(psr, _run("psr", x))
    nsr = _run("w_reinforce", x, psr_weight=0.0)
    assert torch.equal(psr + nsr, _run("w_reinforce", x, psr_weight=1.0))


def test_psr_is_listed_with_its_paper():
    rows = {(r["kind"], r["name"]): r for r in catalog()}
    row = rows[("advantage", "psr")]
    assert row["paper"] == "The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning (arXiv:2506.01347)"
    assert row["summary"].startswith("PSR (positive sample reinforcement)")
