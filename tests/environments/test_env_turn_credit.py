"""Per-turn credit (algorithm.turn_credit, algorithms/advantages_turn.py): hand-computed values on
2 episodes x 2 turns, the config errors, and the trainer giving each turn its own advantage."""

import math

import pytest
import torch

from posttrain.algorithms import ADVANTAGES, AdvantageConfig, AdvantageInput
from posttrain.algorithms.advantages_turn import turn_credit, turn_grpo, turn_spans, turn_step_rewards
from posttrain.config import ConfigError, load_config
from posttrain.environments import Environment, StepResult, register_environment
from posttrain.trainers import rl
from posttrain.trainers.rl_run import prepare, train_rl

NAN = float("nan")
# Two episodes of one problem, two model turns each (m = model token, e = environment token, . = pad):
#   row 0: m m e e m m .    step rewards 0.5, 1.0
#   row 1: m e m m . . .    step rewards 0.25, 0.0
MASK = torch.tensor([[1, 1, 0, 0, 1, 1, 0], [1, 0, 1, 1, 0, 0, 0]], dtype=torch.float32)
STEPS = [[0.5, 1.0], [0.25, 0.0]]
REWARDS = torch.tensor([1.5, 0.25])


def inp(rewards=REWARDS, groups=(0, 0), mask=MASK):
    return AdvantageInput(rewards=rewards, group_ids=torch.tensor(groups), mask=mask)


def test_turn_spans_and_turn_end_rewards():
    assert turn_spans(MASK[0]) == [(0, 2), (4, 6)] and turn_spans(MASK[1]) == [(0, 1), (2, 4)]
    got = turn_step_rewards(MASK, STEPS, REWARDS)
    want = torch.tensor([[NAN, 0.5, NAN, NAN, NAN, 1.0, NAN], [0.25, NAN, NAN, 0.0, NAN, NAN, NAN]], dtype=torch.float64)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())
    # a reward beyond the steps' sum (e.g. DAPO's overlong penalty, -0.5 here) goes to the last turn
    extra = turn_step_rewards(MASK, STEPS, torch.tensor([1.0, 0.25]))
    assert extra[0, 1] == 0.5 and extra[0, 5] == 0.5
    with pytest.raises(ValueError, match="row 1 has 2 model turns in its policy mask but 1 step rewards"):
        turn_step_rewards(MASK, [[0.5, 1.0], [0.25]], REWARDS)
    with pytest.raises(ValueError, match="row 0 has no step_rewards"):
        turn_step_rewards(MASK, [None, [0.25, 0.0]], REWARDS)


def test_group_turn_credit_by_hand():
    # gamma = 0.5: G_0 = (0.5 + 0.5 * 1.0, 1.0) = (1.0, 1.0); G_1 = (0.25 + 0, 0) = (0.25, 0.0)
    # turn 1: mean 0.625 -> +-0.375; turn 2: mean 0.5 -> +-0.5 (dr_grpo: no std division)
    cfg = AdvantageConfig(gamma=0.5)
    adv_in, fn = turn_credit(inp(), STEPS, "dr_grpo")
    want = torch.tensor([[0.375, 0.375, 0, 0, 0.5, 0.5, 0], [-0.375, 0, -0.5, -0.5, 0, 0, 0]])
    assert torch.allclose(fn(adv_in, cfg), want)
    # grpo: two samples differ by 2d, unbiased std = sqrt(2) d, so A = +-1/sqrt(2) at every turn
    adv_in, fn = turn_credit(inp(), STEPS, "grpo")
    s = 1 / math.sqrt(2)
    want = torch.tensor([[s, s, 0, 0, s, s, 0], [-s, 0, -s, -s, 0, 0, 0]])
    assert torch.allclose(fn(adv_in, cfg), want, atol=1e-5)
    # gamma = 1 and one-turn episodes: exactly GRPO
    one = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    r = torch.tensor([1.0, 0.0, 0.5])
    adv_in, fn = turn_credit(inp(r, (0, 0, 0), one), [[1.0], [0.0], [0.5]], "grpo")
    assert torch.allclose(fn(adv_in, AdvantageConfig()), ADVANTAGES.get("grpo")(inp(r, (0, 0, 0), one), AdvantageConfig()))


