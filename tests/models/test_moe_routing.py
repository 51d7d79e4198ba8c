"""Mixture-of-Experts routing (models/moe.py, issue 19 item 4): the tiny Mixtral model, routing
capture and replay (R3, arXiv:2510.11370), the routing-mismatch metric, the load-balancing loss
and the router-aware IS factor, each on hand-computed values or through the real sampler and learner.
"""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.config import ModelConfig, TrainerConfig
from posttrain.models.logprobs import uses_fast_decoder
from posttrain.models.moe import (
    UNROUTED,
    RoutingCapture,
    is_moe,
    load_balancing_loss,
    moe_shape,
    router_distance,
    router_is_factor,
    routing_mismatch,
)
from posttrain.models.loading import load_model_and_tokenizer
from posttrain.models.tiny import tiny_model_and_tokenizer, tiny_moe_model_and_tokenizer
from posttrain.rollout.batch import Rollouts
from posttrain.rollout.engine import HFRolloutEngine, SamplingParams
from posttrain.tasks.base import Problem
from posttrain.trainers.learner import Learner, trim


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_routing_mismatch_hand_computed():
    # 1 sample, 3 tokens, 2 layers, top-2. Token 0: same sets in both layers (layer 0 in another
    # order); token 1: layer 0 differs ({1,2} vs {1,3}); token 2: never routed by the sampler.
    sampler = torch.tensor([[[[0, 1], [2, 3]], [[1, 2], [0, 3]], [[UNROUTED, UNROUTED]] * 2]])
    learner = torch.tensor([[[[1, 0], [2, 3]], [[1, 3], [0, 3]], [[0, 1], [0, 1]]]])
    out = routing_mismatch(sampler, learner, torch.ones(1, 3))
    assert out == {"mismatch": 1 / 4, "any_layer": 1 / 2, "tokens": 2.0}  # 1 of 4 (token, layer) pairs
    # masked token 1 out: only token 0 counts, and it matches
    assert routing_mismatch(sampler, learner, torch.tensor([[1.0, 0.0, 1.0]])) == \
        {"mismatch": 0.0, "any_layer": 0.0, "tokens": 1.0}


def test_load_balancing_loss_hand_computed():
    # one layer, E = 2, k = 1; token 1: p = (.5, .5), token 2: p = (.75, .25), both sent to expert 0;
    # token 3 is padding. f = (1, 0), P = (.625, .375): L = E * sum f P = 2 * .625 = 1.25
    logits = [torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [9.0, -9.0]], requires_grad=True)]
    selected = torch.tensor([[[0]], [[0]], [[1]]])
    loss = load_balancing_loss(logits, selected, torch.tensor([1, 1, 0]))
    assert loss.item() == pytest.approx(1.25)
    loss.backward()  # P carries the gradient: L = 2 * mean_x p_0(x) = p_0(x1) + p_0(x2), so
    g = logits[0].grad  # dL/dz_{x1,0} = p_0 (1 - p_0) = .25; nothing on the padding row
    assert g[0, 0].item() == pytest.approx(0.25) and g[1, 0].item() == pytest.approx(0.75 * 0.25)
    assert g[2].abs().sum() == 0
    # balanced routing gives k: 2 tokens, uniform p, one to each expert
    even = load_balancing_loss([torch.zeros(2, 2)], torch.tensor([[[0]], [[1]]]), torch.ones(2))
    assert even.item() == pytest.approx(1.0)


def test_router_is_factor_hand_computed():
    # L = 1, k = 2. Token 0: |.4 - .5| + |.3 - .3| = .1; token 1: the sampler routed none -> D = 0
    rollout = torch.tensor([[[[0.5, 0.3]], [[-1.0, -1.0]]]])
    train = torch.tensor([[[[0.4, 0.3]], [[0.9, 0.1]]]])
    D = router_distance(rollout, train)
    assert torch.allclose(D, torch.tensor([[0.1, 0.0]]))
    factor, metrics = router_is_factor(D, torch.tensor([[1.0, 1.0]]), beta=2.0)
    assert torch.allclose(factor, torch.tensor([[math.exp(-0.2), 1.0]]))
    assert metrics["moe/router_distance"] == pytest.approx(0.05)


def test_tiny_moe_model_and_alias():
    model, tokenizer = load_model_and_tokenizer("tiny-random-moe")
    assert is_moe(model) and moe_shape(model) == (2, 4, 2)
    assert not is_moe(tiny_model_and_tokenizer()[0])
    # the lean decoder has no MoE block: sampler and learner take transformers' forward
    assert not uses_fast_decoder(model.get_decoder(), "auto")
    assert len(tokenizer) == model.config.vocab_size


