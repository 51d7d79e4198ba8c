"""Best-of-N scorers: self-certainty by hand on a fake model, chunked == unchunked == full
logits on the tiny model, mean log-prob and reward-model scores."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from posttrain.inference import completion_self_certainty, mean_logprob, reward_model_scores, score_rollouts
from posttrain.rewards.self_certainty import masked_self_certainty
from posttrain.rollout.batch import Rollouts
from posttrain.tasks.base import Problem


def make_rollouts(prompt_lens, completion_lens, vocab=4, seed=0) -> Rollouts:
    g = torch.Generator().manual_seed(seed)
    n, P, T = len(prompt_lens), max(prompt_lens), max(completion_lens)
    prompt_ids = torch.zeros((n, P), dtype=torch.long)
    prompt_mask = torch.zeros((n, P), dtype=torch.long)
    completion_ids = torch.zeros((n, T), dtype=torch.long)
    completion_mask = torch.zeros((n, T))
    for i, (p, c) in enumerate(zip(prompt_lens, completion_lens)):
        prompt_ids[i, P - p:] = torch.randint(0, vocab, (p,), generator=g)
        prompt_mask[i, P - p:] = 1
        completion_ids[i, :c] = torch.randint(0, vocab, (c,), generator=g)
        completion_mask[i, :c] = 1
    problems = [Problem(id=f"p{i}", prompt="q", answer="1") for i in range(n)]
    return Rollouts(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids, completion_mask=completion_mask,
        group_ids=torch.arange(n), behaviour_logprobs=torch.zeros((n, T)), entropies=torch.zeros((n, T)),
        truncated=torch.zeros(n, dtype=torch.bool), texts=[f"text {i}" for i in range(n)], problems=problems,
    )


class _ConstDecoder(torch.nn.Module):
    """Hidden state 1 at every position, so the head's weight column *is* the logits."""

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return SimpleNamespace(last_hidden_state=torch.ones((*input_ids.shape, 1)))


class _FakeLM(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.decoder = _ConstDecoder()
        self.head = torch.nn.Linear(1, len(logits), bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor(logits, dtype=torch.float32)[:, None])

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.head


def test_uniform_distribution_has_zero_self_certainty():
    model = _FakeLM([0.0, 0.0, 0.0, 0.0])
    r = make_rollouts([2, 3, 1], [3, 1, 4])
    assert completion_self_certainty(model, r).tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    model = _FakeLM([2.5] * 4)  # a constant shift of the logits is still uniform
    assert completion_self_certainty(model, r).tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)


def test_peaked_distribution_by_hand():
    p = [0.97, 0.01, 0.01, 0.01]
    model = _FakeLM([math.log(x) for x in p])
    # KL(U || p) = sum_v 1/V log((1/V) / p_v) = -log V - 1/V sum_v log p_v
    by_hand = -math.log(4) - (math.log(0.97) + 3 * math.log(0.01)) / 4
    assert by_hand == pytest.approx(2.0752, abs=1e-4)
    r = make_rollouts([2, 3], [3, 1])
    assert completion_self_certainty(model, r).tolist() == pytest.approx([by_hand, by_hand], rel=1e-5)
    # higher for a more peaked distribution, and invariant to the logit offset
    flatter = _FakeLM([math.log(x) + 3.0 for x in [0.7, 0.1, 0.1, 0.1]])
    assert completion_self_certainty(flatter, r)[0] < by_hand


@pytest.fixture(scope="module")
def tiny():
    from posttrain.models.loading import load_model_and_tokenizer
    from posttrain.rollout.engine import HFRolloutEngine, SamplingParams
    from posttrain.tasks.registry import build_task

    model, tokenizer = load_model_and_tokenizer("tiny-random")
    problems = build_task({"name": "arithmetic"}).problems("test")[:3]
    engine = HFRolloutEngine(model, tokenizer, dtype=torch.float32)
    rollouts = engine.generate(problems, 3, SamplingParams(max_new_tokens=10), torch.Generator().manual_seed(0))
    assert len(set(rollouts.completion_lengths.tolist())) > 1  # ragged completions exercise the masking
    return model, rollouts


def _reference(model, r: Rollouts) -> torch.Tensor:
    """Full [N, T, V] logits in one forward, then the masked mean of KL(U || p)."""
    P, T = r.prompt_ids.shape[1], r.completion_ids.shape[1]
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    attn = torch.cat([r.prompt_mask.long(), r.completion_mask.long()], 1)
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, P - 1 : P + T - 1]
    return masked_self_certainty(logits, r.completion_mask)


@pytest.mark.parametrize("chunk_tokens,batch_size", [(1, 1), (3, 2), (7, 4), (4096, 100)])
def test_chunked_equals_unchunked_and_full_logits(tiny, chunk_tokens, batch_size):
    model, r = tiny
    ref = _reference(model, r)
    got = completion_self_certainty(model, r, chunk_tokens, batch_size=batch_size)
    assert got.shape == (len(r),)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    assert (got > 0).all()


def test_self_certainty_never_holds_more_than_a_chunk_of_logits(tiny):
    model, r = tiny
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    try:
        completion_self_certainty(model, r, chunk_tokens=5, batch_size=4)
    finally:
        hook.remove()
    assert seen and all(len(s) == 2 and s[0] <= 5 for s in seen)
    assert sum(s[0] for s in seen) == int(r.completion_mask.sum())


def test_mean_logprob_by_hand():
    r = make_rollouts([1, 1], [3, 1])
    r.behaviour_logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -9.0, -9.0]])  # padding is ignored
    assert mean_logprob(r).tolist() == pytest.approx([-2.0, -0.5])
    assert score_rollouts(r, "mean_logprob").tolist() == pytest.approx([-2.0, -0.5])


def test_reward_model_scores_and_errors():
    r = make_rollouts([1, 1, 1], [1, 1, 1])
    r.texts = ["a", "bbb", "cc"]
    assert reward_model_scores(r, lambda p, t: len(t)).tolist() == [1.0, 3.0, 2.0]
    assert score_rollouts(r, "reward_model", reward_model=lambda p, t: float(p.id == "p1")).tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="non-finite"):
        reward_model_scores(r, lambda p, t: math.nan)
    with pytest.raises(ValueError, match="needs a callable"):
        score_rollouts(r, "reward_model")
    with pytest.raises(ValueError, match="needs the model"):
        score_rollouts(r, "self_certainty")
    with pytest.raises(ValueError, match="unknown scorer"):
        score_rollouts(r, "vibes")
