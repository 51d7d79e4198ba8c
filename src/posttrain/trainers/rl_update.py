"""What the learner does with one batch of scored rollouts: advantages, then PPO updates.

    rl_update.learn(rollouts, orders, step, baseline)
        old / ref log-probs, values, entropies (only when needed)    # learner passes, row-sharded
        rollouts.advantages = ADVANTAGES[estimator](...)             # [N, T], on the whole batch
        for epoch, mini-batch (rows from ``orders``):
            kl_cov / clip_cov: token selection over the whole mini-batch     # select_cov_tokens
            learner.forward_backward(my rows of the mini-batch, policy loss + kl + entropy)
            SUM the gradients over ranks; clip; learner.optim_step(lr schedule)
        adaptive KL / entropy controllers <- this step's metrics

Every data-parallel learner rank runs this same code on the same batch (SPMD) through a
``DataParallel`` (posttrain.distributed.data_parallel); in one process it is
``DataParallel.single()`` and every collective is a no-op. Batch statistics (group-normalised
advantages, the 80/20 entropy mask) are computed on the whole batch, from log-prob passes each
rank runs on its rows and all-gathers; losses are normalised by the whole mini-batch's counts,
so the SUM of the ranks' gradients is the one-process gradient (the argument is in
data_parallel's docstring). KL-Cov / Clip-Cov's token selection, which the paper makes over the
batch, is made once per mini-batch over all of it (every rank holds the whole batch and makes the
same one, Clip-Cov's random draw from a generator seeded by (seed, step, epoch, mini-batch)), and
each micro-batch's loss gets its rows of it: neither the micro-batch size nor the number of ranks
changes which tokens are penalised. Metrics are pooled over ranks, so the controllers, which read
them, move identically everywhere and the replicas stay bit-identical. The mini-batch orders come
from the driver, whose generator also seeds sampling.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch

from posttrain.algorithms import (
    ADVANTAGES,
    CORRECTIONS,
    POLICY_LOSSES,
    AdvantageInput,
    CorrectionInput,
    PolicyLossInput,
    aggregate,
    kl_estimate,
)
from posttrain.algorithms.advantages_otb import NEEDS_SUM_PI2
from posttrain.algorithms.advantages_pear import phase_entropies, pear_penalty, think_phases
from posttrain.algorithms.advantages_token import gae_returns, value_loss
from posttrain.algorithms.advantages_turn import turn_credit
from posttrain.algorithms.corrections import mismatch_metrics
from posttrain.algorithms.losses import COV_SELECTING, ZERO_AT_ZERO_ADVANTAGE, select_cov_tokens
from posttrain.algorithms.overlong import dapo_overlong_penalty, mask_truncated
from posttrain.algorithms.regularizers import AdaptiveEntropyController, AdaptiveKLController, kl_in_reward, \
    siren_loss, siren_selected_entropy, top_entropy_mask
from posttrain.config import RLConfig
from posttrain.distributed.data_parallel import DataParallel
from posttrain.evaluation.runner import sample_answer
from posttrain.models.moe import router_is_factor
from posttrain.rollout.batch import Rollouts
from posttrain.selection import build_selector
from posttrain.trainers.learner import Learner



def selection_seed(seed: int, step: int, epoch: int, mini_batch: int) -> int:
    """Seed of Clip-Cov's draw for one mini-batch: a function of the run's seed and the position
    only, so every rank draws the same tokens and a resumed run draws what the straight run did."""
    return ((((seed * 1_000_003) + step) * 1_009 + epoch) * 1_009 + mini_batch) % 2**63


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps produced a non-finite loss or gradient."""


ENTROPY_LOSSES = ("sspo", "hapo")  # policy losses that read the learner's token entropies


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base LR before optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