def test_turn_index_groups_only_the_episodes_that_reached_it():
    # a third episode with one turn (reward 2.0) joins turn 1 only; two problems keep separate statistics
    mask = torch.cat([MASK, torch.tensor([[1.0, 1.0, 0, 0, 0, 0, 0]]), MASK[:1]])
    steps = STEPS + [[2.0], [0.0, 3.0]]
    rewards = torch.tensor([1.5, 0.25, 2.0, 3.0])
    adv_in, fn = turn_credit(inp(rewards, (0, 0, 0, 1), mask), steps, "dr_grpo")
    out = fn(adv_in, AdvantageConfig(gamma=1.0))
    # group 0, turn 1: G = 1.5, 0.25, 2.0 (mean 1.25); turn 2: G = 1.0, 0.0 (mean 0.5); group 1 alone: 0
    assert torch.allclose(out[:, 0], torch.tensor([0.25, -1.0, 0.75, 0.0]))
    assert out[0, 4:6].tolist() == [0.5, 0.5] and out[1, 2:4].tolist() == [-0.5, -0.5]
    assert out[2].tolist() == [0.75, 0.75, 0, 0, 0, 0, 0] and (out[3] == 0).all()


def test_token_turn_credit_by_hand():
    # the steps become token rewards on turn ends and the outcome on the last token is dropped:
    # return-to-go (gamma 1) row 0: 1.5 on turn 1, 1.0 on turn 2; row 1: 0.25, then 0.0
    adv_in, fn = turn_credit(inp(), STEPS, "reinforce_plus_plus")
    assert adv_in.rewards.tolist() == [0.0, 0.0]
    assert adv_in.token_rewards.tolist() == [[0, 0.5, 0, 0, 0, 1.0, 0], [0.25, 0, 0, 0, 0, 0, 0]]
    # whitened over the 7 model tokens: returns 1.5 1.5 1.0 1.0 0.25 0 0, mean 0.75, unbiased std sqrt(0.4375)
    sd = math.sqrt(0.4375)
    want = torch.tensor([[0.75, 0.75, 0, 0, 0.25, 0.25, 0], [-0.5, 0, -0.75, -0.75, 0, 0, 0]]) / sd
    assert torch.allclose(fn(adv_in, AdvantageConfig()), want, atol=1e-5)
    # gae with zero values, lambda 1, no whitening: the plain return-to-go
    adv_in, fn = turn_credit(replace_values(inp()), STEPS, "gae")
    got = fn(adv_in, AdvantageConfig(lam=1.0, gae_whiten=False))
    assert torch.allclose(got, torch.tensor([[1.5, 1.5, 0, 0, 1.0, 1.0, 0], [0.25, 0, 0, 0, 0, 0, 0]]))
    # a KL-in-reward penalty already in token_rewards is kept
    kl = replace_values(inp())
    kl.token_rewards = -0.1 * MASK
    adv_in, _ = turn_credit(kl, STEPS, "gae")
    assert torch.allclose(adv_in.token_rewards[0], torch.tensor([-0.1, 0.4, 0, 0, -0.1, 0.9, 0]))


def test_group_turn_credit_refuses_other_token_rewards():
    x = inp()
    x.token_rewards = torch.zeros_like(MASK)
    with pytest.raises(ValueError, match="already has token rewards"):
        turn_credit(x, STEPS, "grpo")


def replace_values(x):
    x.values = torch.zeros_like(MASK)
    return x


