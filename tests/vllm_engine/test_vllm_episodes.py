"""Multi-turn episodes (environments.run_episodes) on a real vLLM engine (the CPU build here):
environment tokens carry no loss and no behaviour log-prob, vLLM's behaviour log-probs of the
model's tokens are the learner's on the stored multi-turn row, and the RL loop trains with an
environment on vLLM rollouts."""

import json

import pytest
import torch

pytestmark = [pytest.mark.vllm]
pytest.importorskip("vllm")

from posttrain.config import load_config  # noqa: E402
from posttrain.environments import GuessTheNumber, guess_the_number_problems, run_episodes  # noqa: E402
from posttrain.models.logprobs import completion_logprobs  # noqa: E402
from posttrain.models.tiny import tiny_model_and_tokenizer  # noqa: E402
from posttrain.rollout.sampler import SamplingParams, render_prompt  # noqa: E402
from posttrain.rollout.vllm_engine import VLLMRolloutEngine  # noqa: E402
from posttrain.trainers import rl  # noqa: E402
from posttrain.trainers.rl_run import train_rl  # noqa: E402

# The tolerance of test_vllm_engine.py: fp32 engine vs fp32 learner, same math, other kernels.
LOGPROB_TOL = 1e-4
KV_GB = 0.05


@pytest.fixture(scope="module")
def setup():
    # 2 heads (head_dim 32): vLLM's CPU attention has no kernel for the default tiny head_dim 16
    model, tok = tiny_model_and_tokenizer(num_heads=2)
    engine = VLLMRolloutEngine(model, tok, dtype=torch.float32, kv_cache_gb=KV_GB, gpu_memory_utilization=0.5,
                               seed=0)
    yield model, tok, engine
    engine.close()


def test_two_turn_episodes_mask_environment_tokens_and_match_the_learner(setup):
    model, tok, engine = setup
    env = GuessTheNumber(1, 9, max_turns=2)
    problems = guess_the_number_problems(3, 1, 9, max_turns=2, seed=2)
    r = run_episodes(engine, env, problems, 2, SamplingParams(max_new_tokens=6, temperature=0.8),
                     torch.Generator().manual_seed(0))
    assert len(r) == 6 and r.group_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert r.entropies is None  # vLLM returns none; the learner computes them
    lengths = r.completion_mask.sum(-1).long()
    two_turn_exact = 0
    for i, meta in enumerate(r.metadata):
        L = int(lengths[i])
        assert r.completion_mask[i, :L].eq(1).all() and r.completion_mask[i, L:].eq(0).all()
        model_tok = r.action_mask[i] == 1
        env_tok = (r.completion_mask[i] == 1) & ~model_tok
        assert meta["env_tokens"] == int(env_tok.sum()) and meta["model_tokens"] == int(model_tok.sum())
        # environment tokens: no loss (action_mask 0) and no behaviour log-prob
        assert r.behaviour_logprobs[i][env_tok].eq(0).all()
        assert (r.behaviour_logprobs[i][model_tok] < 0).all()
        if meta["turns"] == 2:
            assert meta["env_tokens"] > 0
            feedback = tok.decode(r.completion_ids[i][env_tok])
            assert meta["turn_info"][0]["feedback"] in feedback
            if meta["retokenized"] == 0:
                two_turn_exact += 1
                # the row up to the second model turn is the template's rendering of the
                # conversation through the observation: what vLLM was prompted with
                row = r.prompt_ids[i][r.prompt_mask[i] == 1].tolist() + r.completion_ids[i, :L].tolist()
                context = render_prompt(tok, meta["messages"][:-1], True)
                assert row[: len(context)] == context and len(row) > len(context)
                start = len(context) - int(r.prompt_mask[i].sum())  # the second model turn's first token
                assert r.action_mask[i, start:L].eq(1).all() and r.action_mask[i, start - 1] == 0
    assert two_turn_exact >= 1, [m["turns"] for m in r.metadata]
    # vLLM's behaviour log-probs of every model token (both turns) are the learner's log-probs
    # on the stored row, which attends to the environment's tokens between the turns
    with torch.no_grad():
        lp, _ = completion_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask,
                                    temperature=0.8)
    exact = torch.tensor([m["retokenized"] == 0 for m in r.metadata])
    mask = r.action_mask.bool() & exact[:, None]
    worst = float((lp[mask] - r.behaviour_logprobs[mask]).abs().max())
    assert worst < LOGPROB_TOL, worst
    assert engine.last_stats["generate_calls"] == 2


def test_rl_steps_with_an_environment_on_vllm_rollouts(tiny_dir, tmp_path, monkeypatch):
    seen = []
    original = rl.RLUpdate.learn
    monkeypatch.setattr(rl.RLUpdate, "learn", lambda self, r, *a: original(self, r, *a) if seen.append(r) is None else None)
    overrides = [f"model.name={tiny_dir}", "rollout.engine=vllm", "rollout.kv_cache_gb=0.05",
                 "task={name: guess_the_number, low: 1, high: 8, max_turns: 2, test_size: 4}",
                 "environment={type: guess_the_number, low: 1, high: 8, max_turns: 2}", "reward={type: numeric}",
                 "rollout.num_prompts=2", "rollout.num_completions=2", "rollout.max_new_tokens=4",
                 "trainer.eval_problems=4", "trainer.lr=1e-3", "trainer.steps=2"]
    summary = train_rl(load_config(None, overrides), output_dir=str(tmp_path / "run"), quiet=True)
    assert summary["steps"] == 2 and len(seen) == 2
    for r in seen:
        env_tokens = (r.completion_mask == 1) & (r.action_mask == 0)
        assert (r.loss_mask[env_tokens] == 0).all() and (r.advantages[env_tokens] == 0).all()
        assert (r.behaviour_logprobs[env_tokens] == 0).all()
    assert any(((r.completion_mask == 1) & (r.action_mask == 0)).any() for r in seen)  # a 2-turn episode
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(1 <= row["env/turns_mean"] <= 2 and row["time/sync_s"] > 0 for row in rows)
    assert all(row["mismatch/kl_k3"] >= 0 for row in rows)