def step_or_skip(learner: Learner, loss: float, grad_norm: float, streak: int, step: int, tc) -> tuple[dict, int]:
    """The optimizer step of the supervised and preference trainers (sft, dpo, ei, online dpo):
    a non-finite loss or gradient skips the step (gradients dropped); ``tc.max_nonfinite_steps``
    of them in a row raise. Returns (metrics, the new streak)."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return learner.optim_step(lr_factor(step, tc.steps, tc.warmup_steps, tc.lr_schedule)), 0
    learner.zero_grad()
    streak += 1
    if streak >= tc.max_nonfinite_steps:
        raise NonFiniteLossError(f"{streak} consecutive non-finite loss/gradient steps at step {step + 1}; lower "
                                 "trainer.lr or check the data")
    return {"nonfinite_skipped": 1.0}, streak


def old_logprobs_mode(cfg: RLConfig) -> str:
    """``trainer.old_logprobs``; auto = "current" when the policy cannot move before the loss
    (one epoch, one mini-batch: old = current.detach() exactly, no extra pass) and no correction
    needs the old log-probs before the update, else "recompute". A correction's rejection mask
    must be known before the loss so that the token count normalising it counts only kept tokens
    (verl computes its rollout corrections from recomputed old log-probs too). An estimator that
    reads sum_v pi_v^2 (NEEDS_SUM_PI2) gets "recompute": that pass runs anyway, before the loss."""
    mode = cfg.trainer.old_logprobs
    if mode == "auto":
        one_pass = cfg.trainer.ppo_epochs == 1 and cfg.trainer.mini_batches == 1
        return "current" if one_pass and cfg.algorithm.correction.name is None \
            and cfg.algorithm.advantage_estimator not in NEEDS_SUM_PI2 else "recompute"
    return mode


def mini_batch_orders(cfg: RLConfig, n: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One row order per PPO epoch (identity when there is a single epoch and mini-batch)."""
    tc = cfg.trainer
    if tc.ppo_epochs == 1 and tc.mini_batches == 1:
        return [torch.arange(n)]
    return [torch.randperm(n, generator=generator, device=generator.device).cpu() for _ in range(tc.ppo_epochs)]


