"""Every registered method runs through its trainer, in the combination its paper uses (issue 19, item 2).

``posttrain list algorithms --json`` lists every advantage estimator, policy loss, aggregation, KL
estimator, mismatch correction, preference loss and selector. Each one gets a row in ``TABLE``:
the companion overrides its paper needs (ReMax's greedy rollout is the trainer's own doing; GAE
needs the critic, corrections a behaviour/old mismatch, GDPO reward components, SEED-GRPO answers,
...). Each row runs 2 trainer steps on the tiny random model and must log a finite loss at both
steps, change every weight tensor of the policy, and log the metrics that show its companion took
part (``logs``). A registry entry without a row fails ``test_every_registry_entry_has_a_row``; a
method that cannot run through the trainer today has a row marked ``xfail`` (strict: the day it
starts working, the test says so and the mark must go).

KL estimators have two rows each: as GRPO's loss term (``kl:``) and as the per-token penalty in
REINFORCE++'s reward (``kl_in_reward:``). Preference losses run through ``posttrain dpo``. The
trainer-level options that are not registry entries (entropy bonus and its adaptive controller,
the 80/20 entropy mask, the adaptive KL controller, DAPO's overlong shaping and filtering, IS
batch normalisation, HPT) have rows too, keyed ``option:...``.

Cost: each case is 2 steps of 2 prompts x 4 completions x 4 new tokens, one evaluation problem,
one torch thread: about 0.2-0.4 s once the first case has warmed up; the 100 cases took 22-25 s
on an idle 2-core machine.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Optional

import pytest
import torch
from safetensors.torch import load_file

from posttrain.cli import main
from posttrain.config import DPOConfig, SFTConfig, load_config
from posttrain.models.tiny import tiny_model_and_tokenizer
from posttrain.trainers.dpo import train_dpo
from posttrain.trainers.rl_run import train_rl
from posttrain.trainers.sft import train_sft

STEPS = 2
# A dense binary "correctness": the random char-level model writes a digit in ~35% of its 4-token
# completions, so groups of 4 usually disagree and group-relative advantages are not all 0.
DIGIT = "reward={type: format, pattern: '[0-9]', match: search}"
RL_BASE = ("model.name=tiny-random", "task.test_size=4", "rollout.num_prompts=2", "rollout.num_completions=4",
           "rollout.max_new_tokens=4", f"trainer.steps={STEPS}", "trainer.lr=1e-3", "trainer.eval_problems=1",
           "trainer.threads=1", "trainer.seed=0", DIGIT)
# "Starts with a digit" (~10%): most groups are all wrong, so filters drop groups and refill
SPARSE = "reward={type: format, pattern: '^[0-9]', match: search}"
# "Has a letter" (~95%): most groups are all right, so history resampling has prompts to skip
EASY = "reward={type: format, pattern: '[a-zA-Z]', match: search}"
# Two reward components (correctness of the extracted number, and the digit format), and per sample
# the extracted answer (the numeric part's, copied up by the composite): GDPO's and SEED-GRPO's inputs.
COMPOSITE = ("reward={type: composite, parts: [{type: numeric}, "
             "{type: format, pattern: '[0-9]', match: search, weight: 0.5}]}")
# A process reward: the digit format scored on each step's prefix (rewards/process.py, steps are lines)
PRM = "reward={type: prefix_prm, reward: {type: format, pattern: '[0-9]'}}"
# A sampler in bf16 and a learner in fp32: behaviour log-probs differ from the recomputed old ones
# by ~1e-3 per token, as a low-precision inference engine's do. The thresholds below are set to
# that scale so that each correction truncates, masks or rejects part of the batch.
MISMATCH = ("rollout.dtype=bfloat16", "trainer.autocast=none")
# Two mini-batches: the second one's current policy differs from the old one, so ratios, clips
# and trust regions act (with one mini-batch every ratio is exactly 1).
OFF_POLICY = ("trainer.mini_batches=2",)
SFT_BASE = ("model.name=tiny-random", "task.test_size=4", "data.batch_size=4", "rollout.max_new_tokens=4",
            f"trainer.steps={STEPS}", "trainer.lr=1e-3", "trainer.eval_problems=1", "trainer.threads=1",
            "trainer.seed=0")
DPO_BASE = ("model.name=tiny-random", "task.test_size=4", "data.synthetic_size=16", "data.batch_size=4",
            "rollout.max_new_tokens=4", f"trainer.steps={STEPS}", "trainer.lr=1e-3", "trainer.eval_problems=1",
            "trainer.threads=1", "trainer.seed=0")


@dataclass(frozen=True)
class Row:
    overrides: tuple[str, ...] = ()
    why: str = ""  # the paper's combination, in a few words
    logs: tuple[str, ...] = ()  # metrics logged and finite at every step: the companion took part
    acts: Optional[str] = None  # a metric that must be > 0 at some step: the method changed something
    xfail: Optional[str] = None  # why it cannot run through the trainer today (strict xfail)
    raises: Optional[type] = None  # the exception the xfail expects, when known
    trainer: str = "rl"  # rl: train_rl (RL_BASE); dpo: train_dpo (DPO_BASE); sft: train_sft (SFT_BASE)


def _kl_loss(estimator: str) -> Row:
    # GRPO's KL term: beta * aggregate(KL(pi || ref)) in the loss (DeepSeekMath: beta 0.04, k3).
    return Row(("algorithm.kl.coef=0.04", f"algorithm.kl.estimator={estimator}", "algorithm.aggregation="
                "seq-mean-token-mean", *OFF_POLICY), "GRPO with the KL to the reference as a loss term",
               logs=("kl/mean", "kl/coef"))


def _kl_reward(estimator: str) -> Row:
    # PPO / REINFORCE++: -beta * KL_t in the token rewards, read by reinforce_plus_plus.
    return Row(("algorithm.advantage_estimator=reinforce_plus_plus", "algorithm.kl.in_reward=true",
                "algorithm.kl.coef=0.05", f"algorithm.kl.estimator={estimator}", *OFF_POLICY),
               "REINFORCE++ with the per-token KL penalty in the reward", logs=("kl/mean",))


def _correction(name: str, *extra: str) -> Row:
    # truncating corrections cap some weights; the others mask (reject) some tokens or sequences
    return Row((f"algorithm.correction.name={name}", *MISMATCH, *extra),
               "GRPO on a bf16 sampler vs an fp32 learner, old log-probs recomputed",
               logs=("correction/masked_frac", "correction/weight_mean", "mismatch/kl_k3"),
               acts="correction/truncated_frac" if name.startswith("tis_") else "correction/masked_frac")


def _sft(loss: str, why: str) -> Row:
    # the f-divergence losses log the NLL beside their own loss/sft
    return Row((f"sft.loss={loss}",), why, logs=("loss/nll",), trainer="sft")


def _pref(loss: str, why: str, *extra: str) -> Row:
    return Row((f"preference.loss={loss}", *extra), why, logs=("preference/reward_margin",), trainer="dpo")


TABLE: dict[str, Row] = {
    # ------------------------------------------------------------ advantage estimators
    "advantage:ace": Row(("algorithm.advantage_estimator=ace",),
                         "GRPO + ACE's confidence shift, which loads the reference model (KL coef 0)",
                         logs=("kl/mean",)),
    "advantage:dr_grpo": Row(("algorithm.advantage_estimator=dr_grpo", "algorithm.aggregation=seq-mean-token-sum-norm"),
                             "Dr.GRPO: no std, the constant-length normaliser"),
    "advantage:gae": Row(("algorithm.advantage_estimator=gae", "algorithm.kl.in_reward=true", "algorithm.kl.coef=0.05",
                          "algorithm.kl.estimator=k1", *OFF_POLICY),
                         "PPO: the critic, k1 KL in the reward, several mini-batches",
                         logs=("critic/loss", "critic/vf_mse", "kl/mean")),
    "advantage:gdpo": Row(("algorithm.advantage_estimator=gdpo", COMPOSITE,
                           "algorithm.advantage.gdpo_components=[numeric, format]"),
                          "GDPO: each reward of a composite normalised in its group, then summed",
                          logs=("reward_component/numeric", "reward_component/format")),
    "advantage:gpg": Row(("algorithm.advantage_estimator=gpg", "algorithm.policy_loss=gpg"),
                         "GPG: its advantage with the plain -A log p loss"),
    "advantage:grpo": Row(("algorithm.kl.coef=0.04", "algorithm.kl.estimator=k3",
                           "algorithm.aggregation=seq-mean-token-mean", *OFF_POLICY),
                          "GRPO (DeepSeekMath): clip, k3 KL loss with beta 0.04, sequence-mean aggregation",
                          logs=("kl/mean", "loss/clip_frac")),
    "advantage:grpo_passk": Row(("algorithm.advantage_estimator=grpo_passk",), "pass@k training on a binary reward"),
    "advantage:lite_ppo": Row(("algorithm.advantage_estimator=lite_ppo", "algorithm.aggregation=token-mean"),
                              "Lite PPO: group mean, batch std, token-level loss"),
    "advantage:minirl": Row(("algorithm.advantage_estimator=minirl", "algorithm.aggregation=seq-mean-token-sum",
                             "algorithm.correction.name=tis_token", *MISMATCH, *OFF_POLICY),
                            "MiniRL: PPO clip, the detached pi_old/mu IS weight, no length normalisation",
                            logs=("correction/weight_mean", "loss/clip_frac")),
    "advantage:opo": Row(("algorithm.advantage_estimator=opo", "trainer.ppo_epochs=1", "trainer.mini_batches=1"),
                         "OPO: length-weighted baseline, strictly on-policy (one update per batch)"),
    # the digit format as a PRM over each step's prefix (rewards/process.py); no outcome reward, so every bit
    # of signal reaches pure through the trainer's token rewards (pure raises without them)
    # verl's example: one mini-batch, token-mean, no KL loss; sum pi^2 comes from the old-log-prob pass
    "advantage:optimal_token_baseline": Row(("algorithm.advantage_estimator=optimal_token_baseline",
                                             "algorithm.aggregation=token-mean"),
                                            "OTB (verl): per-token group baseline weighted by realized energy"),
    # HAPO's recipe: its token-level advantage with its entropy-adaptive clip, token-mean, clip 0.2/0.2
    "advantage:hapo": Row(("algorithm.advantage_estimator=hapo", "algorithm.policy_loss=hapo",
                           "algorithm.aggregation=token-mean", *OFF_POLICY),
                          "HAPO: token-level group-average advantages with asymmetric adaptive clipping",
                          logs=("loss/clip_low_mean", "entropy/learner")),
    # COPO on GRPO's loss: a 4-token digit reward leaves some groups all-wrong or all-right (the global term)
    "advantage:copo": Row(("algorithm.advantage_estimator=copo", "algorithm.aggregation=seq-mean-token-mean"),
                          "COPO: GRPO blended with the batch-standardised prompt return by outcome entropy"),
    "advantage:pure": Row(("algorithm.advantage_estimator=pure", PRM), "PURE: min-form credit over process rewards",
                          logs=("reward_component/steps", "reward_component/step_min")),
    "advantage:reinforce_plus_plus": Row(("algorithm.advantage_estimator=reinforce_plus_plus",
                                          "algorithm.kl.in_reward=true", "algorithm.kl.coef=0.01",
                                          "algorithm.kl.estimator=k1", *OFF_POLICY),
                                         "REINFORCE++: token-level KL in the reward, batch whitening",
                                         logs=("kl/mean",)),
    "advantage:reinforce_plus_plus_baseline": Row(("algorithm.advantage_estimator=reinforce_plus_plus_baseline",
                                                   "algorithm.kl.coef=0.01", "algorithm.kl.estimator=k2",
                                                   *OFF_POLICY),
                                                  "REINFORCE++-baseline: group mean, batch whitening, k2 KL loss",
                                                  logs=("kl/mean",)),
    # DRPO with its GPG pairing: the digit reward is the correctness, DRPO adds its own length weights
    "advantage:drpo": Row(("algorithm.advantage_estimator=drpo", "algorithm.policy_loss=gpg"),
                          "DRPO: length-weighted advantages among correct samples only, -1 on wrong ones"),
    # PEAR on the digit reward: the random model writes no </think>, so every completion is all thinking
    # (the paper's missing-tag rule) and each correct one loses its mean token entropy from its reward
    "advantage:pear": Row(("algorithm.advantage_estimator=pear",),
                          "PEAR: GRPO on correct rewards minus max(0, H_think - alpha H_answer)",
                          logs=("pear/think_entropy", "pear/closed_frac"), acts="pear/penalty_correct"),
    "advantage:psr": Row(("algorithm.advantage_estimator=psr", "algorithm.policy_loss=gpg"),
                         "PSR: REINFORCE on correct samples only (+1), wrong ones 0, no baseline"),
    "advantage:remax": Row(("algorithm.advantage_estimator=remax", "algorithm.policy_loss=gpg"),
                           "ReMax: REINFORCE with the greedy completion's reward as baseline (the trainer "
                           "samples it)"),
    "advantage:rloo": Row(("algorithm.advantage_estimator=rloo", "algorithm.policy_loss=gpg"),
                          "RLOO: REINFORCE with the leave-one-out baseline"),
    # The random model's answers almost never agree (a missing answer agrees with none), so with
    # alpha = 1 every group has the maximal entropy and a zero update; alpha 0.5 keeps half of it.
    "advantage:seed_grpo": Row(("algorithm.advantage_estimator=seed_grpo", COMPOSITE,
                                "algorithm.advantage.seed_alpha=0.5"),
                               "SEED-GRPO: GRPO scaled by the semantic entropy of the extracted answers"),
    "advantage:unlikeliness": Row(("algorithm.advantage_estimator=unlikeliness",),
                                  "GRPO on unlikeliness-shaped binary rewards (ranked by old log-probs)"),
    "advantage:w_reinforce": Row(("algorithm.advantage_estimator=w_reinforce", "algorithm.policy_loss=gpg"),
                                 "W-REINFORCE: weighted REINFORCE, no baseline"),
    # ------------------------------------------------------------ policy losses
    "policy_loss:cispo": Row(("algorithm.policy_loss=cispo", "algorithm.aggregation=token-mean", *OFF_POLICY),
                             "CISPO (MiniMax-M1): clipped detached IS weight, token-mean, off-policy mini-batches",
                             logs=("loss/cispo_clip_frac",)),
    "policy_loss:clip_cov": Row(("algorithm.policy_loss=clip_cov", "algorithm.aggregation=token-mean", *OFF_POLICY),
                                "Clip-Cov: PPO clip, high-covariance tokens detached", logs=("loss/clip_cov_frac",)),
    "policy_loss:dppo_kl": Row(("algorithm.policy_loss=dppo_kl", *OFF_POLICY), "DPPO-Binary-KL trust region",
                               logs=("loss/trust_region_frac",)),
    "policy_loss:dppo_tv": Row(("algorithm.policy_loss=dppo_tv", *OFF_POLICY), "DPPO-Binary-TV trust region",
                               logs=("loss/trust_region_frac",)),
    "policy_loss:dro": Row(("algorithm.policy_loss=dro", *OFF_POLICY), "quadratic log-ratio penalty (verl's DRO)"),
    "policy_loss:gmpo": Row(("algorithm.policy_loss=gmpo", "algorithm.aggregation=seq-mean-token-mean", *OFF_POLICY),
                            "GMPO: geometric mean of clipped token ratios per sequence"),
    "policy_loss:gpg": Row(("algorithm.policy_loss=gpg", "algorithm.advantage_estimator=gpg"),
                           "GPG: -A log p with GPG's advantage"),
    "policy_loss:gspo": Row(("algorithm.policy_loss=gspo", "algorithm.aggregation=seq-mean-token-mean", *OFF_POLICY),
                            "GSPO: sequence ratio, tiny clip range, sequence-mean", logs=("loss/seq_ratio_mean",)),
    "policy_loss:gspo_token": Row(("algorithm.policy_loss=gspo_token", "algorithm.aggregation=seq-mean-token-mean",
                                   *OFF_POLICY), "GSPO-token", logs=("loss/seq_ratio_mean",)),
    "policy_loss:kl_cov": Row(("algorithm.policy_loss=kl_cov", "algorithm.aggregation=token-mean", *OFF_POLICY),
                              "KL-Cov: |log r| penalty on the top-covariance tokens", logs=("loss/kl_cov_frac",)),
    "policy_loss:luspo": Row(("algorithm.policy_loss=luspo", "algorithm.aggregation=seq-mean-token-mean", *OFF_POLICY),
                             "LUSPO: GSPO times the sequence length", logs=("loss/seq_ratio_mean",)),
    "policy_loss:ppo_clip": Row(("algorithm.policy_loss=ppo_clip", "trainer.ppo_epochs=2", *OFF_POLICY),
                                "PPO clip over epochs and mini-batches", logs=("loss/clip_frac",)),
    "policy_loss:reinforce_is": Row(("algorithm.policy_loss=reinforce_is", "trainer.old_logprobs=behaviour",
                                     *MISMATCH, *OFF_POLICY),
                                    "truncated-IS REINFORCE against the behaviour policy (verl's bypass mode)",
                                    logs=("loss/is_weight_mean", "mismatch/kl_k3")),
    "policy_loss:sapo": Row(("algorithm.policy_loss=sapo", "algorithm.aggregation=seq-mean-token-mean", *OFF_POLICY),
                            "SAPO: soft sigmoid gate instead of the clip", logs=("loss/gate_mean",)),
    # SSPO's segment clip acts on the second mini-batch; a 2-token window makes 2 segments per 4-token answer
    "policy_loss:sspo": Row(("algorithm.policy_loss=sspo", "algorithm.aggregation=token-mean",
                             "algorithm.loss.sspo_window=2", *OFF_POLICY),
                            "SSPO: segment-level ratios, entropy-scaled PPO clip, token-mean",
                            # entropy/learner: the learner's entropies reach the loss (no surprisal stand-in)
                            logs=("loss/seg_ratio_mean", "loss/clip_scale_mean", "entropy/learner")),
    "policy_loss:hapo": Row(("algorithm.policy_loss=hapo", "algorithm.advantage_estimator=hapo",
                             "algorithm.aggregation=token-mean", *OFF_POLICY),
                            "HAPO: PPO clip with bounds widened by token entropy (learner's), token-mean",
                            logs=("loss/clip_low_mean", "loss/clip_high_mean", "entropy/learner")),
    # VESPO targets off-policy data: the gamma kernel of the behaviour/learner ratio (TRL: global token mean)
    "policy_loss:vespo": Row(("algorithm.policy_loss=vespo", "algorithm.aggregation=token-mean", *MISMATCH,
                              "algorithm.correction.name=tis_token", *OFF_POLICY),
                             "VESPO: detached gamma weight of the sequence ratio (IS weights folded in), token-mean",
                             logs=("loss/phi_mean", "mismatch/kl_k3")),
    # ------------------------------------------------------------ aggregations
    "aggregation:token-mean": Row(("algorithm.aggregation=token-mean", "algorithm.loss.clip_high=0.28", *OFF_POLICY),
                                  "DAPO: token-level loss with clip-higher"),
    "aggregation:seq-mean-token-mean": Row(("algorithm.aggregation=seq-mean-token-mean",), "GRPO"),
    "aggregation:seq-mean-token-sum": Row(("algorithm.aggregation=seq-mean-token-sum",
                                           "algorithm.advantage_estimator=minirl"), "MiniRL"),
    "aggregation:seq-mean-token-sum-norm": Row(("algorithm.aggregation=seq-mean-token-sum-norm",
                                                "algorithm.advantage_estimator=dr_grpo"), "Dr.GRPO"),
    "aggregation:token-sum": Row(("algorithm.aggregation=token-sum", "trainer.lr=1e-4"),
                                 "a plain sum (the caller scales it: a smaller learning rate)"),
    # ------------------------------------------------------------ KL estimators: as a loss, and in the reward
    # fkl and js: DPH-RL (arXiv:2509.07430) keeps a mass-covering divergence to the initial policy as a loss term
    **{f"kl:{name}": _kl_loss(name)
       for name in ("k1", "k2", "k3", "abs", "low_var_kl", "fkl", "js", "k1+", "k3+", "low_var_kl+")},
    **{f"kl_in_reward:{name}": _kl_reward(name)
       for name in ("k1", "k2", "k3", "abs", "low_var_kl", "fkl", "js", "k1+", "k3+", "low_var_kl+")},
    # ------------------------------------------------------------ mismatch corrections
    "correction:tis_token": _correction("tis_token", "algorithm.correction.threshold_high=1.0005"),
    "correction:tis_sequence": _correction("tis_sequence", "algorithm.correction.threshold_high=1.001"),
    "correction:mis_token": _correction("mis_token", "algorithm.correction.threshold_high=1.0005"),
    "correction:mis_sequence": _correction("mis_sequence", "algorithm.correction.threshold_high=1.001"),
    "correction:icepop": _correction("icepop", "algorithm.correction.threshold_high=1.0005"),
    "correction:reject_k1": _correction("reject_k1", "algorithm.correction.kl_threshold=3e-4"),
    "correction:reject_k2": _correction("reject_k2", "algorithm.correction.kl_threshold=2e-7"),
    "correction:reject_k3": _correction("reject_k3", "algorithm.correction.kl_threshold=2e-7"),
    # verl's sequence-level rejection modes (rollout_rs), windows at this mismatch's scale
    "correction:seq_sum_k1": _correction("seq_sum_k1", "algorithm.correction.rs_threshold_high=1.001"),
    "correction:seq_sum_k2": _correction("seq_sum_k2", "algorithm.correction.rs_threshold_high=1e-6"),
    "correction:seq_sum_k3": _correction("seq_sum_k3", "algorithm.correction.rs_threshold_high=1e-6"),
    "correction:seq_mean_k1": _correction("seq_mean_k1", "algorithm.correction.rs_threshold_high=1.0002"),
    "correction:seq_mean_k2": _correction("seq_mean_k2", "algorithm.correction.rs_threshold_high=3e-7"),
    "correction:seq_mean_k3": _correction("seq_mean_k3", "algorithm.correction.rs_threshold_high=3e-7"),
    "correction:seq_max_k2": _correction("seq_max_k2", "algorithm.correction.rs_threshold_high=1e-6"),
    "correction:seq_max_k3": _correction("seq_max_k3", "algorithm.correction.rs_threshold_high=1e-6"),
    # ------------------------------------------------------------ preference losses (posttrain dpo)
    "preference_loss:dpo": _pref("dpo", "DPO on synthetic arithmetic pairs"),
    "preference_loss:cdpo": _pref("cdpo", "conservative DPO, label smoothing 0.1",
                                  "preference.label_smoothing=0.1"),
    "preference_loss:rdpo": _pref("rdpo", "robust DPO, flip rate 0.1", "preference.label_smoothing=0.1"),
    "preference_loss:ipo": _pref("ipo", "IPO"),
    "preference_loss:hinge": _pref("hinge", "SLiC hinge"),
    "preference_loss:simpo": _pref("simpo", "SimPO: no reference, beta 2, gamma/beta 0.5"),
    "preference_loss:orpo": _pref("orpo", "ORPO: NLL + odds ratio, no reference"),
    # LiPO's paper ranks lists; the DPO trainer makes pairs only, the K = 2 case of its loss.
    "preference_loss:lipo": _pref("lipo", "LiPO-lambda on pairs (K = 2)"),
    # ------------------------------------------------------------ SFT losses (posttrain sft)
    "sft_loss:nll": _sft("nll", "SFT: the NLL of the demonstrations"),
    "sft_loss:forward_kl": _sft("forward_kl", "SFT under the forward KL to the initial policy"),
    "sft_loss:js": _sft("js", "SFT under the Jensen-Shannon divergence to the initial policy"),
    "sft_loss:alpha": _sft("alpha", "SFT under the alpha-divergence (alpha 0.5)"),
    # ------------------------------------------------------------ selectors
    "selection:dynamic_sampling": Row(("selection.name=dynamic_sampling", "selection.max_rounds=1", SPARSE,
                                       "algorithm.loss.clip_high=0.28", "algorithm.aggregation=token-mean"),
                                      "DAPO: drop constant groups and refill, clip-higher, token-mean",
                                      logs=("selection/groups_kept",), acts="selection/extra_rounds"),
    "selection:online_difficulty": Row(("selection.name=online_difficulty", "selection.max_rounds=1", SPARSE),
                                       "keep groups with pass rate in [0.2, 0.8], refill",
                                       logs=("selection/groups_kept",), acts="selection/extra_rounds"),
    # no refill round: the short batch of step 2 is filled from the buffer
    "selection:replay": Row(("selection.name=replay", "selection.max_rounds=0", SPARSE,
                             "algorithm.correction.name=tis_token", *MISMATCH),
                            "DAPO's filter + a replay buffer, replayed groups IS-corrected",
                            logs=("correction/weight_mean",), acts="selection/replayed_groups"),
    "selection:pods": Row(("selection.name=pods",), "PODS: update on the max-variance 2 of 4 rollouts",
                          logs=("selection/rows_kept_frac",)),
    "selection:d3s": Row(("selection.name=d3s", "selection.keep_completions=2", "selection.token_fraction=0.5"),
                         "D3S: max-variance rollouts, then the tokens of largest |A| x entropy"),
    # arithmetic up to 20 has two categories (1- and 2-digit operands): the bandits' arms
    "selection:sec": Row(("selection.name=sec", "task.max_operand=20"), "SEC: a TD(0) bandit over categories",
                         logs=("selection/p/digits=1", "selection/p/digits=2")),
    "selection:dump": Row(("selection.name=dump", "task.max_operand=20"), "DUMP: UCB over sources (categories)",
                          logs=("selection/p/digits=1", "selection/p/digits=2")),
    "selection:cures": Row(("selection.name=cures",), "CurES: Beta-Bernoulli prompt sampling",
                           logs=("selection/posterior_pass_rate",)),
    # a 2-problem train split: step 2 is the next epoch, where prompts solved in step 1 are skipped
    "selection:srpo_history": Row(("selection.name=srpo_history", "task.train_size=2", EASY),
                                  "SRPO: solved prompts leave later epochs", acts="selection/skipped_prompts"),
    # ------------------------------------------------------------ trainer options outside the registries
    "option:entropy_bonus": Row(("algorithm.entropy.coef=0.01",), "an entropy bonus in the loss",
                                logs=("entropy/learner", "entropy/coef")),
    # from 0.02 by steps of 0.005: still > 0 after 2 steps of entropy above the 0.2 target
    "option:adaptive_entropy": Row(("algorithm.entropy.coef=0.02", "algorithm.entropy.adaptive=true"),
                                   "Skywork-OR1: the entropy coefficient steered toward a target",
                                   logs=("entropy/coef",)),
    # The random model's entropy (~4.5 nats) is below a target of 10, so the coefficient must rise
    # from 0 by delta each step (rl_update once updated it only while it was > 0).
    "option:adaptive_entropy_from_zero": Row(
        ("algorithm.entropy.coef=0", "algorithm.entropy.adaptive=true", "algorithm.entropy.target=10"),
        "Skywork-OR1 from a coefficient of 0 (or clipped to coef_min = 0)", logs=("entropy/coef",),
        acts="entropy/coef"),
    # 003-46's SIREN (its code's coef 0.005, 0.8 peak quantile and top-p 0.8: nucleus entropies)
    "option:siren": Row(("algorithm.entropy.coef=0.005", "algorithm.entropy.siren=true", *OFF_POLICY),
                        "SIREN: coef * (H_peak - H_anchor)^2 on each response's top-20% nucleus-entropy tokens",
                        logs=("entropy/siren_peak", "entropy/siren_anchor", "entropy/siren_penalty",
                              "entropy/learner_top_p"),
                        acts="entropy/siren_penalty"),
    # 003-22's reward-noise injection: the digit reward flipped with probability 0.4 per sample; the
    # clean reward and the flip flags are logged as components (their means: clean reward, fraction flipped).
    "option:noisy_reward": Row(("reward={type: noisy, flip_prob: 0.4, reward: {type: format, pattern: '[0-9]'}}",),
                               "003-22: GRPO on a binary reward flipped with probability 0.4",
                               logs=("reward_component/flipped", "reward_component/clean"),
                               acts="reward_component/flipped"),
    # 002-69's DARLING: the digit reward times the n-gram distinctness of the completion within its group
    "option:darling_reward": Row(("reward={type: darling, diversity: ngram, ngram_n: 1, "
                                  "reward: {type: format, pattern: '[0-9]'}}",),
                                 "002-69: GRPO on quality x normalised diversity (n-gram stand-in)",
                                 logs=("reward_component/diversity", "reward_component/quality"),
                                 acts="reward_component/diversity"),
    "option:top_entropy_tokens": Row(("algorithm.entropy.top_quantile=0.2", "algorithm.loss.clip_high=0.28",
                                      "algorithm.aggregation=token-mean"),
                                     "80/20: only the top 20% entropy tokens get a loss (on DAPO)"),
    "option:adaptive_kl": Row(("algorithm.advantage_estimator=gae", "algorithm.kl.in_reward=true",
                               "algorithm.kl.coef=0.1", "algorithm.kl.target=0.01", "algorithm.kl.estimator=k1"),
                              "Ziegler et al.: PPO with the adaptive KL coefficient", logs=("kl/mean", "kl/coef")),
    "option:overlong_punishment": Row(("algorithm.overlong_buffer=2",), "DAPO's soft overlong punishment",
                                      logs=("reward_component/overlong_penalty",)),
    # stop strings (9 common letters) end some 4-token completions before the limit: those keep a loss
    "option:overlong_filtering": Row(("algorithm.mask_truncated=true", "rollout.stop=[a, e, i, o, u, s, t, n, r]"),
                                     "DAPO's overlong filtering: truncated samples get no loss"),
    "option:is_batch_normalize": replace(
        _correction("tis_token", "algorithm.correction.batch_normalize=true",
                    "algorithm.correction.threshold_high=1.0005"),
        why="verl's rollout_is_batch_normalize: truncated IS weights rescaled to mean 1 over the batch",
        logs=("correction/batch_norm_factor", "correction/weight_mean", "mismatch/kl_k3")),
    "option:hpt": Row(("algorithm.hpt_gate=0.3",), "HPT: prompts the policy rarely solves learn by SFT",
                      logs=("loss/sft",), acts="hpt/sft_prompts"),
    # 003-14: success reward on the last token + Clip / Delta-shaped PRM step rewards, read by REINFORCE++
    **{f"option:prm_{shaping}": Row(("algorithm.advantage_estimator=reinforce_plus_plus",
                                     PRM[:-1] + f", shaping: {shaping}, clip_eta: 1, outcome: {{type: format, "
                                                "pattern: '[0-9]'}}"),
                                    f"003-14: REINFORCE++ on the success reward + {shaping}-shaped step rewards",
                                    logs=("reward_component/step_return", "reward_component/outcome/format"))
       for shaping in ("clip", "delta")},
}


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@lru_cache(maxsize=1)
def _initial_weights() -> dict[str, torch.Tensor]:
    """The tiny-random policy before training (deterministic: built from seed 0)."""
    model, _ = tiny_model_and_tokenizer()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _cases() -> list:
    return [pytest.param(key, row, id=key, marks=[pytest.mark.xfail(strict=True, reason=row.xfail, raises=row.raises)]
                         if row.xfail else []) for key, row in TABLE.items()]


@pytest.mark.parametrize("key, row", _cases())
def test_method_trains_through_its_trainer(tmp_path, key, row):
    run = tmp_path / "run"
    if row.trainer == "dpo":
        cfg = load_config(None, [*DPO_BASE, *row.overrides], cls=DPOConfig)
        summary = train_dpo(cfg, output_dir=str(run), quiet=True)
        loss_key = "loss/preference"
    elif row.trainer == "sft":
        cfg = load_config(None, [*SFT_BASE, *row.overrides], cls=SFTConfig)
        summary = train_sft(cfg, output_dir=str(run), quiet=True)
        loss_key = "loss/nll"
    else:
        cfg = load_config(None, [*RL_BASE, *row.overrides])
        summary = train_rl(cfg, output_dir=str(run), quiet=True)
        loss_key = "loss/total"
    assert summary["steps"] == STEPS
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert math.isfinite(r[loss_key]) and math.isfinite(r["grad_norm"]), \
            f"{key} ({row.why}): step {r['step']} loss {r[loss_key]}, grad norm {r['grad_norm']}"
        assert "nonfinite_skipped" not in r, f"{key} ({row.why}): step {r['step']} was skipped as non-finite"
        missing = [m for m in row.logs if m not in r or not math.isfinite(r[m])]
        assert not missing, f"{key} ({row.why}): step {r['step']} logs no finite {missing}: the companion did not " \
                            "take part"
    if row.acts is not None:
        assert any(r[row.acts] > 0 for r in rows), f"{key} ({row.why}): {row.acts} is 0 at every step: it did nothing"
    after = load_file(run / "checkpoints" / f"step_{STEPS}" / "model.safetensors")
    before = _initial_weights()
    assert after.keys() <= before.keys()
    unchanged = [k for k in after if torch.equal(after[k], before[k])]
    assert not unchanged, \
        f"{key} ({row.why}): {len(unchanged)} of {len(after)} weight tensors did not move, e.g. {unchanged[:3]}"


def test_every_registry_entry_has_a_row(capsys):
    """What ``posttrain list algorithms --json`` offers a user is exactly what TABLE runs."""
    assert main(["list", "algorithms", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    wanted = {f"{r['kind']}:{r['name']}" for r in listed}
    # every KL estimator also as the per-token penalty in the reward (PPO / REINFORCE++ form)
    wanted |= {f"kl_in_reward:{r['name']}" for r in listed if r["kind"] == "kl"}
    missing = sorted(wanted - TABLE.keys())
    assert not missing, (
        f"registry entries without a row in TABLE ({__file__}): {missing}. Add one per entry, keyed 'kind:name', "
        "with the overrides its paper's combination needs (e.g. a reward with components, the critic, a "
        "behaviour/old mismatch via MISMATCH, OFF_POLICY mini-batches) and the metrics that show them at work "
        "in `logs`; a method that cannot run through the trainer yet gets xfail='why'.")
    kinds = {r["kind"] for r in listed} | {"kl_in_reward"}
    stale = sorted(k for k in TABLE if k.split(":", 1)[0] in kinds and k not in wanted)
    assert not stale, f"TABLE rows for entries no longer registered: {stale}; remove them"
    assert all(k.split(":", 1)[0] in kinds | {"option"} for k in TABLE), sorted(TABLE)
