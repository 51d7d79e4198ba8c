"""KL-Cov / Clip-Cov select their tokens over the whole mini-batch (issue 19).

The paper (The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models,
arXiv:2505.22617) penalises a fraction of the batch's tokens; choosing them per micro-batch made
the fraction depend on the micro-batch size (max(1, floor(ratio * n)) per micro-batch). Here: the
selection by hand, the losses with a given selection split into micro-batches, and RLUpdate on
the tiny model with micro-batches of 1 against the whole batch, in one process and on 2 gloo ranks.
"""

from __future__ import annotations

import datetime
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from posttrain.algorithms import POLICY_LOSSES, PolicyLossConfig, PolicyLossInput, aggregate
from posttrain.algorithms.losses import select_cov_tokens
from posttrain.config import load_config
from posttrain.distributed.data_parallel import DataParallel
from posttrain.models.tiny import tiny_model_and_tokenizer
from posttrain.rollout.engine import HFRolloutEngine, SamplingParams
from posttrain.tasks.base import Problem
from posttrain.trainers.learner import Learner
from posttrain.trainers.rl_update import RLUpdate

# ------------------------------------------------------------------ by hand
# Two rows of two tokens. A = 1, .5 | -1, -1 (mean -.125 -> centred 1.125, .625 | -.875, -.875)
# logp = -.4, -2 | -.5, -2.1 (mean -1.25 -> centred .85, -.75 | .75, -.85)
# cov = .95625, -.46875 | -.65625, .74375 ; old = logp - .1 (r = e^.1 everywhere)
LOGP = [[-0.4, -2.0], [-0.5, -2.1]]
ADV = [[1.0, 0.5], [-1.0, -1.0]]


def _hand():
    lp = torch.tensor(LOGP, dtype=torch.float64)
    return lp, lp - 0.1, torch.tensor(ADV, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)