def test_replay_forces_experts_and_keeps_the_gate_differentiable():
    model, _ = tiny_moe_model_and_tokenizer()
    ids = torch.randint(5, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    with RoutingCapture(model) as cap:
        base = model(ids).logits
        own = cap.take()["used"]
    with RoutingCapture(model, replay=own) as cap:  # replaying its own routing changes nothing
        assert torch.equal(model(ids).logits, base)
    forced = (own + 1) % 4  # every token to two other experts
    model.train()
    with RoutingCapture(model, replay=forced) as cap:
        out = model(ids).logits
        got = cap.take()
    assert torch.equal(got["used"], forced) and not torch.equal(got["own"], forced)
    assert not torch.allclose(out, base)
    out.sum().backward()
    gate = model.model.layers[0].mlp.gate.weight.grad
    assert gate is not None and gate.abs().sum() > 0 and torch.isfinite(gate).all()
    with pytest.raises(RuntimeError, match="routing replay"):  # a routing for other tokens is refused
        with RoutingCapture(model, replay=forced[:5]):
            model(ids)


def _sample(dtype: torch.dtype, prompts: int = 6, n: int = 4, tokens: int = 16):
    model, tokenizer = tiny_moe_model_and_tokenizer()
    engine = HFRolloutEngine(model, tokenizer, dtype=dtype)
    problems = [Problem(id=str(i), prompt=f"What is {i} + {2 * i}?", answer=str(3 * i)) for i in range(prompts)]
    batch = engine.generate(problems, n, SamplingParams(max_new_tokens=tokens),
                            generator=torch.Generator().manual_seed(1))
    return model, batch


def _learner(model, sampler_dtype):
    return Learner(model, TrainerConfig(autocast="none"), ModelConfig(), temperature=1.0,
                   device=torch.device("cpu"), sampler_dtype=sampler_dtype)


def test_sampler_records_routing():
    model, batch = _sample(torch.float32, prompts=2, n=2, tokens=6)
    N, T = batch.completion_ids.shape
    assert batch.completion_routing.shape == (N, T, 2, 2) and batch.prompt_routing.shape[:2] == batch.prompt_ids.shape
    lengths = batch.completion_lengths.long()
    for i in range(N):  # every token fed forward is routed; the last one (never an input) is not
        routed = (batch.completion_routing[i] >= 0).all(-1).all(-1)
        assert routed[: lengths[i] - 1].all() and not routed[lengths[i] - 1:].any()
    assert ((batch.prompt_routing >= 0) == batch.prompt_mask.bool()[..., None, None]).all()  # pads unrouted
    probs = batch.completion_router_probs[batch.completion_routing >= 0]
    assert ((probs > 0) & (probs < 1)).all()
    # select / concat / trim keep the routing aligned with its tokens (-1 fills the new padding)
    both = Rollouts.concat([batch.select([0]), batch.select([1, 2])])
    assert torch.equal(both.completion_routing[1:, :T], batch.completion_routing[1:3])
    short = trim(batch.select([int(lengths.argmin())]))
    assert short.completion_routing.shape[1] == short.completion_ids.shape[1] == int(lengths.min())
    assert short.prompt_routing.shape[1] == short.prompt_ids.shape[1]


def test_replay_matches_the_sampler_fp32():
    # same precision on both sides: with replay, the learner reproduces the sampler's log-probs
    model, batch = _sample(torch.float32, prompts=2, n=2, tokens=8)
    learner = _learner(model, torch.float32)
    learner.moe.replay = True
    logp = learner.logprobs(batch)
    assert ((logp - batch.behaviour_logprobs).abs() * batch.completion_mask).max() < 1e-4
    assert learner.moe.metrics()["moe/routing_mismatch"] == 0.0


def test_replay_on_a_bf16_sampler_vs_fp32_learner():
    # bf16 sampler, fp32 learner (the MISMATCH of the registry-through-trainer test)
    model, batch = _sample(torch.bfloat16)
    mask = batch.completion_mask
    results = {}
    for replay in (False, True):
        learner = _learner(model, torch.bfloat16)
        learner.moe.replay = replay
        diff = (learner.logprobs(batch) - batch.behaviour_logprobs).abs() * mask
        results[replay] = (learner.moe.metrics(), float(diff.max()), float(diff.sum() / mask.sum()))
    (off, off_max, off_mean), (on, on_max, on_mean) = results[False], results[True]
    print(f"\nbf16 sampler / fp32 learner: routing mismatch off {off['moe/routing_mismatch']:.4f} "
          f"(any layer {off['moe/routing_mismatch_any_layer']:.4f}), on {on['moe/routing_mismatch']:.4f}; "
          f"|logp diff| max/mean off {off_max:.4f}/{off_mean:.5f}, on {on_max:.4f}/{on_mean:.5f}")
    assert off["moe/routing_mismatch"] > 0  # precision alone flips some tokens' experts
    assert on["moe/routing_mismatch"] == 0.0 and on["moe/routing_mismatch_any_layer"] == 0.0
    assert on["moe/routing_mismatch_unreplayed"] > 0  # the learner's router alone would still differ
    assert on_max < 0.02  # bf16 precision: what is left once the experts agree
    assert on_mean < off_mean and on_max < off_max


def test_aux_loss_and_distance_in_the_learner_passes():
    model, batch = _sample(torch.float32, prompts=2, n=2, tokens=6)
    learner = _learner(model, torch.float32)
    learner.moe.keep_aux = True
    seen = []
    learner.forward_backward(batch, lambda micro, logp, ent: (seen.append(learner.moe.aux) or logp.sum()) * 0
                             + learner.moe.aux)
    assert seen and all(a is not None and 1.0 <= float(a.detach()) <= 4.0 for a in seen)  # k=2 balanced, <= E
    grad = learner.policy.model.layers[0].mlp.gate.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    D = learner.router_distances(batch)  # same weights and precision as the sampler: D ~ 0
    assert D.shape == batch.completion_ids.shape and float(D.max()) < 1e-4
