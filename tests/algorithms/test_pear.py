"""PEAR (arXiv:2510.08026, catalog 002-97): phase split, penalty and advantages by hand, and the
trainer's split on a tag the tiny model actually writes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain.algorithms import ADVANTAGES, AdvantageConfig, AdvantageInput
from posttrain.algorithms.advantages_pear import pear_penalty, phase_entropies, think_phases
from posttrain.config import load_config
from posttrain.trainers.rl_run import train_rl


def test_think_phases_by_hand():
    close = [7, 8]
    ids = torch.tensor([
        [1, 2, 7, 8, 3, 4],  # tag in the middle: think, think, tag, tag, answer, answer
        [1, 7, 2, 3, 0, 0],  # only the tag's first token: no tag, all thinking
        [1, 2, 3, 7, 8, 0],  # the tag's second token is padding: not generated, no tag
        [7, 8, 5, 7, 8, 0],  # tag first (no thinking); the second tag is answer text
    ])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]]).float()
    assert think_phases(ids, mask, close).tolist() == [
        [1, 1, 0, 0, 2, 2],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [0, 0, 2, 2, 2, 0],
    ]
    with pytest.raises(ValueError, match="pear_close_tag"):
        think_phases(ids, mask, [])


def _group():
    """One group of 4: rewards 1, 1, 0, 1 and hand-picked entropies per phase (1 think, 2 answer)."""
    phases = torch.tensor([[1, 1, 0, 2, 2], [1, 0, 2, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    ent = torch.tensor([[2.0, 1.0, 9.0, 0.5, 0.5],  # H_think 1.5, H_answer 0.5 (the tag's 9 in neither)
                        [0.4, 9.0, 1.0, 0.0, 0.0],  # 0.4, 1.0
                        [3.0, 3.0, 3.0, 3.0, 3.0],  # wrong answer: untouched
                        [0.2, 0.3, 0.1, 0.0, 0.0]])  # no tag: H_think 0.2, H_answer 0
    mask = (phases > 0).float()
    mask[0, 2] = mask[1, 1] = 1.0  # the tag's tokens are generated tokens
    return AdvantageInput(rewards=torch.tensor([1.0, 1.0, 0.0, 1.0]), group_ids=torch.zeros(4, dtype=torch.long),
                          mask=mask, entropies=ent, phases=phases)


def test_penalty_by_hand():
    inp = _group()
    think, answer = phase_entropies(inp.entropies, inp.phases)
    assert torch.allclose(think, torch.tensor([1.5, 0.4, 3.0, 0.2], dtype=torch.float64))
    assert torch.allclose(answer, torch.tensor([0.5, 1.0, 0.0, 0.0], dtype=torch.float64))
    # max(0, H_think - alpha H_answer): alpha 1 -> 1.0, 0 (clipped from -0.6), 3.0, 0.2
    assert torch.allclose(pear_penalty(inp.entropies, inp.phases, 1.0),
                          torch.tensor([1.0, 0.0, 3.0, 0.2], dtype=torch.float64))
    # alpha 0 penalises the thinking entropy alone; alpha -1 penalises both phases
    assert torch.allclose(pear_penalty(inp.entropies, inp.phases, 0.0),
                          torch.tensor([1.5, 0.4, 3.0, 0.2], dtype=torch.float64))
    assert torch.allclose(pear_penalty(inp.entropies, inp.phases, -1.0),
                          torch.tensor([2.0, 1.4, 3.0, 0.2], dtype=torch.float64))


def test_pear_advantages_by_hand():
    inp = _group()
    # shaped rewards (correct: r - P; wrong: r): 1 - 1.0, 1 - 0, 0, 1 - 0.2 = [0, 1, 0, 0.8]
    # group mean 0.45; deviations -0.45, 0.55, -0.45, 0.35; unbiased std sqrt(0.83 / 3)
    dev = torch.tensor([-0.45, 0.55, -0.45, 0.35], dtype=torch.float64)
    std = math.sqrt(0.83 / 3)
    adv = ADVANTAGES.get("pear")(inp, AdvantageConfig())
    assert torch.allclose(adv, (dev / (std + 1e-6)).float().unsqueeze(-1) * inp.mask, atol=1e-6)
    assert adv[2, 0] < 0 < adv[1, 0]  # the low-thinking-entropy correct answer is pushed up most
    assert torch.allclose(ADVANTAGES.get("pear")(inp, AdvantageConfig(std_normalize=False)),
                          dev.float().unsqueeze(-1) * inp.mask, atol=1e-6)
    # alpha 0: shaped [1 - 1.5, 1 - 0.4, 0, 0.8] = [-0.5, 0.6, 0, 0.8], mean 0.225
    adv0 = ADVANTAGES.get("pear")(inp, AdvantageConfig(pear_alpha=0.0, std_normalize=False))
    assert torch.allclose(adv0[:, 0], torch.tensor([-0.725, 0.375, -0.225, 0.575]), atol=1e-6)


def test_pear_without_entropies_or_phases_says_so():
    inp = _group()
    inp.phases = None
    with pytest.raises(ValueError, match="entropies and the thinking/answer phases"):
        ADVANTAGES.get("pear")(inp, AdvantageConfig())


def test_pear_config_is_checked():
    with pytest.raises(ValueError, match="pear_alpha"):
        AdvantageConfig(pear_alpha=float("nan"))
    with pytest.raises(ValueError, match="pear_close_tag"):
        AdvantageConfig(pear_close_tag="")


def test_trainer_splits_at_the_closing_tag(tmp_path):
    """The tiny model is char-level: with the tag "e" (a letter it writes often) some completions
    close their thinking phase, so the trainer's split finds answers and their entropy."""
    cfg = load_config(None, ["model.name=tiny-random", "task.test_size=4", "rollout.num_prompts=2",
                             "rollout.num_completions=4", "rollout.max_new_tokens=16", "trainer.steps=2",
                             "trainer.eval_problems=1", "trainer.threads=1", "trainer.seed=0",
                             "reward={type: format, pattern: '[0-9]', match: search}",
                             "algorithm.advantage_estimator=pear", "algorithm.advantage.pear_close_tag=e"])
    train_rl(cfg, output_dir=str(tmp_path / "run"), quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert any(0 < r["pear/closed_frac"] < 1 for r in rows)
    assert any(r["pear/answer_entropy"] > 0 for r in rows)
    for r in rows:  # the random model's entropy: a few nats in each phase, mean over all samples
        assert 0 < r["pear/think_entropy"] < math.log(1000)
