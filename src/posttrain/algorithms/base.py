"""Registries and the typed contract shared by every algorithm.

- An advantage estimator is ``fn(inp: AdvantageInput, cfg: AdvantageConfig) -> Tensor[N, T]``.
- A policy loss is ``fn(inp: PolicyLossInput, cfg: PolicyLossConfig) -> PolicyLossOutput``
  holding a per-token loss matrix [N, T]; aggregation to a scalar happens outside the loss
  (``posttrain.algorithms.aggregation``) and no loss overrides it.
- A mismatch correction is ``fn(inp: CorrectionInput, cfg: CorrectionConfig) -> CorrectionOutput``
  acting on behaviour vs old log-probs (never on current vs old: that is the loss's clip).

Every registered function carries its paper (title, arXiv id) so ``posttrain list algorithms``
can print it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generic, Optional, Sequence, TypeVar

import torch

F = TypeVar("F", bound=Callable)


@dataclass(frozen=True)
class Entry(Generic[F]):
    kind: str
    name: str
    fn: F
    paper: str  # "Title (arXiv:XXXX.XXXXX)" or "" for textbook methods
    textbook: bool = False  # True marks a method with no single paper to cite (paper may be "")


class Registry(Generic[F]):
    """Name -> function, with the paper each one comes from."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[F]] = {}

    def register(self, name: str, paper: str = "", textbook: bool = False) -> Callable[[F], F]:
        """Decorator. ``paper`` ("Title (arXiv:id)") is appended to the docstring as its reference."""

        def deco(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            if paper and fn.__doc__ is not None and paper not in fn.__doc__:
                fn.__doc__ = fn.__doc__.rstrip() + f"\n\n    Reference: {paper}\n    "
            self._entries[name] = Entry(self.kind, name, fn, paper, textbook)
            return fn

        return deco

    def get(self, name: str) -> F:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._entries))}")
        return self._entries[name].fn

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry[F]]:
        return [self._entries[k] for k in self.names()]

    def __contains__(self, name: str) -> bool:
        return name in self._entries


# ---------------------------------------------------------------- advantage estimators
@dataclass
class AdvantageInput:
    rewards: torch.Tensor  # [N] scalar outcome reward per sample
    group_ids: torch.Tensor  # [N] long
    mask: torch.Tensor  # [N, T] float, 1 on completion tokens
    reward_components: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [N]
    token_rewards: Optional[torch.Tensor] = None  # [N, T] process / step rewards
    values: Optional[torch.Tensor] = None  # [N, T] critic values (GAE)
    logprobs: Optional[torch.Tensor] = None  # [N, T] old (or behaviour) log-probs
    ref_logprobs: Optional[torch.Tensor] = None  # [N, T]
    baseline_rewards: Optional[torch.Tensor] = None  # [N] e.g. ReMax greedy-rollout reward
    answers: Optional[Sequence[Optional[str]]] = None  # canonical answer per sample, None: no answer (seed_grpo)
    sum_pi2: Optional[torch.Tensor] = None  # [N, T] sum_v pi_v^2 per token, learner's pass (optimal_token_baseline)
    entropies: Optional[torch.Tensor] = None  # [N, T] per-token entropy at the rollout weights (pear)
    phases: Optional[torch.Tensor] = None  # [N, T] long: 1 thinking, 2 answer, 0 tag / padding (pear)


def _check(cond: bool, key: str, what: str) -> None:
    if not cond:
        raise ValueError(f"{key} {what}")