def test_turn_grpo_reads_turn_ends_like_pure():
    # the NaN layout directly: the tokens after the last turn end get 0
    x = inp(mask=torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]))
    x.token_rewards = torch.tensor([[1.0, NAN, NAN], [0.0, NAN, NAN]])
    out = turn_grpo(x, AdvantageConfig(std_normalize=False))
    assert out.tolist() == [[0.5, 0.0, 0.0], [-0.5, 0.0, 0.0]]


GAME = ["model.name=tiny-random", "task={name: guess_the_number, low: 1, high: 8, max_turns: 2, test_size: 4}",
        "reward={type: numeric}", "rollout.num_prompts=2", "rollout.num_completions=4", "rollout.max_new_tokens=4",
        "trainer.eval_problems=2", "trainer.threads=1", "trainer.lr=1e-3", "trainer.steps=2"]


def test_turn_credit_config_errors():
    with pytest.raises(ConfigError, match=r"turn_credit cannot be used with advantage_estimator=rloo.*'grpo', "
                                          r"'dr_grpo', 'gae', 'reinforce_plus_plus'"):
        load_config(None, GAME + ["environment={type: guess_the_number}", "algorithm.turn_credit=true",
                                  "algorithm.advantage_estimator=rloo"])
    # checked where it is known whether a Python environment was passed (posttrain.api.train(environment=...))
    with pytest.raises(ConfigError, match="turn_credit credits the step rewards .* needs an environment"):
        prepare(load_config(None, GAME + ["algorithm.turn_credit=true"]), None, False)


@register_environment("digit_steps")
class DigitSteps(Environment):
    """Two turns; each message earns 1 if it holds a digit: intermediate step rewards for the trainer test."""

    name = "digit_steps"

    def __init__(self, max_turns: int = 2):
        self.max_turns = max_turns

    def step(self, state, message):
        reward = float(any(c.isdigit() for c in message))
        if state.last_turn:
            return StepResult(None, reward, True, {"components": {"correct": reward}})
        return StepResult("again", reward, False)


def expected_turn_grpo(r):
    """Per-turn GRPO (gamma 1, eps 1e-6) recomputed from the rows' metadata in plain Python."""
    returns = {}
    for i, meta in enumerate(r.metadata):
        steps = meta["step_rewards"]
        for k in range(len(steps)):
            returns[(i, k)] = sum(steps[k:]) + (float(r.rewards[i]) - sum(steps) if k == len(steps) - 1 else 0.0)
    want = torch.zeros_like(r.completion_mask)
    for (i, k), g in returns.items():
        peers = [v for (j, kk), v in returns.items() if kk == k and int(r.group_ids[j]) == int(r.group_ids[i])]
        mean = sum(peers) / len(peers)
        std = math.sqrt(sum((v - mean) ** 2 for v in peers) / (len(peers) - 1)) if len(peers) > 1 else 0.0
        a = (g - mean) / (std + 1e-6) if std > 1e-9 else 0.0
        start, end = turn_spans(r.action_mask[i])[k]
        want[i, start:end] = a
    return want


def test_trainer_gives_each_turn_its_own_advantage(tmp_path, monkeypatch):
    seen = []
    original = rl.RLUpdate.learn
    monkeypatch.setattr(rl.RLUpdate, "learn", lambda self, r, *a: original(self, r, *a) if seen.append(r) is None else None)
    cfg = load_config(None, GAME + ["environment={type: digit_steps}", "algorithm.turn_credit=true"])
    summary = train_rl(cfg, output_dir=str(tmp_path / "run"), quiet=True)
    assert summary["steps"] == 2
    assert any(len(set(m["step_rewards"])) > 1 for r in seen for m in r.metadata)  # turns earned differently
    for r in seen:
        assert torch.allclose(r.advantages, expected_turn_grpo(r), atol=1e-4)
        assert (r.advantages[(r.completion_mask == 1) & (r.action_mask == 0)] == 0).all()
    assert any((r.advantages != 0).any() for r in seen)