def test_kl_cov_selection_is_the_batch_top_k():
    lp, old, adv, mask = _hand()
    g = torch.Generator().manual_seed(0)
    # ratio .25 of 4 tokens: k = 1 -> token (0, 0), cov .95625. Per row (the old per-micro-batch
    # selection) each row would get max(1, floor(.25 * 2)) = 1 token: twice the fraction.
    sel = select_cov_tokens("kl_cov", old, adv, mask, PolicyLossConfig(kl_cov_ratio=0.25), g)
    assert sel.tolist() == [[True, False], [False, False]]
    # ratio .5: k = 2 -> the two largest, (0, 0) .95625 and (1, 1) .74375
    sel = select_cov_tokens("kl_cov", old, adv, mask, PolicyLossConfig(kl_cov_ratio=0.5), g)
    assert sel.tolist() == [[True, False], [False, True]]
    # masked tokens never count: masking (0, 0) moves the means; n = 3 -> k = max(1, floor(.5 * 3)) = 1
    # A = .5 | -1, -1 (mean -.5: centred 1 | -.5, -.5); logp = -2 | -.5, -2.1 -> old -2.1 | -.6, -2.2
    # (mean -1.6333: centred -.4667 | 1.0333, -.5667) -> cov -.4667 | -.5167, .2833 -> (1, 1)
    masked = torch.tensor([[0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    sel = select_cov_tokens("kl_cov", old, adv, masked, PolicyLossConfig(kl_cov_ratio=0.5), g)
    assert sel.tolist() == [[False, False], [False, True]]


def test_clip_cov_selection_draws_from_the_window_reproducibly():
    lp, old, adv, mask = _hand()
    # window (.7, 1.0) holds (0, 0) .95625 and (1, 1) .74375; k = max(1, floor(.25 * 4)) = 1
    cfg = PolicyLossConfig(clip_cov_ratio=0.25, clip_cov_lb=0.7, clip_cov_ub=1.0)
    picks = set()
    for seed in range(20):
        a = select_cov_tokens("clip_cov", old, adv, mask, cfg, torch.Generator().manual_seed(seed))
        b = select_cov_tokens("clip_cov", old, adv, mask, cfg, torch.Generator().manual_seed(seed))
        assert torch.equal(a, b)  # same seed, same tokens (what every rank relies on)
        assert int(a.sum()) == 1
        picks.add(tuple(a.flatten().nonzero().squeeze(-1).tolist()))
    assert picks == {(0,), (3,)}  # both window tokens get drawn, nothing outside it ever is
    # k larger than the window: every candidate, and only those
    cfg = PolicyLossConfig(clip_cov_ratio=1.0, clip_cov_lb=0.7, clip_cov_ub=1.0)
    sel = select_cov_tokens("clip_cov", old, adv, mask, cfg, torch.Generator().manual_seed(0))
    assert sel.tolist() == [[True, False], [False, True]]
    with pytest.raises(ValueError, match="not 'ppo_clip'"):
        select_cov_tokens("ppo_clip", old, adv, mask, cfg, torch.Generator())


@pytest.mark.parametrize("name", ["kl_cov", "clip_cov"])
def test_a_given_selection_makes_the_loss_micro_batch_invariant(name):
    lp, old, adv, mask = _hand()
    sel = torch.tensor([[True, False], [False, False]])
    cfg = PolicyLossConfig(kl_cov_ratio=0.25, clip_cov_ratio=0.25, clip_cov_lb=0.7, clip_cov_ub=1.0)
    counts = dict(num_tokens=4.0, num_seqs=2.0, norm_length=2.0)

    def run(splits):
        leaf = lp.clone().requires_grad_()
        total = torch.zeros((), dtype=torch.float64)
        for rows in splits:
            x = PolicyLossInput(logprobs=leaf[rows], old_logprobs=old[rows], advantages=adv[rows], mask=mask[rows],
                                token_selection=sel[rows])
            total = total + aggregate(POLICY_LOSSES.get(name)(x, cfg).loss, mask[rows], "token-sum", **counts)
        total.backward()
        return float(total.detach()), leaf.grad

    whole, g_whole = run([[0, 1]])
    split, g_split = run([[1], [0]])
    r = math.exp(0.1)
    # kl_cov: -r A everywhere, + |.1| on (0, 0), gradient -r A + 1 there (sign(logp - old) = 1)
    # clip_cov: PPO (r = e^.1 inside the clip range): -r A, (0, 0) detached: gradient 0 there
    want_loss = -r * (1 + 0.5 - 1 - 1) + (0.1 if name == "kl_cov" else 0.0)
    want_grad = [[-r + 1.0 if name == "kl_cov" else 0.0, -0.5 * r], [r, r]]
    assert whole == pytest.approx(want_loss) and split == pytest.approx(want_loss)
    assert torch.allclose(g_whole, torch.tensor(want_grad, dtype=torch.float64))
    assert torch.allclose(g_split, g_whole)


# ------------------------------------------------------------------ through RLUpdate
MAX_NEW_TOKENS = 16
RATIO = 0.05  # of ~100-200 tokens: a handful, so a per-micro-batch minimum of 1 would show


def _batch(with_old: bool = True):
    """16 rollouts of the tiny model (4 prompts x 4, varied lengths), seeded advantages, and old
    log-probs 0.2-nat-noisy around the behaviour ones (or none: the trainer's single-pass mode)."""
    model, tok = tiny_model_and_tokenizer(seed=0)
    problems = [Problem(id=f"p{i}", prompt=f"What is {i} + {3 * i}?", answer=str(4 * i)) for i in range(4)]
    r = HFRolloutEngine(model, tok, dtype=torch.float32).generate(
        problems, 4, SamplingParams(max_new_tokens=MAX_NEW_TOKENS, stop=("a", "e", "1", "o")),
        torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    mask = r.completion_mask
    r.rewards = torch.rand(len(r), generator=g)
    r.advantages = torch.randn(len(r), 1, generator=g) * mask * 3.0
    noisy = (r.behaviour_logprobs + 0.2 * torch.randn(mask.shape, generator=g)) * mask
    r.old_logprobs = noisy if with_old else None
    r.loss_mask = mask
    return r


def _update(loss: str, micro: int, batch, dp=None) -> tuple[list[torch.Tensor], dict]:
    """One RLUpdate.update (one epoch, one mini-batch) from the same fresh tiny learner; returns its
    gradients (kept after the step) and metrics."""
    cfg = load_config(None, [f"trainer.micro_batch_size={micro}", "trainer.autocast=none", "rollout.dtype=float32",
                             "trainer.lr=1e-3", "trainer.max_grad_norm=1e9", f"rollout.max_new_tokens={MAX_NEW_TOKENS}",
                             f"algorithm.policy_loss={loss}", f"algorithm.loss.kl_cov_ratio={RATIO}",
                             f"algorithm.loss.clip_cov_ratio={RATIO}"])
    model, _ = tiny_model_and_tokenizer(seed=1)
    learner = Learner(model, cfg.trainer, cfg.model, temperature=1.0, device=torch.device("cpu"),
                      sampler_dtype=torch.float32)
    metrics = RLUpdate(cfg, learner, dp).update(batch, [torch.arange(len(batch))], step=3)
    return [g.detach().clone() for g in learner.fp32_grads()], metrics


def _expected_fraction(loss: str, batch) -> float:
    """k / n with n the mini-batch's valid tokens and k = max(1, floor(ratio n)), computed here from
    the definition (for clip_cov, after checking the window holds at least k tokens)."""
    m = batch.loss_mask > 0
    n = int(m.sum())
    k = max(1, math.floor(RATIO * n))
    if loss == "clip_cov":
        lp = batch.old_logprobs if batch.old_logprobs is not None else batch.behaviour_logprobs
        a, l = batch.advantages[m], lp[m]
        cov = (a - a.mean()) * (l - l.mean())
        assert int(((cov > 1.0) & (cov < 5.0)).sum()) >= k  # the paper's window (1, 5) has enough tokens
    return k / n


def _max_rel(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    diff = max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True))
    return diff / max(float(b.abs().max()) for b in want)


@pytest.fixture(scope="module")
def batch():
    torch.set_num_threads(1)
    return _batch()


@pytest.mark.parametrize("loss,with_old", [("kl_cov", True), ("clip_cov", True), ("kl_cov", False)])
def test_update_with_micro_batches_of_one_equals_the_whole_batch_update(loss, with_old, batch):
    torch.set_num_threads(1)
    b = batch if with_old else _batch(with_old=False)
    want = _expected_fraction(loss, b)
    whole_grads, whole = _update(loss, len(b), b)
    one_grads, one = _update(loss, 1, b)
    # the fraction penalised is the configured one over the mini-batch, whatever the micro-batch
    # (per micro-batch of one row it was max(1, ...) = 1 token per row: 16 tokens, not k)
    assert whole[f"loss/{loss}_frac"] == pytest.approx(want, abs=1e-7)
    assert one[f"loss/{loss}_frac"] == pytest.approx(want, abs=1e-7)
    # and the same tokens: the gradients agree (fp32, summed in another order)
    assert _max_rel(one_grads, whole_grads) < 1e-5
    assert whole["loss/policy"] * 1 == pytest.approx(one["loss/policy"] * len(b), rel=1e-5)


# ------------------------------------------------------------------ two gloo ranks
WORLD = 2


def _rank_main(rank: int, world: int, port: int, batch, out_dir: str) -> None:
    torch.set_num_threads(1)  # equal thread counts: equal bits on every rank
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        out = {loss: _update(loss, 3, batch, DataParallel.from_process_group()) for loss in ("kl_cov", "clip_cov")}
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_select_what_one_process_selects(batch, tmp_path):
    mp.spawn(_rank_main, args=(WORLD, _free_port(), batch, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    torch.set_num_threads(1)
    for loss in ("kl_cov", "clip_cov"):
        ref_grads, ref = _update(loss, len(batch), batch)
        for grads, metrics in (r[loss] for r in ranks):
            assert metrics[f"loss/{loss}_frac"] == pytest.approx(_expected_fraction(loss, batch), abs=1e-7)
            assert _max_rel(grads, ref_grads) < 1e-5  # the SUM over ranks is the one-process gradient
        assert all(torch.equal(a, b) for a, b in zip(ranks[0][loss][0], ranks[1][loss][0], strict=True))


# ------------------------------------------------------------------ corrections over the whole batch
def _prepared_update(micro: int, batch) -> tuple[list[torch.Tensor], dict, object]:
    """RLUpdate.prepare + update with batch-normalised token TIS; the batch is copied, so each call
    starts from the same rollouts."""
    import copy

    cfg = load_config(None, [f"trainer.micro_batch_size={micro}", "trainer.autocast=none", "rollout.dtype=float32",
                             "trainer.lr=1e-3", "trainer.max_grad_norm=1e9", f"rollout.max_new_tokens={MAX_NEW_TOKENS}",
                             "algorithm.correction.name=tis_token", "algorithm.correction.batch_normalize=true"])
    model, _ = tiny_model_and_tokenizer(seed=1)
    learner = Learner(model, cfg.trainer, cfg.model, temperature=1.0, device=torch.device("cpu"),
                      sampler_dtype=torch.float32)
    upd = RLUpdate(cfg, learner)
    b = copy.deepcopy(batch)
    upd.prepare(b, step=3)
    metrics = upd.update(b, [torch.arange(len(b))], step=3)
    return [g.detach().clone() for g in learner.fp32_grads()], metrics, b


def test_batch_normalised_is_weights_are_normalised_over_the_whole_batch(batch):
    """The weights come from one correction over the batch (prepare), so micro-batching cannot
    renormalise them: per micro-batch of one row, each row was rescaled to mean 1 on its own."""
    torch.set_num_threads(1)
    whole_grads, _, prepared = _prepared_update(len(batch), batch)
    one_grads, _, _ = _prepared_update(1, batch)
    kept = prepared.loss_mask > 0
    w = prepared.is_weights[kept]
    assert float(w.mean()) == pytest.approx(1.0, abs=1e-5)
    assert float(w.std()) > 0.05  # the weights are not trivially 1: the learner and sampler differ
    assert _max_rel(one_grads, whole_grads) < 1e-5