@dataclass
class AdvantageConfig:
    """Parameters of the advantage estimators (each estimator reads the ones it needs).

    Keys live under ``algorithm.advantage.`` in the YAML config.
    """

    eps: float = 1e-6  # added to the std in std-normalisation
    std_normalize: bool = True  # GRPO divides by the group std; False gives Dr.GRPO
    gamma: float = 1.0  # discount (GAE, REINFORCE++)
    lam: float = 0.95  # GAE lambda
    gae_whiten: bool = True  # whiten GAE advantages over the batch's tokens (verl, OpenRLHF do)
    gdpo_components: list[str] = field(default_factory=list)  # [] = a composite reward's parts (not total)
    gdpo_weights: list[float] = field(default_factory=list)  # one per component; [] = all 1.0
    gdpo_batch_normalize: bool = True  # GDPO: z-score the summed advantage over the batch
    psr_weight: float = 0.1  # W-REINFORCE lambda: weight of positive samples (paper: 0.1)
    unlikeliness_beta: float = 0.25  # Unlikeliness reward beta_rank (paper: 0.25)
    seed_alpha: float = 1.0  # SEED-GRPO sensitivity alpha to the normalised semantic entropy
    ace_alpha: float = 1.0  # ACE strength of the softplus confidence penalty on wrong samples
    pure_rloo_baseline: bool = True  # PURE: subtract the leave-one-out mean trajectory value
    drpo_lambda: float = 0.2  # DRPO KL temperature of the length-tilted positive distribution (our choice)
    hapo_fallback_z: float = 5.0  # HAPO: a group with some |A| >= this falls back to GRPO (HAPO's code: 5)
    pear_alpha: float = 1.0  # PEAR: weight of the answer-phase entropy in max(0, H_think - alpha H_answer) (paper: 1)
    pear_close_tag: str = "</think>"  # PEAR: the text that ends the thinking phase

    def __post_init__(self) -> None:
        _check(self.eps >= 0, "algorithm.advantage.eps", "must be >= 0")
        _check(0.0 <= self.gamma <= 1.0, "algorithm.advantage.gamma", "must be in [0, 1]")
        _check(0.0 <= self.lam <= 1.0, "algorithm.advantage.lam", "must be in [0, 1]")
        _check(
            not self.gdpo_weights or len(self.gdpo_weights) == len(self.gdpo_components),
            "algorithm.advantage.gdpo_weights",
            "must be empty or have one weight per entry of gdpo_components",
        )
        _check(len(set(self.gdpo_components)) == len(self.gdpo_components), "algorithm.advantage.gdpo_components",
               f"lists a component twice ({self.gdpo_components}); give it a larger gdpo_weight instead")
        _check(self.psr_weight >= 0, "algorithm.advantage.psr_weight", "must be >= 0")
        _check(0.0 <= self.unlikeliness_beta <= 1.0, "algorithm.advantage.unlikeliness_beta", "must be in [0, 1]")
        _check(self.seed_alpha >= 0, "algorithm.advantage.seed_alpha", "must be >= 0")
        _check(self.ace_alpha >= 0, "algorithm.advantage.ace_alpha", "must be >= 0")
        _check(0 < self.hapo_fallback_z, "algorithm.advantage.hapo_fallback_z",
               f"must be > 0 (|A| at which a hapo group falls back to GRPO; HAPO's code: 5), got {self.hapo_fallback_z}")
        _check(0 < self.drpo_lambda < float("inf"), "algorithm.advantage.drpo_lambda",
               f"must be a finite number > 0 (the KL temperature of DRPO's length weights), got {self.drpo_lambda}")
        _check(abs(self.pear_alpha) < float("inf"), "algorithm.advantage.pear_alpha",
               f"must be a finite number (PEAR's answer-entropy weight; paper: 1), got {self.pear_alpha}")
        _check(bool(self.pear_close_tag), "algorithm.advantage.pear_close_tag",
               "must be a non-empty string (the text that closes the thinking phase, e.g. '</think>')")


AdvantageFn = Callable[[AdvantageInput, AdvantageConfig], torch.Tensor]
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")


# ---------------------------------------------------------------- policy losses
@dataclass
class PolicyLossInput:
    logprobs: torch.Tensor  # [N, T] current policy (requires grad)
    old_logprobs: torch.Tensor  # [N, T] policy at rollout weights (no grad)
    advantages: torch.Tensor  # [N, T]
    mask: torch.Tensor  # [N, T] float
    is_weights: Optional[torch.Tensor] = None  # [N, T] mismatch-correction weights (no grad)
    behaviour_logprobs: Optional[torch.Tensor] = None  # [N, T] rollout engine's log-probs
    entropy: Optional[torch.Tensor] = None  # [N, T] current policy entropy
    # [N, T] bool: tokens picked by a selection made over the whole mini-batch and every rank
    # (kl_cov / clip_cov, see losses.select_cov_tokens); None: the loss selects among its own rows
    token_selection: Optional[torch.Tensor] = None