class RLUpdate:
    """The learner side of one RL step; its state (controllers, non-finite streak) is checkpointed."""

    def __init__(self, cfg: RLConfig, learner: Learner, dp: Optional[DataParallel] = None, tokenizer=None):
        self.cfg, self.learner = cfg, learner
        self.dp = dp or DataParallel.single()
        self.kl_ctl = AdaptiveKLController(cfg.algorithm.kl)
        self.entropy_ctl = AdaptiveEntropyController(cfg.algorithm.entropy)
        self.nonfinite_streak = 0
        self.siren_anchor: Optional[float] = cfg.algorithm.entropy.siren_anchor  # None: set at the first step
        self._siren_deviation = 0.0  # this mini-batch's H_peak - H_anchor at the rollout weights
        ent = cfg.algorithm.entropy
        self._siren_top_p = ent.siren_top_p if ent.siren else None  # the learner's entropies become nucleus ones
        self._siren_entropies: Optional[torch.Tensor] = None  # [N, T] SIREN's, at the rollout weights (prepare)
        if self._siren_top_p is not None and cfg.algorithm.policy_loss in ENTROPY_LOSSES:
            raise ValueError(f"algorithm.policy_loss {cfg.algorithm.policy_loss} reads the learner's full-vocabulary "
                             "entropy, but with algorithm.entropy.siren_top_p the learner measures each token's "
                             "nucleus entropy: set algorithm.entropy.siren_top_p: null or choose another policy loss")
        # PEAR splits each completion at the closing tag's tokens: the tokenizer's encoding of it
        self.think_close_ids = None
        if cfg.algorithm.advantage_estimator == "pear" and tokenizer is not None:
            self.think_close_ids = list(tokenizer.encode(cfg.algorithm.advantage.pear_close_tag,
                                                         add_special_tokens=False))
        self.correction_metrics: dict[str, float] = {}  # this step's, from prepare()
        self.sft: Optional[Rollouts] = None  # this step's HPT demonstrations (learn's sft)
        selector = build_selector(cfg.selection, cfg.rollout.num_completions)
        self.token_selector = selector if selector.selects_tokens else None
        self._configure_moe()

    def _configure_moe(self) -> None:
        """``algorithm.moe`` onto the learner's MoE routing (models/moe.py); an error on a dense model."""
        moe = self.cfg.algorithm.moe
        if self.learner.moe is None:
            if moe.active:
                raise ValueError(f"algorithm.moe (routing_replay, aux_loss_coef, router_is_beta) needs a "
                                 f"Mixture-of-Experts model, and model.name={self.cfg.model.name} has no MoE layers; "
                                 f"use an MoE model (e.g. model.name=tiny-random-moe) or turn them off")
            return
        self.learner.moe.replay = moe.routing_replay
        self.learner.moe.keep_aux = moe.aux_loss_coef > 0

    def state(self) -> dict:
        return {"nonfinite_streak": self.nonfinite_streak, "kl_coef": self.kl_ctl.value,
                "entropy_coef": self.entropy_ctl.value, "siren_anchor": self.siren_anchor}

    def load_state(self, state: dict) -> None:
        self.nonfinite_streak = int(state["nonfinite_streak"])
        self.kl_ctl.value = float(state["kl_coef"])
        self.entropy_ctl.value = float(state["entropy_coef"])
        if state.get("siren_anchor") is not None:  # absent from checkpoints written before SIREN
            self.siren_anchor = float(state["siren_anchor"])

    def learn(self, rollouts: Optional[Rollouts], orders: list[torch.Tensor], step: int,
              baseline: Optional[torch.Tensor] = None, sft: Optional[Rollouts] = None) -> dict[str, float]:
        """Prepare ``rollouts`` (rewards filled) and update on them; ``step`` is 0-based. ``sft``:
        HPT's demonstrations, whose token-mean NLL joins the (single) update (trainers/hybrid.py);
        with it, ``rollouts`` may be None (every prompt gated to SFT)."""
        comm0 = self.dp.comm_s
        self.sft = sft
        if rollouts is None:
            return self.update(None, orders, step)
        moe = self.learner.moe
        if moe is not None:  # routing mismatch: from the passes at the rollout weights (prepare's) when
            moe.reset()      # there are any, else from the training passes
        self.prepare(rollouts, baseline, step)
        routing = dict(moe.counts) if moe is not None and moe.counts.get("tokens") else None
        metrics = self.update(rollouts, orders, step)
        metrics.update(self.correction_metrics)
        if moe is not None:
            counts = routing or moe.counts
            if counts.get("tokens"):  # token-weighted over ranks
                metrics.update(self.dp.mean_metrics(*moe.pooled(counts)))
            moe.aux = None
        if "kl/mean" in metrics:
            metrics["kl/coef"] = self.kl_ctl.update(metrics["kl/mean"], len(rollouts))
        # Adaptive: updated every step, also at 0 (a coefficient at its floor must rise again when
        # the entropy falls below the target, the collapse Skywork-OR1's controller exists to catch).
        if "entropy/learner" in metrics and (self.entropy_ctl.value > 0 or self.cfg.algorithm.entropy.adaptive):
            metrics["entropy/coef"] = self.entropy_ctl.update(metrics["entropy/learner"])
        if self.dp.world > 1:
            metrics["time/collective_s"] = self.dp.comm_s - comm0
        return metrics

    # ------------------------------------------------------------------ batch statistics
    def prepare(self, rollouts: Rollouts, baseline: Optional[torch.Tensor] = None, step: int = 0) -> None:
        """Old / ref log-probs, overlong penalty, advantages (and critic returns), loss mask."""
        cfg, alg, learner, dp = self.cfg, self.cfg.algorithm, self.learner, self.dp
        mode = old_logprobs_mode(cfg)
        sum_pi2 = None
        if alg.advantage_estimator in NEEDS_SUM_PI2:
            # sum_v pi_v^2 comes out of the same fused pass as the old log-probs (no second pass)
            both = dp.gather_rows(rollouts, learner.logprobs_and_sum_pi2)
            sum_pi2 = both[..., 1]
            if mode == "recompute":
                rollouts.old_logprobs = both[..., 0]
        elif mode == "recompute":
            rollouts.old_logprobs = dp.gather_rows(rollouts, learner.logprobs)
        elif mode == "behaviour":
            rollouts.old_logprobs = rollouts.behaviour_logprobs
        if learner.ref is not None:
            rollouts.ref_logprobs = dp.gather_rows(rollouts, lambda b: learner.logprobs(b, "ref"))
        mask = rollouts.policy_mask  # environment tokens (multi-turn) get no advantage and no loss
        if alg.overlong_buffer:
            penalty = dapo_overlong_penalty(rollouts.completion_lengths, cfg.rollout.max_new_tokens,
                                            alg.overlong_buffer, alg.overlong_penalty).float()
            rollouts.reward_components["overlong_penalty"] = penalty
            rollouts.rewards = rollouts.rewards + penalty
        logprobs = rollouts.old_logprobs if rollouts.old_logprobs is not None else rollouts.behaviour_logprobs
        # A step-level reward's scores (NaN off step ends; trainers/rl.py fills them), read by pure/gae/rf++
        token_rewards = rollouts.token_rewards
        if alg.kl.in_reward:  # only gae / rf++ (config), which count NaN as 0: a NaN must not hide the KL term
            steps = torch.nan_to_num(token_rewards, nan=0.0) if token_rewards is not None else None
            token_rewards = kl_in_reward(steps, logprobs, rollouts.ref_logprobs, mask, self.kl_ctl.value,
                                         alg.kl.estimator)
        if learner.critic is not None:
            rollouts.values = dp.gather_rows(rollouts, learner.values)
        phases, pear_metrics = None, {}
        if alg.advantage_estimator == "pear":  # entropies at the rollout weights, split at the closing tag
            phases, pear_metrics = self._pear_phases(rollouts, mask)
        adv_input = AdvantageInput(
            rewards=rollouts.rewards, group_ids=rollouts.group_ids, mask=mask,
            reward_components=rollouts.reward_components, token_rewards=token_rewards, logprobs=logprobs,
            ref_logprobs=rollouts.ref_logprobs, baseline_rewards=baseline, values=rollouts.values,
            answers=[sample_answer(m) for m in rollouts.metadata],  # canonical key, None if no answer
            sum_pi2=sum_pi2, entropies=rollouts.entropies if phases is not None else None, phases=phases,
        )
        adv_fn = ADVANTAGES.get(alg.advantage_estimator)
        if alg.turn_credit:  # multi-turn episodes: each turn credited with its own step rewards on
            adv_input, adv_fn = turn_credit(adv_input, [m.get("step_rewards") for m in rollouts.metadata],
                                            alg.advantage_estimator)
        rollouts.advantages = adv_fn(adv_input, alg.advantage).float()
        if learner.critic is not None:
            rollouts.returns = gae_returns(adv_input, alg.advantage).float()
        # Which tokens get a loss: DAPO overlong filtering, 80/20 high-entropy tokens (on the
        # learner's entropies when the engine records none, as vLLM's does not).
        loss_mask = mask_truncated(mask, rollouts.truncated) if alg.mask_truncated else mask
        if alg.entropy.top_quantile < 1.0 and rollouts.entropies is None:
            rollouts.entropies = dp.gather_rows(rollouts, learner.entropies)
        rollouts.loss_mask = top_entropy_mask(rollouts.entropies, loss_mask, alg.entropy.top_quantile) \
            if rollouts.entropies is not None else loss_mask
        if self.token_selector is not None:  # e.g. d3s: the tokens with the largest |A| x entropy
            if rollouts.entropies is None:
                rollouts.entropies = dp.gather_rows(rollouts, learner.entropies)
            rollouts.loss_mask = self.token_selector.keep_tokens(rollouts.advantages, rollouts.entropies,
                                                                 rollouts.loss_mask, step)
        self.correction_metrics = dict(pear_metrics)
        if alg.correction.name is not None:
            # Behaviour and old log-probs are fixed for the step, so the rejection mask is too: apply
            # it to the whole batch here, and every mini-batch's token count counts only kept tokens.
            corr = CORRECTIONS.get(alg.correction.name)(
                CorrectionInput(rollouts.behaviour_logprobs, rollouts.old_logprobs, rollouts.loss_mask), alg.correction)
            rollouts.loss_mask = rollouts.loss_mask * corr.mask
            # and the weights: batch-normalised ones are normalised over this whole batch, not per micro-batch
            rollouts.is_weights = corr.weights
            self.correction_metrics = {k if "/" in k else f"correction/{k}": float(v) for k, v in corr.metrics.items()}
        if alg.moe.router_is_beta > 0:  # 000-1's router-aware rescaling of the IS weights (models/moe.py)
            factor, moe_metrics = router_is_factor(dp.gather_rows(rollouts, learner.router_distances),
                                                   rollouts.policy_mask, alg.moe.router_is_beta)
            rollouts.is_weights = factor if rollouts.is_weights is None else rollouts.is_weights * factor
            self.correction_metrics.update(moe_metrics)
        if alg.entropy.siren:  # SIREN's anchor: the first step's H_peak, at the rollout weights
            if self._siren_top_p is not None:  # nucleus entropies: engines record full-vocabulary ones
                self._siren_entropies = dp.gather_rows(rollouts, lambda b: learner.entropies(b, self._siren_top_p))
            else:
                if rollouts.entropies is None:
                    rollouts.entropies = dp.gather_rows(rollouts, learner.entropies)
                self._siren_entropies = rollouts.entropies
            if self.siren_anchor is None:
                self.siren_anchor = float(siren_selected_entropy(
                    self._siren_entropies, rollouts.loss_mask, alg.entropy.siren_quantile).mean())

    # ------------------------------------------------------------------ updates
    def update(self, rollouts: Rollouts, orders: list[torch.Tensor], step: int) -> dict[str, float]:
        """PPO epochs x mini-batches of learner updates on one batch; returns mean metrics."""
        tc, alg, learner, dp = self.cfg.trainer, self.cfg.algorithm, self.learner, self.dp
        loss_fn = POLICY_LOSSES.get(alg.policy_loss)
        n = len(rollouts) if rollouts is not None else 0
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}

        def record(key: str, value: float) -> None:
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1

        # The engine's entropies are missing (vLLM): the learner's stand in, in the same pass.
        # sspo scales its clip by segment entropy: it gets the learner's entropies, not a surprisal stand-in
        want_entropy = n > 0 and (self.entropy_ctl.value > 0 or alg.entropy.adaptive or rollouts.entropies is None
                                  or alg.policy_loss in ENTROPY_LOSSES or alg.entropy.siren)
        value_fn = None
        mini_size = n // tc.mini_batches
        for epoch in range(tc.ppo_epochs):
            order = orders[epoch]
            for m in range(tc.mini_batches):
                mini_rows = order[m * mini_size:(m + 1) * mini_size] if n else None
                mini = rollouts.select(mini_rows) if n else None
                # The loss is a sum over micro-batches (and ranks) normalised by the whole
                # mini-batch's counts, so neither split changes the gradient.
                counts_kw = dict(num_tokens=float(mini.loss_mask.sum()), num_seqs=float(len(mini)),
                                 norm_length=float(self.cfg.rollout.max_new_tokens)) if n else {}
                if n and alg.policy_loss in COV_SELECTING:
                    # a Rollouts field, so each micro-batch gets its rows (select) at its width (trim)
                    mini = dataclasses.replace(mini, token_selection=self._cov_selection(mini, step, epoch, m, record))
                if n and alg.entropy.siren:  # the deviation, once per mini-batch (see siren_loss)
                    self._siren_deviation = self._siren_mini_batch(mini_rows, mini, record)
                mine = None
                if n:
                    learned = self.rows_to_learn(mini, record)
                    # what the learner runs per mini-batch: posttrain.bench counts its FLOPs from these
                    record("learner/prompt_tokens", learned.unique_prompt_tokens if tc.share_prompt_pass
                           else float(learned.prompt_mask.sum()))
                    record("learner/completion_tokens", float(learned.completion_mask.sum()))
                    mine = learned.select(torch.tensor(dp.rows(len(learned)))) if dp.world > 1 else learned
                if learner.critic is not None:
                    value_fn = lambda micro, values, kw=counts_kw: self._value_loss(micro, values, kw, record)  # noqa: E731
                learner.zero_grad()
                total_loss = learner.forward_backward(
                    # without want_entropy the learner's entropies are zeros, not measured: pass None so
                    # entropy/learner is not logged as 0
                    mine, lambda micro, logp, ent, kw=counts_kw: self._micro_loss(
                        micro, logp, ent if want_entropy else None, loss_fn, kw, record),
                    with_entropy=want_entropy, value_loss_fn=value_fn,
                    **({"entropy_top_p": self._siren_top_p} if self._siren_top_p is not None else {})) if n else 0.0
                total_loss += self._sft_backward(record)
                if learner.fsdp is None:  # fsdp2 has reduce-scattered (SUM) them in the backward
                    dp.all_reduce_gradients(learner)
                total_loss = dp.sum(total_loss)
                grad_norm = learner.clip_grad_norm()  # of the summed gradients: equal on every rank
                record("loss/total", total_loss)
                record("grad_norm", grad_norm)
                if not (math.isfinite(total_loss) and math.isfinite(grad_norm)):
                    learner.zero_grad()
                    self.nonfinite_streak += 1
                    record("nonfinite_skipped", 1.0)
                    if self.nonfinite_streak >= tc.max_nonfinite_steps:
                        raise NonFiniteLossError(
                            f"{self.nonfinite_streak} consecutive non-finite loss/gradient steps at step {step + 1}; "
                            f"lower trainer.lr or check rewards")
                    continue
                self.nonfinite_streak = 0
                for k, v in learner.optim_step(lr_factor(step, tc.steps, tc.warmup_steps, tc.lr_schedule)).items():
                    record(k, v)
        out = dp.mean_metrics(sums, counts)
        out["lr"] = learner.optimizer.param_groups[0]["lr"]
        return out

    def rows_to_learn(self, mini: Rollouts, record: Callable) -> Rollouts:
        """``mini`` less the rows that add exactly nothing to the update: A = 0 (or no loss token)
        on every token, under a loss that vanishes there with its gradient and treats rows
        independently (ZERO_AT_ZERO_ADVANTAGE), with no other term reading them (KL to the
        reference in the loss, an entropy bonus or its controller, a critic, MoE load balancing).

        GRPO gives A = 0 to every row of a group whose rewards are all equal (all solved or all
        failed); skipping their forward and backward passes leaves the gradient as it was, because
        the loss keeps the whole mini-batch's counts. One row per rank is kept whatever its
        advantage, so every rank runs a pass and Adam steps on zero gradients, not on none, when
        the whole mini-batch is constant. Records ``learner/skipped_rows_frac``.
        """
        alg, tc = self.cfg.algorithm, self.cfg.trainer
        eligible = (tc.skip_zero_advantage_rows and alg.policy_loss in ZERO_AT_ZERO_ADVANTAGE
                    and self.learner.critic is None and (mini.ref_logprobs is None or alg.kl.in_reward)
                    and self.entropy_ctl.value == 0 and not alg.entropy.adaptive and not alg.entropy.siren
                    and (self.learner.moe is None or alg.moe.aux_loss_coef == 0))
        if not eligible:
            return mini
        keep = ((mini.advantages != 0) & (mini.loss_mask > 0)).any(-1)
        short = self.dp.world - int(keep.sum())
        if short > 0:
            keep[(~keep).nonzero().squeeze(-1)[:short]] = True
        record("learner/skipped_rows_frac", 1.0 - float(keep.float().mean()))
        return mini if bool(keep.all()) else mini.select(keep.nonzero().squeeze(-1))

    def _cov_selection(self, mini: Rollouts, step: int, epoch: int, m: int, record: Callable) -> torch.Tensor:
        """[n, T] bool: KL-Cov's / Clip-Cov's tokens, chosen over the whole mini-batch.

        From the old log-probs, detached and already on every rank, so no extra model pass and no
        collective; when the trainer keeps none (trainer.old_logprobs auto on a single pass, where
        the loss takes old = current), from the behaviour log-probs, the engine's values of those
        same log-probs (equal up to train-inference mismatch). select_cov_tokens says how using old
        log-probs differs from the paper's current ones. Records the fraction selected, over the whole
        mini-batch (the losses' own per-micro-batch fractions are not recorded: a mean of those is
        not the mini-batch's).
        """
        alg = self.cfg.algorithm
        logprobs = mini.old_logprobs if mini.old_logprobs is not None else mini.behaviour_logprobs
        generator = torch.Generator().manual_seed(selection_seed(self.cfg.trainer.seed, step, epoch, m))
        selection = select_cov_tokens(alg.policy_loss, logprobs, mini.advantages, mini.loss_mask, alg.loss, generator)
        record(f"loss/{alg.policy_loss}_frac", float(selection.sum()) / max(1.0, float((mini.loss_mask > 0).sum())))
        return selection

    def _siren_mini_batch(self, rows: torch.Tensor, mini: Rollouts, record: Callable) -> float:
        """SIREN's H_peak - H_anchor on the mini-batch's (``rows``) entropies at the rollout weights
        (every rank holds the whole mini-batch, so every rank gets the same value without a collective)."""
        ent = self.cfg.algorithm.entropy
        peak = float(siren_selected_entropy(self._siren_entropies[rows], mini.loss_mask, ent.siren_quantile).mean())
        deviation = peak - self.siren_anchor
        record("entropy/siren_peak", peak)
        record("entropy/siren_anchor", self.siren_anchor)
        record("entropy/siren_penalty", self.entropy_ctl.value * deviation * deviation)
        return deviation

    def _pear_phases(self, rollouts: Rollouts, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """PEAR's thinking/answer phases ([N, T]) and their metrics; fills ``rollouts.entropies`` with
        the learner's at the rollout weights when the engine recorded none (vLLM)."""
        if self.think_close_ids is None:
            raise ValueError("advantage estimator pear splits completions at algorithm.advantage.pear_close_tag and "
                             "needs the tokenizer for it: build RLUpdate(cfg, learner, dp, tokenizer=tokenizer)")
        if rollouts.entropies is None:
            rollouts.entropies = self.dp.gather_rows(rollouts, self.learner.entropies)
        phases = think_phases(rollouts.completion_ids, mask, self.think_close_ids)
        think, answer = phase_entropies(rollouts.entropies, phases)
        penalty = pear_penalty(rollouts.entropies, phases, self.cfg.algorithm.advantage.pear_alpha)
        correct = rollouts.rewards > 0
        closed = ((phases == 0) & (mask > 0)).any(-1)  # the tag's tokens are the generated ones in no phase
        return phases, {"pear/think_entropy": float(think.mean()), "pear/answer_entropy": float(answer.mean()),
                        "pear/closed_frac": float(closed.float().mean()),
                        "pear/penalty_correct": float(penalty[correct].mean()) if correct.any() else 0.0,
                        "pear/correct_frac": float(correct.float().mean())}

    def _sft_backward(self, record: Callable) -> float:
        """HPT's SFT part: - sum(m log p) / #tokens over the demonstrations (0.0 without any)."""
        if self.sft is None:
            return 0.0
        tokens = float(self.sft.completion_mask.sum())
        loss = self.learner.forward_backward(
            self.sft, lambda micro, logp, _: -(logp * micro.completion_mask.to(logp.device)).sum() / tokens)
        record("loss/sft", loss)
        return loss

    def _value_loss(self, micro: Rollouts, values: torch.Tensor, counts_kw: dict, record: Callable) -> torch.Tensor:
        """PPO clipped value loss of the critic on one micro-batch, aggregated like the policy loss."""
        alg = self.cfg.algorithm
        mask = micro.completion_mask.to(values.device)
        out = value_loss(values, micro.values.to(values.device), micro.returns.to(values.device), mask,
                         clip_range=alg.critic.value_clip)
        loss = aggregate(out.loss, mask, alg.aggregation, **counts_kw)
        record("critic/loss", float(loss.detach()))
        for k, v in out.metrics.items():
            record(f"critic/{k}", float(v))
        return loss

    def _micro_loss(self, micro: Rollouts, logp: torch.Tensor, entropy: Optional[torch.Tensor], loss_fn: Callable,
                    counts_kw: dict, record: Callable) -> torch.Tensor:
        """Policy loss (+ KL, - entropy bonus) of one micro-batch, normalised by mini-batch counts.
        ``micro.token_selection``: its rows of the mini-batch's kl_cov / clip_cov token selection."""
        alg = self.cfg.algorithm
        entropy_coef = self.entropy_ctl.value
        mask = micro.loss_mask.to(logp.device)
        old = micro.old_logprobs.to(logp.device) if micro.old_logprobs is not None else logp.detach()
        behaviour = micro.behaviour_logprobs.to(logp.device)
        # the correction's weights and rejection mask were computed over the whole batch (prepare)
        is_weights = micro.is_weights.to(logp.device) if micro.is_weights is not None else None
        selection = micro.token_selection
        token_selection = selection.to(logp.device) if selection is not None else None
        out = loss_fn(
            PolicyLossInput(logprobs=logp, old_logprobs=old, advantages=micro.advantages.to(logp.device), mask=mask,
                            is_weights=is_weights, behaviour_logprobs=behaviour,
                            entropy=entropy if entropy_coef > 0 or alg.policy_loss in ENTROPY_LOSSES else None,
                            token_selection=token_selection),
            alg.loss,
        )
        loss = aggregate(out.loss, mask, alg.aggregation, **counts_kw)
        record("loss/policy", float(loss.detach()))
        moe = self.learner.moe
        if moe is not None and moe.aux is not None:  # this micro-batch's pass's load-balancing loss, weighted
            record("moe/aux_loss", float(moe.aux.detach()))  # by its share of the mini-batch's rows
            loss = loss + alg.moe.aux_loss_coef * moe.aux.to(loss.device) * (len(micro) / counts_kw["num_seqs"])
            moe.aux = None
        for k, v in out.metrics.items():
            if selection is None or k != f"{alg.policy_loss}_frac":  # else _cov_selection records the global one
                record(f"loss/{k}", float(v))
        # Train-inference mismatch: behaviour (engine) vs old (learner at rollout weights).
        for k, v in mismatch_metrics(behaviour, old.detach(), micro.policy_mask.to(logp.device)).items():
            record(k, float(v))
        if micro.ref_logprobs is not None:
            kl = kl_estimate(logp, micro.ref_logprobs.to(logp.device), alg.kl.estimator)
            record("kl/mean", float((kl.detach() * mask).sum() / mask.sum().clamp_min(1)))
            if not alg.kl.in_reward:
                loss = loss + self.kl_ctl.value * aggregate(kl, mask, alg.aggregation, **counts_kw)
        if entropy is not None:  # with SIREN's top-p mask it is the nucleus entropy, logged under its own name
            record("entropy/learner_top_p" if self._siren_top_p is not None else "entropy/learner",
                   float((entropy.detach() * mask).sum() / mask.sum().clamp_min(1)))
            if alg.entropy.siren:  # coef * (H_peak - H_anchor)^2 in place of the bonus
                selected = siren_selected_entropy(entropy, mask, alg.entropy.siren_quantile)
                loss = loss + siren_loss(selected, self._siren_deviation, entropy_coef, counts_kw["num_seqs"])
            elif entropy_coef > 0:
                loss = loss - entropy_coef * aggregate(entropy, mask, alg.aggregation, **counts_kw)
        return loss
