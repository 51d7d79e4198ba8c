"""Issue 19, defects ``seed_grpo`` and ``gdpo``: each test failed on the code before the fix.

* seed_grpo clustered ``str(answer)``: every missing answer became the string "None" (one
  cluster of agreeing non-answers) and equal numbers written differently ("1/2", "0.5",
  "\\frac{1}{2}") fell in different clusters.
* gdpo's default normalised every reward component, the aggregate ``total``, the duplicated
  ``math/correct`` and the raw ``overlong/length`` included, so length itself was rewarded.

Rewards, scoring and the trainer's advantage step are the real ones; the values are by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms import ADVANTAGES, AdvantageConfig, AdvantageInput
from posttrain.config import load_config
from posttrain.models.tiny import tiny_model_and_tokenizer
from posttrain.rewards.errors import score_group, score_rollouts
from posttrain.rewards.registry import build_reward
from posttrain.rollout.batch import Rollouts
from posttrain.tasks.base import Problem
from posttrain.trainers.learner import Learner
from posttrain.trainers.rl_update import RLUpdate

HALF = Problem(id="half", prompt="What is one half?", answer="1/2")


def _rollouts(texts: list[str], group_size: int) -> Rollouts:
    """One token per completion (its content is irrelevant to the advantage step)."""
    n = len(texts)
    return Rollouts(
        prompt_ids=torch.ones((n, 1), dtype=torch.long), prompt_mask=torch.ones((n, 1), dtype=torch.long),
        completion_ids=torch.ones((n, 1), dtype=torch.long), completion_mask=torch.ones((n, 1)),
        group_ids=torch.arange(n) // group_size, behaviour_logprobs=torch.zeros((n, 1)), entropies=None,
        truncated=torch.zeros(n, dtype=torch.bool), texts=texts, problems=[HALF] * n,
    )


# ------------------------------------------------------------------------------ seed_grpo
def test_seed_grpo_through_the_trainer_clusters_canonical_answers_and_keeps_non_answers_apart():
    # Group 0: 1/2, 0.5, \frac{1}{2}, 3 -> rewards 1,1,1,0; base (Dr.GRPO, no std) r - .75 =
    #   .25,.25,.25,-.75. Canonical clusters {1/2: 3, 3: 1}: H = -(.75 ln .75 + .25 ln .25)
    #   = .215762 + .346574 = .562335; H / ln 4 = .562335 / 1.386294 = .405639 -> scale .594361
    #   -> A = .148590 (x3), -.445771. (Before: 4 distinct strings, H = ln 4, scale 0, A = 0.)
    # Group 1: 1/2, 1/2, no answer, no answer -> rewards 1,1,0,0, base +-.5. Clusters {1/2: 2},
    #   {None}, {None}: p = .5,.25,.25, H = 1.039721, H / ln 4 = .75 -> scale .25 -> +-.125.
    #   (Before: the two "None" strings agreed, p = .5,.5, H / ln 4 = .5 -> +-.25.)
    texts = ["\\boxed{1/2}", "\\boxed{0.5}", "\\boxed{\\frac{1}{2}}", "\\boxed{3}",
             "\\boxed{1/2}", "\\boxed{1/2}", "I don't know", "hmm"]
    rollouts = _rollouts(texts, group_size=4)
    assert score_rollouts(rollouts, build_reward({"type": "math"})) == []
    assert rollouts.rewards.tolist() == [1, 1, 1, 0, 1, 1, 0, 0]
    cfg = load_config(None, ["model.name=tiny-random", "algorithm.advantage_estimator=seed_grpo",
                             "algorithm.advantage.std_normalize=false"])
    model, _ = tiny_model_and_tokenizer(seed=0)
    learner = Learner(model, cfg.trainer, cfg.model, temperature=1.0, device=torch.device("cpu"),
                      sampler_dtype=torch.float32)
    RLUpdate(cfg, learner).prepare(rollouts)
    expected = [0.148590, 0.148590, 0.148590, -0.445771, 0.125, 0.125, -0.125, -0.125]
    assert rollouts.advantages[:, 0].tolist() == pytest.approx(expected, abs=1e-5)


def test_seed_grpo_missing_answers_are_singletons_and_non_strings_are_rejected():
    # None, None, "", "7": four singletons -> H = ln 4 = H_max -> scale 0 -> A = 0 everywhere
    x = AdvantageInput(rewards=torch.tensor([1.0, 0, 0, 1]), group_ids=torch.zeros(4, dtype=torch.long),
                       mask=torch.ones(4, 1), answers=[None, None, "", "7"])
    assert ADVANTAGES.get("seed_grpo")(x, AdvantageConfig()).abs().max().item() == 0.0
    # A number is not a canonical answer string: before, it silently became a "missing" singleton.
    x.answers = ["0.5", 0.5, None, "7"]
    with pytest.raises(TypeError, match=r"answers\[1\] is float"):
        ADVANTAGES.get("seed_grpo")(x, AdvantageConfig())


# ------------------------------------------------------------------------------ gdpo
def _components(spec: dict, texts: list[str], group_size: int) -> AdvantageInput:
    """The reward components the trainer hands to the estimator (score_group adds reward_error)."""
    reward = build_reward(spec)
    rewards: list[float] = []
    comps: dict[str, list[float]] = {}
    for start in range(0, len(texts), group_size):
        out, errors = score_group(reward, HALF, texts[start:start + group_size])
        assert errors == []
        rewards += out.rewards
        for k, v in out.components.items():
            comps.setdefault(k, []).extend(v)
    n = len(texts)
    return AdvantageInput(rewards=torch.tensor(rewards), group_ids=torch.arange(n) // group_size,
                          mask=torch.ones(n, 1), reward_components={k: torch.tensor(v) for k, v in comps.items()})


COMPOSITE = {"type": "composite", "parts": [
    {"type": "math", "weight": 1.0},
    {"type": "overlong", "max_length": 12, "cache_length": 4, "weight": 1.0}]}


def test_gdpo_default_normalises_only_the_weighted_parts_of_a_composite_reward():
    # Overlong (chars): start = 12 - 4 = 8, penalty (8 - L) / 4 above 8.
    # Group 0: "\boxed{.5}" (L 10, correct, -.5), "\boxed{333}" (L 11, wrong, -.75)
    # Group 1: "\boxed{1/2}" (L 11, correct, -.75), "no" (L 2, no answer, 0)
    # Parts: math, overlong. In a group of two distinct values z = +-.5 / .707107 = +-.707107:
    #   group 0: math +,-  overlong +,-  -> sum +-1.414214
    #   group 1: math +,-  overlong -,+  -> sum 0, 0
    # Batch z-score: mean 0, unbiased std sqrt(2 * 2 / 3) = 1.154701 -> +-1.224745, 0, 0.
    # (Before: math/correct, overlong/length and total joined in: +-.866025 for all four.)
    x = _components(COMPOSITE, ["\\boxed{.5}", "\\boxed{333}", "\\boxed{1/2}", "no"], group_size=2)
    assert sorted(x.reward_components) == ["math", "math/correct", "overlong", "overlong/length",
                                           "reward_error", "total"]
    a = ADVANTAGES.get("gdpo")(x, AdvantageConfig(eps=0.0))
    assert a[:, 0].tolist() == pytest.approx([1.224745, -1.224745, 0.0, 0.0], abs=1e-5)
    # Naming the components explicitly still selects exactly those (here: length alone, as asked).
    b = ADVANTAGES.get("gdpo")(x, AdvantageConfig(eps=0.0, gdpo_components=["overlong/length"],
                                                  gdpo_batch_normalize=False))
    assert b[:, 0].tolist() == pytest.approx([-math.sqrt(0.5), math.sqrt(0.5), math.sqrt(0.5), -math.sqrt(0.5)])


def test_gdpo_default_without_a_composite_reward_is_an_error_listing_the_components():
    # A single reward's components are diagnostics (math: correct = the reward itself): there are
    # no separate reward parts to decouple, so the default refuses and names what could be chosen.
    x = _components({"type": "math"}, ["\\boxed{.5}", "no"], group_size=2)
    with pytest.raises(ValueError, match=r"gdpo_components.*\['correct', 'reward_error'\]"):
        ADVANTAGES.get("gdpo")(x, AdvantageConfig())
    with pytest.raises(ValueError, match="algorithm.advantage.gdpo_components lists a component twice"):
        AdvantageConfig(gdpo_components=["correct", "correct"])