@dataclass
class PolicyLossConfig:
    """Parameters of the policy losses (each loss reads the ones it needs).

    Keys live under ``algorithm.loss.`` in the YAML config. Losses with their own trust region
    have their own keys, set to the paper's defaults, so switching ``algorithm.loss.name``
    never silently reuses a PPO clip range on a different quantity.
    """

    clip_low: float = 0.2  # epsilon_low
    clip_high: float = 0.2  # epsilon_high (DAPO clip-higher uses 0.28)
    dual_clip: Optional[float] = None  # c in dual-clip PPO (e.g. 3.0); None disables
    gspo_clip_low: float = 3e-4  # GSPO / GSPO-token / LUSPO sequence-ratio clip (paper: 3e-4)
    gspo_clip_high: float = 4e-4  # (paper: 4e-4)
    gmpo_clip_low: float = 0.4  # GMPO clip of the token log-ratio, in log space (paper: 0.4)
    gmpo_clip_high: float = 0.4
    cispo_max_ratio: float = 5.0  # CISPO upper bound on the stop-gradient IS weight (TRL: 5.0)
    cispo_min_ratio: Optional[float] = None  # optional lower bound (verl's two-sided variant)
    sapo_tau_pos: float = 1.0  # SAPO gate temperature for A > 0 (paper: 1.0)
    sapo_tau_neg: float = 1.05  # for A <= 0 (paper: 1.05)
    kl_cov_ratio: float = 0.002  # KL-Cov: fraction of tokens penalised (paper: 2e-3)
    kl_cov_coef: float = 1.0  # KL-Cov: coefficient of |log r| on those tokens (paper: 1.0)
    clip_cov_ratio: float = 0.0002  # Clip-Cov: fraction of tokens detached (paper: 2e-4)
    clip_cov_lb: float = 1.0  # Clip-Cov: covariance window lower bound (paper: 1)
    clip_cov_ub: float = 5.0  # Clip-Cov: upper bound (paper: 5)
    dppo_low: float = 0.2  # DPPO divergence threshold for A <= 0 (TV: prob drop; KL: binary KL)
    dppo_high: float = 0.2  # DPPO divergence threshold for A > 0
    dppo_ratio_cap: float = 20.0  # DPPO truncation of the stop-gradient ratio (paper: large)
    dro_beta: float = 1.0  # DRO quadratic log-ratio penalty strength
    is_cap: float = 2.0  # reinforce_is: truncation C of the IS weight pi/mu
    # VESPO gamma kernel phi(W) = W^k exp(lambda (1 - W)), chosen by the sign of A (TRL's defaults)
    vespo_k_pos: float = 2.0  # power k for A >= 0 (paper section 3.4's c1; TRL: 2.0)
    vespo_lambda_pos: float = 3.0  # decay lambda for A >= 0 (c2; TRL: 3.0)
    vespo_k_neg: float = 3.0  # for A < 0 (TRL: 3.0)
    vespo_lambda_neg: float = 2.0  # for A < 0 (TRL: 2.0)
    # SSPO: segments are fixed windows of sspo_window token positions (no sentence ids reach the
    # loss); PPO-CLIP bounds on the segment ratio, scaled by segment entropy / sequence entropy
    sspo_window: int = 16  # tokens per segment (our choice; the abstract gives none)
    sspo_clip_low: float = 0.2  # base eps_low before the entropy scale (PPO-CLIP's 0.2; our choice)
    sspo_clip_high: float = 0.2  # base eps_high
    sspo_entropy_scale_min: float = 0.5  # the entropy scale is clamped to [min, max] (our choice)
    sspo_entropy_scale_max: float = 2.0
    # HAPO asymmetric adaptive clipping: bounds widened by the token's entropy score (HAPO's recipes)
    hapo_entropy_pivot: float = 0.8  # quantile of the log-entropy that scores 0
    hapo_clip_alpha: float = 1.0  # eps_low x (1 + alpha) at the lowest entropy, eps_high x (1 + alpha) at the highest

    def __post_init__(self) -> None:
        _check(self.clip_low >= 0 and self.clip_high >= 0, "algorithm.loss.clip_low and clip_high", "must be >= 0")
        _check(self.clip_low < 1.0, "algorithm.loss.clip_low", "must be < 1")
        if self.dual_clip is not None:
            _check(self.dual_clip > 1.0, "algorithm.loss.dual_clip", "must be > 1 (or null to disable)")
        _check(0 <= self.gspo_clip_low < 1.0, "algorithm.loss.gspo_clip_low", "must be in [0, 1)")
        _check(self.gspo_clip_high >= 0, "algorithm.loss.gspo_clip_high", "must be >= 0")
        _check(
            self.gmpo_clip_low >= 0 and self.gmpo_clip_high >= 0, "algorithm.loss.gmpo_clip_low/high", "must be >= 0"
        )
        _check(self.cispo_max_ratio > 0, "algorithm.loss.cispo_max_ratio", "must be > 0")
        if self.cispo_min_ratio is not None:
            _check(
                0 <= self.cispo_min_ratio < self.cispo_max_ratio,
                "algorithm.loss.cispo_min_ratio",
                "must be in [0, cispo_max_ratio)",
            )
        _check(self.sapo_tau_pos > 0 and self.sapo_tau_neg > 0, "algorithm.loss.sapo_tau_pos/neg", "must be > 0")
        _check(0 < self.kl_cov_ratio <= 1, "algorithm.loss.kl_cov_ratio", "must be in (0, 1]")
        _check(self.kl_cov_coef >= 0, "algorithm.loss.kl_cov_coef", "must be >= 0")
        _check(0 < self.clip_cov_ratio <= 1, "algorithm.loss.clip_cov_ratio", "must be in (0, 1]")
        _check(self.clip_cov_lb < self.clip_cov_ub, "algorithm.loss.clip_cov_lb", "must be < clip_cov_ub")
        _check(self.dppo_low >= 0 and self.dppo_high >= 0, "algorithm.loss.dppo_low/high", "must be >= 0")
        _check(self.dppo_ratio_cap > 0, "algorithm.loss.dppo_ratio_cap", "must be > 0")
        _check(self.dro_beta >= 0, "algorithm.loss.dro_beta", "must be >= 0")
        _check(self.is_cap > 0, "algorithm.loss.is_cap", "must be > 0")
        for key in ("vespo_k_pos", "vespo_k_neg"):
            _check(0 <= getattr(self, key) < float("inf"), f"algorithm.loss.{key}",
                   f"is VESPO's power k and must be a finite number >= 0 (TRL: 2.0 / 3.0), got {getattr(self, key)}")
        for key in ("vespo_lambda_pos", "vespo_lambda_neg"):
            _check(0 < getattr(self, key) < float("inf"), f"algorithm.loss.{key}",
                   f"is VESPO's decay lambda and must be a finite number > 0 (TRL: 3.0 / 2.0), got {getattr(self, key)}")
        _check(isinstance(self.sspo_window, int) and not isinstance(self.sspo_window, bool) and self.sspo_window >= 1,
               "algorithm.loss.sspo_window", f"must be an integer >= 1 (tokens per segment), got {self.sspo_window!r}")
        _check(0 < self.sspo_entropy_scale_min <= 1.0 <= self.sspo_entropy_scale_max < float("inf"),
               "algorithm.loss.sspo_entropy_scale_min/max",
               "must satisfy 0 < min <= 1 <= max (finite), so a segment of average entropy keeps the base clip; "
               f"got {self.sspo_entropy_scale_min}, {self.sspo_entropy_scale_max}")
        _check(0.0 <= self.hapo_entropy_pivot <= 1.0, "algorithm.loss.hapo_entropy_pivot",
               f"is a quantile and must be in [0, 1] (HAPO: 0.8), got {self.hapo_entropy_pivot}")
        # (a lower bound 1 - eps_low <= 0 only means no lower clip: the ratio is > 0)
        _check(0 <= self.hapo_clip_alpha < float("inf"), "algorithm.loss.hapo_clip_alpha",
               f"must be a finite number >= 0 (HAPO: 1.0), got {self.hapo_clip_alpha}")
        _check(0 <= self.sspo_clip_high < float("inf"), "algorithm.loss.sspo_clip_high",
               f"must be a finite number >= 0, got {self.sspo_clip_high}")
        _check(0 <= self.sspo_clip_low * self.sspo_entropy_scale_max < 1.0, "algorithm.loss.sspo_clip_low",
               f"times sspo_entropy_scale_max must be in [0, 1) so the lower bound 1 - eps stays > 0; got "
               f"{self.sspo_clip_low} x {self.sspo_entropy_scale_max}: lower one of them")


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor  # [N, T] per-token loss (masked positions may hold anything)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # scalars, means over mask


