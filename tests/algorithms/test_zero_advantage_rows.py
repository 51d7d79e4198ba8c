"""Rows with A = 0 everywhere are skipped by the learner without changing the update.

A GRPO group whose rewards are all equal gets A = 0 on every row; under a loss that is A times a
finite factor per row (ZERO_AT_ZERO_ADVANTAGE), those rows add nothing to the gradient, so
RLUpdate.rows_to_learn drops their forward and backward passes. Checked here: which registered
losses have that property (every registered loss, by autograd), and the update through RLUpdate on the tiny
model with the skip on and off, in one process and on two gloo ranks.
"""

from __future__ import annotations

import copy
import datetime
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from posttrain.algorithms import POLICY_LOSSES, PolicyLossConfig, PolicyLossInput
from posttrain.algorithms.losses import COV_SELECTING, ZERO_AT_ZERO_ADVANTAGE
from posttrain.config import load_config
from posttrain.distributed.data_parallel import DataParallel
from posttrain.models.tiny import tiny_model_and_tokenizer
from posttrain.rollout.engine import HFRolloutEngine, SamplingParams
from posttrain.tasks.base import Problem
from posttrain.trainers.learner import Learner
from posttrain.trainers.rl_update import RLUpdate

ZERO_ROWS, LIVE_ROWS = [1, 3], [0, 2]


def _loss_grad(name: str, inputs: dict, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, d sum(loss) / d logp) of ``name`` on ``rows`` of ``inputs``."""
    logp = inputs["logp"][rows].clone().requires_grad_()
    inp = PolicyLossInput(logprobs=logp, old_logprobs=inputs["old"][rows], advantages=inputs["adv"][rows],
                          mask=inputs["mask"][rows], behaviour_logprobs=inputs["behaviour"][rows],
                          entropy=inputs["entropy"][rows],
                          token_selection=inputs["selection"][rows] if name in COV_SELECTING else None)
    out = POLICY_LOSSES.get(name)(inp, PolicyLossConfig())
    (grad,) = torch.autograd.grad(out.loss.sum(), [logp])
    return out.loss.detach(), grad


def _inputs(seed: int) -> dict:
    """Four rows of six tokens; rows 1 and 3 have A = 0, old differs from logp (a later epoch)."""
    g = torch.Generator().manual_seed(seed)
    logp = -2.0 * torch.rand(4, 6, generator=g, dtype=torch.float64)
    old = logp + 0.5 * torch.randn(4, 6, generator=g, dtype=torch.float64)  # ratios beyond the clip bounds
    adv = torch.randn(4, 1, generator=g, dtype=torch.float64).expand(4, 6).clone()
    adv[ZERO_ROWS] = 0.0
    mask = torch.ones(4, 6, dtype=torch.float64)
    mask[0, 4:] = 0.0
    selection = torch.zeros(4, 6, dtype=torch.bool)
    selection[0, 1] = selection[1, 2] = True  # one selected token in a zero row (kl_cov penalises it)
    return dict(logp=logp, old=old, adv=adv, mask=mask, selection=selection,
                behaviour=old + 0.05 * torch.randn(4, 6, generator=g, dtype=torch.float64),
                entropy=2.0 * torch.rand(4, 6, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("name", POLICY_LOSSES.names())
def test_the_list_holds_exactly_the_losses_whose_zero_rows_add_nothing(name):
    """Listed <=> on every draw the zero rows' loss and gradient are 0 and dropping them leaves the
    other rows' gradient unchanged. dro ((logp - old)^2), kl_cov (|logp - old| on a selected token)
    and hapo (rows coupled through batch statistics) each fail one of the two."""
    holds = True
    for seed in range(5):
        x = _inputs(seed)
        loss, grad = _loss_grad(name, x, [0, 1, 2, 3])
        _, live_grad = _loss_grad(name, x, LIVE_ROWS)
        zero_rows_vanish = bool((loss[ZERO_ROWS] == 0).all() and (grad[ZERO_ROWS] == 0).all())
        rows_independent = torch.allclose(grad[LIVE_ROWS], live_grad, rtol=1e-12, atol=1e-14)
        holds = holds and zero_rows_vanish and rows_independent
    assert holds == (name in ZERO_AT_ZERO_ADVANTAGE)


# ------------------------------------------------------------------ through RLUpdate
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def batch():
    """16 rollouts of the tiny model (4 prompts x 4); groups 0 and 2 get A = 0 on every row (equal
    rewards), groups 1 and 3 seeded advantages; old log-probs noisy around the behaviour ones."""
    torch.set_num_threads(1)
    model, tok = tiny_model_and_tokenizer(seed=0)
    problems = [Problem(id=f"p{i}", prompt=f"What is {i} + {2 * i}?", answer=str(3 * i)) for i in range(4)]
    r = HFRolloutEngine(model, tok, dtype=torch.float32).generate(
        problems, 4, SamplingParams(max_new_tokens=MAX_NEW_TOKENS, stop=("a", "e", "o")), torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    mask = r.completion_mask
    adv = torch.randn(len(r), 1, generator=g) * mask
    groups = torch.unique(r.group_ids, return_inverse=True)[1]
    adv[(groups == 0) | (groups == 2)] = 0.0
    r.advantages, r.loss_mask = adv, mask
    r.old_logprobs = (r.behaviour_logprobs + 0.2 * torch.randn(mask.shape, generator=g)) * mask
    return r


def _update(batch, skip: bool, overrides: tuple[str, ...] = (), micro: int = 4, dp=None):
    """One RLUpdate.update from the same fresh tiny learner: (gradients, weights after the step, metrics)."""
    cfg = load_config(None, [f"trainer.micro_batch_size={micro}", "trainer.autocast=none", "rollout.dtype=float32",
                             "trainer.lr=1e-3", "trainer.max_grad_norm=1e9", f"rollout.max_new_tokens={MAX_NEW_TOKENS}",
                             f"trainer.skip_zero_advantage_rows={str(skip).lower()}", *overrides])
    model, _ = tiny_model_and_tokenizer(seed=1)
    learner = Learner(model, cfg.trainer, cfg.model, temperature=1.0, device=torch.device("cpu"),
                      sampler_dtype=torch.float32)
    metrics = RLUpdate(cfg, learner, dp).update(copy.deepcopy(batch), [torch.arange(len(batch))], step=0)
    grads = [g.detach().clone() for g in learner.fp32_grads()]
    return grads, [p.detach().clone() for p in learner.policy.parameters()], metrics


def _max_rel(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    diff = max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True))
    return diff / max(float(b.abs().max()) for b in want)


@pytest.mark.parametrize("loss", ["ppo_clip", "gspo"])
def test_skipping_the_zero_rows_leaves_the_update_unchanged(batch, loss):
    torch.set_num_threads(1)
    full_grads, _, full = _update(batch, False, (f"algorithm.policy_loss={loss}",))
    skip_grads, _, skipped = _update(batch, True, (f"algorithm.policy_loss={loss}",))
    assert skipped["learner/skipped_rows_frac"] == pytest.approx(0.5)  # groups 0 and 2 of 4
    assert "learner/skipped_rows_frac" not in full
    assert max(float(g.abs().max()) for g in full_grads) > 0  # a real update, not zeros on both sides
    assert _max_rel(skip_grads, full_grads) < 1e-5  # fp32, summed in another order
    assert skipped["loss/total"] == pytest.approx(full["loss/total"], rel=1e-5)
    # the tokens the learner ran (posttrain.bench counts MFU from these): groups 1 and 3 only, each
    # group's prompt once; without the skip, all four groups
    groups = torch.unique(batch.group_ids, return_inverse=True)[1]
    live = (groups == 1) | (groups == 3)
    first_of_group = [int((groups == k).nonzero()[0]) for k in range(4)]
    prompt_len = batch.prompt_mask.sum(-1)
    assert skipped["learner/completion_tokens"] == float(batch.completion_mask[live].sum())
    assert skipped["learner/prompt_tokens"] == float(prompt_len[[first_of_group[1], first_of_group[3]]].sum())
    assert full["learner/completion_tokens"] == float(batch.completion_mask.sum())
    assert full["learner/prompt_tokens"] == float(prompt_len[first_of_group].sum())


def test_a_term_that_reads_every_row_turns_the_skip_off(batch):
    """dro's (logp - old)^2 and an entropy bonus have a gradient on the zero rows: nothing is skipped."""
    torch.set_num_threads(1)
    for overrides in (("algorithm.policy_loss=dro",), ("algorithm.entropy.coef=0.01",)):
        full_grads, _, _ = _update(batch, False, overrides)
        skip_grads, _, metrics = _update(batch, True, overrides)
        assert "learner/skipped_rows_frac" not in metrics
        assert _max_rel(skip_grads, full_grads) == 0.0


