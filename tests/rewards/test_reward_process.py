"""Process rewards (rewards/process.py): step splitting, 003-14's Clip/Delta shaping, the verifier
PRM on stepwise arithmetic, a reward as a PRM over prefixes, the step -> token mapping, and PURE's
min-form advantages on the mapped token rewards, each against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms import ADVANTAGES, AdvantageConfig, AdvantageInput
from posttrain.config import ConfigError, load_config
from posttrain.models.tiny import tiny_tokenizer
from posttrain.rewards.errors import score_rollouts
from posttrain.rewards.process import (
    STEP_REWARDS_KEY,
    PrefixPRMReward,
    StepVerifierReward,
    shape_step_rewards,
    split_steps,
    step_token_rewards,
    verify_step,
)
from posttrain.rewards.registry import build_reward
from posttrain.rollout.batch import Rollouts
from posttrain.tasks.base import Problem
from posttrain.tasks.stepwise_arithmetic import StepwiseArithmeticTask, solve

NAN = float("nan")
# 12 -> +7 -> *3 -> -5: the generator's intermediate values are 19, 57, 52
PROBLEM = Problem(id="stepwise:12|+7|*3|-5", prompt="...", answer="52",
                  metadata={"values": [19, 57, 52], "steps": ["12 + 7 = 19", "19 * 3 = 57", "57 - 5 = 52"]})


def approx(a, b, tol=1e-6):
    assert len(a) == len(b) and all((math.isnan(x) and math.isnan(y)) or abs(x - y) <= tol for x, y in zip(a, b)), \
        f"{a} != {b}"


def test_split_steps_by_hand():
    # lines with a non-whitespace character are steps; end = just after the last non-blank character
    assert split_steps("12+7=19\n\n 19*3=57 \n") == [("12+7=19", 7), ("19*3=57", 17)]
    assert split_steps("") == [] and split_steps("\n  \n") == []
    assert split_steps("abc") == [("abc", 3)]


def test_clip_and_delta_by_hand():
    s = [0.7, 0.2, 0.4, 0.8]
    # clip, eta 0.5: min(s - .5, 0) = 0, -.3, -.1, 0
    approx(shape_step_rewards(s, "clip", 0.5), [0.0, -0.3, -0.1, 0.0])
    # delta: s_k - s_{k+1}, last 0 = .5, -.2, -.4, 0 ; the sum from step t telescopes to s_t - s_K
    d = shape_step_rewards(s, "delta")
    approx(d, [0.5, -0.2, -0.4, 0.0])
    approx([sum(d[t:]) for t in range(4)], [0.7 - 0.8, 0.2 - 0.8, 0.4 - 0.8, 0.0])
    # clip then delta: (0, -.3, -.1, 0) -> .3, -.2, -.1, 0
    approx(shape_step_rewards(s, "clip_delta", 0.5), [0.3, -0.2, -0.1, 0.0])
    approx(shape_step_rewards(s, "none"), s)
    assert shape_step_rewards([], "delta") == []
    # the point of both: repeating a correct step (score 1) adds nothing to the trajectory's sum
    for shaping in ("clip", "delta", "clip_delta"):
        assert sum(shape_step_rewards([1.0] * 3, shaping, 1.0)) == sum(shape_step_rewards([1.0] * 9, shaping, 1.0))
    with pytest.raises(ValueError, match="shaping must be one of"):
        shape_step_rewards(s, "log")


def test_verify_step():
    assert verify_step("12 + 7 = 19") and verify_step("12+7=19.") and verify_step("(2+3)*4 = 20")
    assert not verify_step("12 + 7 = 18")
    assert not verify_step("12 + 7 = 19", expected=57)  # true, but not the generator's step
    assert not verify_step("so 12 + 7 = 19") and not verify_step("2**10 = 1024") and not verify_step("19")


def test_step_verifier_by_hand():
    r = build_reward({"type": "step_verifier"})
    right = "12 + 7 = 19\n19 * 3 = 57\n57 - 5 = 52"
    slip = "12 + 7 = 19\n19 * 3 = 56\n56 - 5 = 51"  # step 3 is true arithmetic but continues the slip
    padded = right + "\n52 + 0 = 52"  # a 4th, unnecessary step after the solution: 0
    out = r(PROBLEM, [right, slip, padded, "no steps here", ""])
    assert out.rewards == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert out.components["correct"] == out.rewards
    assert [[s for _, s in i[STEP_REWARDS_KEY]] for i in out.info] == \
        [[1, 1, 1], [1, 0, 0], [1, 1, 1, 0], [0], []]
    assert [end for end, _ in out.info[0][STEP_REWARDS_KEY]] == [11, 23, 35]
    approx(out.components["step_accuracy"], [1.0, 1 / 3, 0.75, 0.0, 0.0])
    assert out.components["steps"] == [3.0, 3.0, 4.0, 1.0, 0.0]
    # clip with eta 1: right 0, wrong -1 -> the slip's return -2
    # delta: slip (1, 0, 0) -> (1-0, 0-0, last 0); padded (1, 1, 1, 0) -> (0, 0, 1, last 0)
    clip = build_reward({"type": "step_verifier", "shaping": "clip"})(PROBLEM, [right, slip])
    assert clip.components["step_return"] == [0.0, -2.0] and clip.components["step_min"] == [0.0, -1.0]
    delta = build_reward({"type": "step_verifier", "shaping": "delta"})(PROBLEM, [slip, padded])
    assert [[s for _, s in i[STEP_REWARDS_KEY]] for i in delta.info] == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]


def test_step_verifier_refuses_what_it_cannot_check():
    r = StepVerifierReward()
    assert "not an integer" in r.check_problem(Problem(id="x", prompt="p", answer="1/2"))
    assert r.check_problem(PROBLEM) is None
    with pytest.raises(ValueError, match="shaping must be one of"):
        build_reward({"type": "step_verifier", "shaping": "sum"})
    with pytest.raises(ValueError, match="clip_eta must be a number"):
        build_reward({"type": "step_verifier", "clip_eta": "high"})


def test_task_labels_are_the_verifiers_steps():
    task = StepwiseArithmeticTask(test_size=20, train_size=50, max_steps=4)
    train, test = task.problems("train"), task.problems("test")
    assert not {p.id for p in train} & {p.id for p in test}
    r = StepVerifierReward()
    for p in train + test:
        values = p.metadata["values"]
        assert 2 <= len(values) <= 4 and p.answer == str(values[-1])
        out = r(p, [p.metadata["solution"]])  # the generator's own solution: every step right, answer right
        assert out.rewards == [1.0] and out.components["step_accuracy"] == [1.0]
    assert solve(12, [("+", 7), ("*", 3), ("-", 5)]) == (["12 + 7 = 19", "19 * 3 = 57", "57 - 5 = 52"], [19, 57, 52])
    with pytest.raises(ValueError, match="min_steps"):
        StepwiseArithmeticTask(min_steps=3, max_steps=2)


def test_prefix_prm_scores_each_prefix():
    # format '[0-9]' as the PRM: prefixes "ab" -> 0, "ab\n1c" -> 1, "ab\n1c\nd" -> 1
    r = build_reward({"type": "prefix_prm", "reward": {"type": "format", "pattern": "[0-9]"},
                      "outcome": {"type": "numeric"}, "shaping": "delta"})
    p = Problem(id="p", prompt="q", answer="1")
    out = r(p, ["ab\n1c\nd", "1", "2"])
    # delta of (0, 1, 1) = (-1, 0, 0); of (1) = (0)
    assert out.info[0][STEP_REWARDS_KEY] == [[2, -1.0], [5, 0.0], [7, 0.0]]
    assert out.info[1][STEP_REWARDS_KEY] == [[1, 0.0]]
    assert out.rewards == [1.0, 1.0, 0.0]  # the numeric outcome: the extracted number is 1, 1, 2 (answer 1)
    assert out.components["correct"] == out.components["outcome/correct"]
    with pytest.raises(ValueError, match="cannot score prefixes"):
        build_reward({"type": "prefix_prm", "reward": {"type": "majority_vote"}})


def _rollouts(tokenizer, problem: Problem, texts: list[str]) -> Rollouts:
    """Rollouts of ``texts`` as the engine makes them: tokens + EOS, right-padded, one group."""
    ids = [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id] for t in texts]
    t_len = max(map(len, ids))
    comp = torch.zeros(len(ids), t_len, dtype=torch.long)
    mask = torch.zeros(len(ids), t_len)
    for i, row in enumerate(ids):
        comp[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1.0
    n = len(texts)
    return Rollouts(prompt_ids=torch.ones(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1, dtype=torch.long),
                    completion_ids=comp, completion_mask=mask, group_ids=torch.zeros(n, dtype=torch.long),
                    behaviour_logprobs=torch.zeros(n, t_len), entropies=None, truncated=torch.zeros(n, dtype=torch.bool),
                    texts=texts, problems=[problem] * n)


def test_step_scores_land_on_each_steps_last_token_and_pure_takes_their_min():
    tok = tiny_tokenizer()  # one token per character, + EOS
    texts = ["12 + 7 = 19\n19 * 3 = 56\n56 - 5 = 51", "12 + 7 = 19\n19 * 3 = 57\n57 - 5 = 52"]
    r = _rollouts(tok, PROBLEM, texts)
    assert score_rollouts(r, StepVerifierReward()) == []
    tr = step_token_rewards(r, tok)
    # steps end at characters 11, 23, 35 -> tokens 10, 22, 34 (the last '9', '6'/'7', '1'/'2')
    for i, scores in enumerate([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]):
        assert torch.isfinite(tr[i]).nonzero().squeeze(-1).tolist() == [10, 22, 34]
        approx(tr[i, [10, 22, 34]].tolist(), scores)
    # PURE: V_t = min of the step scores at or after t. Slip: 0 from token 0 (its later steps are
    # wrong); right: 1 up to token 34. RLOO baseline over the group of 2: b_0 = 1, b_1 = 0.
    # A_0 = 0 - 1 = -1 on tokens 0..34, A_1 = 1 - 0 = +1 on tokens 0..34; the EOS (token 35) gets 0.
    inp = AdvantageInput(rewards=r.rewards, group_ids=r.group_ids, mask=r.completion_mask, token_rewards=tr)
    adv = ADVANTAGES.get("pure")(inp, AdvantageConfig())
    assert adv[0, :35].tolist() == [-1.0] * 35 and adv[1, :35].tolist() == [1.0] * 35
    assert adv[:, 35].tolist() == [0.0, 0.0]
    # reinforce_plus_plus reads the same steps as 0 off the step ends: returns G_t = sum of later steps
    # + outcome on the last token, then whitened -> the right answer's tokens all above the slip's
    rpp = ADVANTAGES.get("reinforce_plus_plus")(inp, AdvantageConfig())
    assert (rpp[1, :35] > rpp[0, :35]).all()


def test_step_token_mapping_with_multi_character_tokens():
    # a tokenizer of 3-character chunks: "12+|7=1|9\n1|9*3|=57"; step 1 ends after '9' (char 6),
    # inside chunk 2 ("9\n1"); step 2 ends after the last '7' (char 14), in chunk 4
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chunks = ["12+", "7=1", "9\n1", "9*3", "=57"]
    core = Tokenizer(models.WordLevel(vocab={c: i + 2 for i, c in enumerate(chunks)} | {"<pad>": 0, "<eos>": 1},
                                      unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]{1,3}"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
    text = "12+7=19\n19*3=57"
    assert tok.encode(text, add_special_tokens=False) == [2, 3, 4, 5, 6]
    problem = Problem(id="p", prompt="q", answer="57", metadata={"values": [19, 57]})
    r = _rollouts(tok, problem, [text])
    score_rollouts(r, StepVerifierReward())
    tr = step_token_rewards(r, tok)
    assert torch.isfinite(tr[0]).nonzero().squeeze(-1).tolist() == [2, 4]
    approx(tr[0, [2, 4]].tolist(), [1.0, 1.0])


def test_a_sample_without_step_scores_gets_no_token_rewards():
    tok = tiny_tokenizer()
    r = _rollouts(tok, PROBLEM, ["", "   "])
    score_rollouts(r, StepVerifierReward())
    assert torch.isnan(step_token_rewards(r, tok)).all()


# ------------------------------------------------------------------ config: what the contract needs
TINY = ["model.name=tiny-random", "rollout.num_prompts=2", "rollout.num_completions=2", "rollout.max_new_tokens=4"]


@pytest.mark.parametrize("overrides, match", [
    (["algorithm.advantage_estimator=pure"], "pure needs per-step process rewards"),
    (["reward={type: step_verifier}"], "reads only the outcome reward, so its step scores would be ignored"),
    (["algorithm.advantage_estimator=pure", "reward={type: composite, parts: [{type: step_verifier}]}"],
     "pure needs per-step process rewards"),
    (["algorithm.advantage_estimator=gae", "reward={type: noisy, flip_prob: 0.1, reward: {type: step_verifier}}"],
     "inside a wrapper"),
    (["algorithm.advantage_estimator=pure", "reward={type: step_verifier}", "environment={type: single_turn}"],
     "multi-turn environments"),
])
def test_config_refuses_what_the_step_contract_cannot_do(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, TINY + overrides)


def test_config_accepts_step_rewards_with_token_level_estimators():
    for estimator in ("pure", "gae", "reinforce_plus_plus"):
        cfg = load_config(None, TINY + [f"algorithm.advantage_estimator={estimator}",
                                        "reward={type: step_verifier, shaping: clip_delta, clip_eta: 0.5}"])
        assert cfg.reward["shaping"] == "clip_delta"


# ------------------------------------------------------------------ 003-22's reasoning-pattern reward
def test_reasoning_pattern_reward_by_hand():
    r = build_reward({"type": "reasoning_pattern"})
    p = Problem(id="p", prompt="q", answer="7")
    # "first, ", "i need to", "therefore": 3 phrases / 20 = 0.15; 12 words < one 20-gram: no repetition
    out = r(p, ["First, I need to add. Therefore 3+4 = 7. The answer is 7.", "Let me check, therefore."])
    approx(out.rewards, [0.15, 0.0])  # the second has no extractable answer: 0
    assert out.components["patterns"] == [3.0, 2.0] and out.components["repetition"] == [0.0, 0.0]
    approx(build_reward({"type": "reasoning_pattern", "require_answer": False})(p, ["Let me check, therefore."]).rewards,
           [0.1])
    # one phrase / norm 1 = 1, minus the repeated bigrams: (wait wait) x2, (wait 5) x1 -> 1 of 3 -> 2/3
    custom = build_reward({"type": "reasoning_pattern", "patterns": ["wait"], "norm": 1, "ngram": 2})
    approx(custom(p, ["Wait wait wait 5"]).rewards, [2 / 3])
    assert "correct" not in out.components  # it checks no answer: accuracy needs a verifier as eval_reward
    with pytest.raises(ValueError, match="norm must be > 0"):
        build_reward({"type": "reasoning_pattern", "norm": 0})
    with pytest.raises(ValueError, match="patterns must be a non-empty list"):
        build_reward({"type": "reasoning_pattern", "patterns": []})