PolicyLossFn = Callable[[PolicyLossInput, PolicyLossConfig], PolicyLossOutput]
POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")


# ---------------------------------------------------------------- mismatch corrections
@dataclass
class CorrectionInput:
    behaviour_logprobs: torch.Tensor  # [N, T]
    old_logprobs: torch.Tensor  # [N, T]
    mask: torch.Tensor  # [N, T] float


# verl's sequence-level rejection modes (``rollout_rs``): a statistic (sum / mean / max over a
# sequence's tokens) of the per-token k1 / k2 / k3 estimate of KL(mu || pi_old); corrections.py.
SEQ_REJECT_MODES = ("seq_sum_k1", "seq_sum_k2", "seq_sum_k3", "seq_mean_k1", "seq_mean_k2", "seq_mean_k3",
                    "seq_max_k2", "seq_max_k3")
# rs_threshold_high when it is null. verl has no default (its rollout_rs_threshold is required);
# these are the values of verl's presets (RolloutCorrectionConfig) and examples that use the mode:
# seq_sum_k1 "0.5_2.0" (decoupled_seq_is_rs), seq_mean_k1 "0.999_1.001" (the *_geo_rs presets),
# seq_mean_k3 0.01 (*_k3_rs), seq_max_k2 2.5 (examples/rollout_correction multi-RS). The others
# have none in verl, so posttrain picks: seq_mean_k2 0.01 and seq_max_k3 2.5 (k2 and k3 agree to
# second order in the log-ratio), seq_sum_k2 / seq_sum_k3 ln 2 (every seq_sum_k* estimates the
# sequence-level KL(mu || pi_old); ln 2 is the bound seq_sum_k1's default window puts on it).
SEQ_REJECT_DEFAULTS = {"seq_sum_k1": 2.0, "seq_sum_k2": 0.6931471805599453, "seq_sum_k3": 0.6931471805599453,
                       "seq_mean_k1": 1.001, "seq_mean_k2": 0.01, "seq_mean_k3": 0.01,
                       "seq_max_k2": 2.5, "seq_max_k3": 2.5}