def test_a_constant_batch_keeps_one_row_so_adam_steps_on_zero_gradients(batch):
    """Every row A = 0: the gradient is 0 either way, but Adam's step on a zero gradient still moves
    the weights once it has momentum; here (first step, no momentum) it must leave them as they are
    and leave zero gradients, not missing ones, for the optimizer and the all-reduce."""
    torch.set_num_threads(1)
    constant = copy.deepcopy(batch)
    constant.advantages = torch.zeros_like(constant.advantages)
    grads, weights, metrics = _update(constant, True, ("trainer.weight_decay=0.1",))
    _, full_weights, _ = _update(constant, False, ("trainer.weight_decay=0.1",))
    assert metrics["learner/skipped_rows_frac"] == pytest.approx(1 - 1 / len(batch))
    assert all(g is not None and float(g.abs().max()) == 0.0 for g in grads)
    assert _max_rel(weights, full_weights) == 0.0  # weight decay applied on both sides


# ------------------------------------------------------------------ two gloo ranks
def _rank_main(rank: int, world: int, port: int, batch, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        dp = DataParallel.from_process_group()
        constant = copy.deepcopy(batch)
        constant.advantages = torch.zeros_like(constant.advantages)
        out = {"half": _update(batch, True, dp=dp), "constant": _update(constant, True, dp=dp)}
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_skip_the_same_rows_and_sum_to_the_one_process_gradient(batch, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(2, port, batch, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    torch.set_num_threads(1)
    ref_grads, _, _ = _update(batch, False)
    for out in ranks:
        grads, _, metrics = out["half"]
        assert metrics["learner/skipped_rows_frac"] == pytest.approx(0.5)
        assert _max_rel(grads, ref_grads) < 1e-5
        grads, _, metrics = out["constant"]  # one row kept per rank, both ranks pass
        assert metrics["learner/skipped_rows_frac"] == pytest.approx(1 - 2 / len(batch))
        assert all(float(g.abs().max()) == 0.0 for g in grads)
