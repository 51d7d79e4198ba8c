"""SIREN (arXiv:2509.25133, catalog 003-46): peak-entropy mask, selected entropy and the
self-anchored loss by hand; its gradient independent of the micro-batching; the anchor in the trainer,
with its top-p mask (the default; the nucleus entropy itself is tested in tests/core/test_token_logprobs.py)
and without."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.algorithms import EntropyConfig
from posttrain.algorithms.regularizers import peak_entropy_mask, siren_loss, siren_selected_entropy
from posttrain.config import load_config
from posttrain.trainers.rl_run import train_rl


def test_peak_entropy_mask_by_hand():
    ent = torch.tensor([[1.0, 2.0, 3.0, 4.0],
                        [5.0, 1.0, 3.0, 9.0],   # the 9 is padding
                        [2.0, 2.0, 2.0, 0.0],   # all tied: nothing strictly above the quantile
                        [7.0, 7.0, 7.0, 7.0]])  # padding only
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]]).float()
    # quantile 0.8, linear interpolation: row 0 at position 3 * 0.8 = 2.4 of [1,2,3,4] -> 3.4;
    # row 1 at 2 * 0.8 = 1.6 of [1,3,5] -> 4.2
    assert peak_entropy_mask(ent, mask, 0.8).tolist() == [
        [False, False, False, True],
        [True, False, False, False],
        [False, False, False, False],
        [False, False, False, False],
    ]
    # quantile 0.5: row 0 -> 2.5 keeps 3 and 4; row 1 -> 3 keeps 5 only (strictly above)
    assert peak_entropy_mask(ent, mask, 0.5)[:2].tolist() == [[False, False, True, True],
                                                             [True, False, False, False]]
    # quantile 0 keeps everything above each response's minimum
    assert peak_entropy_mask(ent, mask, 0.0)[0].tolist() == [False, True, True, True]


def test_selected_entropy_by_hand():
    ent = torch.tensor([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]).float()
    # row 0 keeps 3 and 4 (mean 3.5); the tied row keeps none and counts as 0 (the official code's mean)
    assert siren_selected_entropy(ent, mask, 0.5).tolist() == [3.5, 0.0]


def test_siren_loss_value_and_gradient_by_hand():
    selected = torch.tensor([3.5, 0.0, 2.0], requires_grad=True)
    # 3 of a mini-batch's 6 responses, deviation 0.5, coef 0.1: value 0.1 * 0.25 * 3/6 = 0.0125,
    # gradient 0.1 * 2 * 0.5 / 6 on each response's selected entropy
    loss = siren_loss(selected, 0.5, 0.1, 6.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.0125)
    assert torch.allclose(selected.grad, torch.full((3,), 0.1 * 2 * 0.5 / 6))
    below = torch.tensor([1.0], requires_grad=True)
    siren_loss(below, -2.0, 0.1, 1.0).backward()  # below the anchor: the gradient raises the entropy
    assert below.grad.item() == pytest.approx(-0.4)


def test_micro_batches_sum_to_the_mini_batch_square():
    """Summed over any split, the value is coef * (H_peak - a)^2 and the gradient that of the square."""
    torch.manual_seed(0)
    ent = torch.rand(6, 5, dtype=torch.float64) * 3
    mask = torch.ones(6, 5, dtype=torch.float64)
    mask[1, 3:] = mask[4, 1:] = 0
    coef, anchor = 0.3, 1.0

    exact_ent = ent.clone().requires_grad_(True)
    h_peak = siren_selected_entropy(exact_ent, mask, 0.8).mean()
    exact = coef * (h_peak - anchor) ** 2
    exact.backward()
    deviation = float(h_peak.detach()) - anchor
    for split in ([6], [2, 4], [1, 1, 1, 1, 1, 1]):
        leaf = ent.clone().requires_grad_(True)
        total, start = 0.0, 0
        for size in split:
            rows = slice(start, start + size)
            total = total + siren_loss(siren_selected_entropy(leaf[rows], mask[rows], 0.8), deviation, coef, 6.0)
            start += size
        total.backward()
        assert total.item() == pytest.approx(exact.item())
        assert torch.allclose(leaf.grad, exact_ent.grad)
    assert exact_ent.grad.abs().sum() > 0


@pytest.mark.parametrize("kw, match", [
    (dict(siren=True, coef=0.0), "coef > 0"),
    (dict(siren=True, coef=0.005, adaptive=True), "turn one off"),
    (dict(siren_quantile=1.0), "siren_quantile"),
    (dict(siren_quantile=float("nan")), "siren_quantile"),
    (dict(siren_anchor=-1.0), "siren_anchor"),
    (dict(siren_top_p=1.0), "siren_top_p"),
    (dict(siren_top_p=0.0), "siren_top_p"),
    (dict(siren_top_p=float("nan")), "siren_top_p"),
])
def test_config_is_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        EntropyConfig(**kw)


def _run(tmp_path, *overrides):
    cfg = load_config(None, ["model.name=tiny-random", "task.test_size=4", "rollout.num_prompts=2",
                             "rollout.num_completions=4", "rollout.max_new_tokens=8", "trainer.steps=2",
                             "trainer.lr=1e-3", "trainer.eval_problems=1", "trainer.threads=1", "trainer.seed=0",
                             "reward={type: format, pattern: '[0-9]', match: search}",
                             "algorithm.entropy.coef=0.005", "algorithm.entropy.siren=true", *overrides])
    train_rl(cfg, output_dir=str(tmp_path / "run"), quiet=True)
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_anchor_is_the_first_steps_peak_entropy(tmp_path):
    rows = _run(tmp_path)  # one mini-batch: step 1's H_peak is the anchor itself
    assert rows[0]["entropy/siren_peak"] == pytest.approx(rows[0]["entropy/siren_anchor"])
    assert rows[0]["entropy/siren_penalty"] == pytest.approx(0.0, abs=1e-12)
    assert rows[1]["entropy/siren_anchor"] == rows[0]["entropy/siren_anchor"]  # fixed for the run
    assert rows[1]["entropy/siren_peak"] != rows[0]["entropy/siren_peak"]
    assert 0 < rows[0]["entropy/siren_anchor"]


def test_configured_anchor_sets_the_penalty(tmp_path):
    rows = _run(tmp_path, "algorithm.entropy.siren_anchor=1.0")
    for r in rows:  # one mini-batch a step: the penalty is coef * (H_peak - 1)^2 exactly
        assert r["entropy/siren_anchor"] == 1.0
        assert r["entropy/siren_penalty"] == pytest.approx(0.005 * (r["entropy/siren_peak"] - 1.0) ** 2)
        assert r["entropy/siren_penalty"] > 0
        # and it is in the loss: one micro-batch, no KL, so total = policy + SIREN's term
        assert r["loss/total"] - r["loss/policy"] == pytest.approx(r["entropy/siren_penalty"], rel=1e-4)


def test_anchor_survives_resume(tmp_path):
    """The anchor is the first step's and stays so across --resume (it is in the checkpointed state):
    recomputed on resume it would be step 2's batch's H_peak instead."""
    from posttrain.cli import main

    args = ["model.name=tiny-random", "task.test_size=4", "rollout.num_prompts=2", "rollout.num_completions=4",
            "rollout.max_new_tokens=8", "trainer.lr=1e-3", "trainer.eval_problems=1", "trainer.threads=1",
            "trainer.seed=0", "trainer.checkpoint_every=1", "algorithm.entropy.coef=0.005",
            "algorithm.entropy.siren=true"]
    run = tmp_path / "run"
    assert main(["rl", "examples/arithmetic.yaml", *args, "trainer.steps=1", "--output-dir", str(run)]) == 0
    assert main(["rl", "--resume", str(run), "trainer.steps=2"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["entropy/siren_anchor"] == rows[0]["entropy/siren_anchor"]
    assert rows[1]["entropy/siren_peak"] != rows[0]["entropy/siren_peak"]  # else the check above is empty


def test_top_p_mask_in_the_trainer(tmp_path):
    """The default run regularises nucleus entropies (p = 0.8), logged as entropy/learner_top_p; with
    siren_top_p: null the full-vocabulary ones. On the near-uniform random model a token's 80%
    nucleus has a lower entropy than its whole vocabulary, so the anchors differ in that direction."""
    nucleus = _run(tmp_path / "top_p")
    full = _run(tmp_path / "full", "algorithm.entropy.siren_top_p=null")
    for r in nucleus:
        assert "entropy/learner_top_p" in r and "entropy/learner" not in r
    for r in full:
        assert "entropy/learner" in r and "entropy/learner_top_p" not in r
    assert 0 < nucleus[0]["entropy/siren_anchor"] < full[0]["entropy/siren_anchor"]
    assert nucleus[0]["entropy/learner_top_p"] < full[0]["entropy/learner"]
    # the anchor is step 1's H_peak of the nucleus entropies (one mini-batch), the penalty then 0
    assert nucleus[0]["entropy/siren_peak"] == pytest.approx(nucleus[0]["entropy/siren_anchor"])


def test_top_p_mask_refuses_a_loss_that_reads_the_full_entropy(tmp_path):
    with pytest.raises(ValueError, match="siren_top_p: null"):
        _run(tmp_path, "algorithm.policy_loss=sspo")