# the corrections whose weights are importance ratios, which ``batch_normalize`` may rescale
IS_WEIGHTED_CORRECTIONS = ("tis_token", "tis_sequence", "mis_token", "icepop", "mis_sequence")


@dataclass
class CorrectionConfig:
    """Parameters of the train-inference mismatch corrections (``algorithm.correction.``).

    Ratios are pi_old / pi_behaviour. ``threshold_high`` is the TIS cap C and the upper bound of
    the masking window; ``threshold_low`` its lower bound (None = 1 / threshold_high).
    ``kl_threshold`` is the per-token mean KL above which ``reject_k*`` drop a sequence.

    ``rs_threshold_low`` / ``rs_threshold_high``: the window of the ``seq_*`` rejection modes
    (verl's ``rollout_rs_threshold``). For the k1 modes they bound exp(statistic), a ratio
    mu / pi_old (verl's direction; see corrections.py), low defaulting to 1 / high; the k2 / k3
    modes take only an upper bound on the statistic itself. Null high: SEQ_REJECT_DEFAULTS.
    ``batch_normalize`` (verl's ``rollout_is_batch_normalize``): rescale the IS weights of the
    IS_WEIGHTED_CORRECTIONS to mean 1 over the kept tokens (over the kept sequences for the
    sequence-level ones) of the batch the correction is given.
    """

    name: Optional[str] = None  # which correction (CORRECTIONS registry); None disables
    threshold_low: Optional[float] = None
    threshold_high: float = 2.0
    kl_threshold: float = 0.01
    rs_threshold_low: Optional[float] = None  # k1 modes only; None = 1 / the upper bound
    rs_threshold_high: Optional[float] = None  # None = SEQ_REJECT_DEFAULTS[name]
    batch_normalize: bool = False

    def __post_init__(self) -> None:
        _check(self.threshold_high >= 1.0, "algorithm.correction.threshold_high", "must be >= 1")
        if self.threshold_low is not None:
            _check(
                0 <= self.threshold_low < self.threshold_high,
                "algorithm.correction.threshold_low",
                "must be in [0, threshold_high)",
            )
        _check(self.kl_threshold > 0, "algorithm.correction.kl_threshold", "must be > 0")
        if self.name is None:
            return
        if self.name in SEQ_REJECT_MODES:
            self.rs_bounds(self.name)  # raises on a window that cannot be right
        else:
            _check(
                self.rs_threshold_low is None and self.rs_threshold_high is None,
                "algorithm.correction.rs_threshold_low/high",
                f"apply only to the seq_* rejection modes ({', '.join(SEQ_REJECT_MODES)}), not to {self.name!r}: "
                "remove them (tis_* / mis_* use threshold_low/high, reject_k* kl_threshold)",
            )
        _check(
            not self.batch_normalize or self.name in IS_WEIGHTED_CORRECTIONS,
            "algorithm.correction.batch_normalize",
            f"rescales importance weights, and {self.name!r} has none (its weights are 1): use it with one of "
            f"{', '.join(IS_WEIGHTED_CORRECTIONS)}, or set it to false",
        )

    @property
    def low(self) -> float:
        return self.threshold_low if self.threshold_low is not None else 1.0 / self.threshold_high

    def rs_bounds(self, mode: str) -> tuple[Optional[float], float]:
        """(lower, upper) window of rejection mode ``mode`` (one of SEQ_REJECT_MODES), validated.

        k1 modes: (L, U) with 0 < L <= 1 <= U, L < U: bounds on mu / pi_old, L = 1 / U unless set.
        k2 / k3 modes: (None, U), U > 0: an upper bound on the statistic; a lower bound is refused.
        """
        key = "algorithm.correction.rs_threshold"
        _check(mode in SEQ_REJECT_MODES, key, f"belongs to the seq_* modes; {mode!r} is not one")
        high = self.rs_threshold_high if self.rs_threshold_high is not None else SEQ_REJECT_DEFAULTS[mode]
        if mode.endswith("k1"):
            low = self.rs_threshold_low if self.rs_threshold_low is not None else 1.0 / high
            _check(
                0 < low <= 1.0 <= high and low < high,
                f"{key}_low/high",
                f"of {mode} bound the ratio mu/pi_old and must satisfy 0 < low <= 1 <= high, low < high (a "
                f"sequence that matches exactly must be kept); got low={low}, high={high}",
            )
            return low, high
        _check(high > 0, f"{key}_high", f"of {mode} is an upper bound on a divergence and must be > 0; got {high}")
        _check(
            self.rs_threshold_low is None,
            f"{key}_low",
            f"is not used by {mode}: k2 and k3 are >= 0 with 0 meaning no mismatch, so only an upper bound "
            "makes sense (verl refuses one too); remove it",
        )
        return None, high


@dataclass
class CorrectionOutput:
    weights: torch.Tensor  # [N, T] multiplies the per-token loss (no grad)
    mask: torch.Tensor  # [N, T] float: tokens kept (rejected tokens get 0)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


CorrectionFn = Callable[[CorrectionInput, CorrectionConfig], CorrectionOutput]
CORRECTIONS: Registry[CorrectionFn] = Registry("mismatch correction")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)
