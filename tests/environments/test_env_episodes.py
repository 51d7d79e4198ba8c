"""Episodes with the tiny random model through the hf engine: content is random, the structure is not."""

import pytest
import torch

from posttrain.environments import GuessTheNumber, SingleTurn, episode_metrics, guess_the_number_problems, run_episodes
from posttrain.models.loading import load_model_and_tokenizer
from posttrain.models.logprobs import completion_logprobs
from posttrain.rewards.errors import score_rollouts
from posttrain.rewards.math import NumericReward
from posttrain.rollout.engine import HFRolloutEngine, SamplingParams
from posttrain.tasks.base import Problem


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model_and_tokenizer("tiny-random")
    return model, tok, HFRolloutEngine(model, tok, dtype=torch.float32)


def test_guess_the_number_episodes_structure_and_learner_logprobs(tiny):
    model, tok, engine = tiny
    env = GuessTheNumber(1, 9, max_turns=3, max_tokens=120)
    problems = guess_the_number_problems(2, 1, 9, max_turns=3, seed=1)
    r = run_episodes(engine, env, problems, 2, SamplingParams(max_new_tokens=5), torch.Generator().manual_seed(0))
    assert len(r) == 4 and r.group_ids.tolist() == [0, 0, 1, 1]
    assert [p.id for p in r.problems] == [problems[0].id] * 2 + [problems[1].id] * 2
    lengths = r.completion_mask.sum(-1).long()
    for i, meta in enumerate(r.metadata):
        L = int(lengths[i])
        # completion_mask: every real token, contiguous; loss only on model tokens
        assert r.completion_mask[i, :L].eq(1).all() and r.completion_mask[i, L:].eq(0).all()
        assert (r.action_mask[i] <= r.completion_mask[i]).all() and L <= env.max_tokens
        env_tok = (r.completion_mask[i] == 1) & (r.action_mask[i] == 0)
        assert r.behaviour_logprobs[i][env_tok].eq(0).all() and r.entropies[i][env_tok].eq(0).all()
        assert (r.behaviour_logprobs[i][r.action_mask[i] == 1] < 0).all()
        assert 1 <= meta["turns"] <= 3 and meta["stop_reason"] in ("done", "max_tokens")
        assert meta["model_tokens"] == int(r.action_mask[i].sum()) <= 5 * meta["turns"]
        assert meta["env_tokens"] == int(env_tok.sum()) and len(meta["step_rewards"]) == meta["turns"]
        assert r.rewards[i] == sum(meta["step_rewards"]) and meta["secret"] == int(r.problems[i].answer)
        roles = [m["role"] for m in meta["messages"]]
        assert roles[0] == "user" and roles[1::2] == ["assistant"] * meta["turns"]
        feedback = tok.decode(r.completion_ids[i][env_tok])
        assert all(t["feedback"] in feedback for t in meta["turn_info"][:-1])
    assert any(m["turns"] > 1 for m in r.metadata)
    # The learner's log-probs on the stored row (attending to environment tokens) are the
    # engine's behaviour log-probs on every model token of rows the engine saw as stored.
    with torch.no_grad():
        lp, _ = completion_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    exact = torch.tensor([m["retokenized"] == 0 for m in r.metadata])
    assert any(m["retokenized"] == 0 and m["turns"] > 1 for m in r.metadata)
    mask = r.action_mask.bool() & exact[:, None]
    assert torch.allclose(lp[mask], r.behaviour_logprobs[mask], atol=1e-4)
    metrics = episode_metrics(r)
    assert metrics["env/turns_mean"] == sum(m["turns"] for m in r.metadata) / 4
    assert metrics["env/tool_calls_per_episode"] == 0.0 and 0 < metrics["env/env_token_frac"] < 1
    assert engine.last_stats["generate_calls"] == max(m["turns"] for m in r.metadata)


def test_single_turn_episode_equals_the_engine_batch(tiny):
    _, _, engine = tiny
    problems = [Problem(id=f"p{i}", prompt=f"What is {i} + {i}?", answer=str(2 * i)) for i in range(2)]
    params = SamplingParams(max_new_tokens=6)
    ref = engine.generate(problems, 3, params, torch.Generator().manual_seed(4))
    score_rollouts(ref, NumericReward())
    r = run_episodes(engine, SingleTurn(NumericReward()), problems, 3, params, torch.Generator().manual_seed(4))
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "behaviour_logprobs", "entropies",
                 "group_ids", "truncated", "rewards"):
        assert torch.equal(getattr(r, name), getattr(ref, name)), name
    assert r.action_mask is None or torch.equal(r.action_mask, r.completion_mask)
    assert r.texts == ref.texts
    assert set(r.reward_components) == set(ref.reward_components)
    assert all(m["turns"] == 1 and m["stop_reason"] == "done" for m in r.metadata)


def test_multi_turn_needs_a_chat_template(tiny):
    model, tok, _ = tiny
    engine = HFRolloutEngine(model, tok, dtype=torch.float32, chat_template=False)
    with pytest.raises(ValueError, match="need the tokenizer's chat template"):
        run_episodes(engine, GuessTheNumber(max_turns=2), [Problem(id="a", prompt="g", answer="3")], 1,
                     SamplingParams(max_new_tokens=2))
