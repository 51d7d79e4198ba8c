"""Preference losses (DPO and its relatives) behind one typed contract.

A preference loss is ``fn(inp: PreferenceInput, cfg: PreferenceConfig) -> PreferenceOutput``.
The input is listwise: K completions of the same prompt per row, with their summed
log-probabilities [B, K]. A preference pair is the K = 2 case, column 0 chosen and column 1
rejected (``PreferenceInput.pairs`` builds it). Pairwise losses require K = 2; the listwise
LiPO-lambda loss takes any K >= 2 and, at K = 2, is DPO scaled by a per-row constant.

The output is a per-row loss [B] (the papers' objective is its mean over rows) and detached
scalar metrics. Every loss is computed row by row, so splitting a batch into micro-batches and
averaging with the right weights reproduces the full-batch loss.

Notation: pi = sum over the completion's tokens of log pi_theta, ref = the same under the
reference model, |y| = completion length in tokens, h = (pi_c - ref_c) - (pi_r - ref_r),
sigma = logistic sigmoid, m = optional per-pair margin from the data (``margins``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from posttrain.algorithms.base import Registry, _check


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token log-probs over the completion and its length: ([...], [...]) from [..., T].

    Positions where ``mask`` is 0 are dropped with ``where`` (not multiplied by 0), so padding
    holding -inf or NaN does not leak into the sum. Lengths come back in the log-probs' dtype.
    """
    keep = mask.bool()
    total = torch.where(keep, token_logps, torch.zeros_like(token_logps)).sum(-1)
    return total, keep.sum(-1).to(token_logps.dtype)


# ---------------------------------------------------------------- contract
@dataclass
class PreferenceInput:
    """K completions per prompt. Pairs: K = 2, column 0 chosen, column 1 rejected."""

    logps: torch.Tensor  # [B, K] sum of log pi_theta over each completion's tokens (with grad)
    lengths: torch.Tensor  # [B, K] completion token counts (>= 1)
    ref_logps: Optional[torch.Tensor] = None  # [B, K] reference model (no grad); None for reference-free losses
    scores: Optional[torch.Tensor] = None  # [B, K] listwise labels psi, higher = better; None: column order (K-1 .. 0)
    margins: Optional[torch.Tensor] = None  # [B] per-pair offset subtracted from the loss's logit (ODPO)
    chosen_nll: Optional[torch.Tensor] = None  # [B] ORPO's SFT term; None: -logps[:, 0] / lengths[:, 0]

    def __post_init__(self) -> None:
        if self.logps.dim() != 2 or self.logps.shape[1] < 2:
            raise ValueError(f"PreferenceInput.logps must be [B, K] with K >= 2, got {tuple(self.logps.shape)}")
        shape = self.logps.shape
        for name in ("lengths", "ref_logps", "scores"):
            t = getattr(self, name)
            if t is not None and t.shape != shape:
                raise ValueError(f"PreferenceInput.{name} must have the shape of logps {tuple(shape)}, "
                                 f"got {tuple(t.shape)}")
        for name in ("margins", "chosen_nll"):
            t = getattr(self, name)
            if t is not None and t.shape != shape[:1]:
                raise ValueError(f"PreferenceInput.{name} must be [B] = [{shape[0]}], got {tuple(t.shape)}")
        if bool((self.lengths < 1).any()):
            raise ValueError("PreferenceInput.lengths must be >= 1 (an empty completion has no log-probability)")
        if self.scores is not None and shape[1] == 2 and bool((self.scores[:, 0] < self.scores[:, 1]).any()):
            raise ValueError("PreferenceInput.scores rank column 1 above column 0: "
                             "pairs put the chosen completion first")

    @classmethod
    def pairs(
        cls,
        chosen_logps: torch.Tensor,
        rejected_logps: torch.Tensor,
        chosen_lengths: torch.Tensor,
        rejected_lengths: torch.Tensor,
        ref_chosen_logps: Optional[torch.Tensor] = None,
        ref_rejected_logps: Optional[torch.Tensor] = None,
        margins: Optional[torch.Tensor] = None,
        chosen_nll: Optional[torch.Tensor] = None,
    ) -> "PreferenceInput":
        """Stack [B] chosen / rejected tensors into the K = 2 input (both reference tensors or neither)."""
        if (ref_chosen_logps is None) != (ref_rejected_logps is None):
            raise ValueError("give both ref_chosen_logps and ref_rejected_logps, or neither")
        ref = None if ref_chosen_logps is None else torch.stack([ref_chosen_logps, ref_rejected_logps], dim=1)
        return cls(
            logps=torch.stack([chosen_logps, rejected_logps], dim=1),
            lengths=torch.stack([chosen_lengths, rejected_lengths], dim=1),
            ref_logps=ref,
            margins=margins,
            chosen_nll=chosen_nll,
        )

    @property
    def num_completions(self) -> int:
        return int(self.logps.shape[1])


@dataclass
class PreferenceConfig:
    """Parameters of the preference losses (each loss reads the ones it needs).

    Keys are named ``algorithm.preference.*`` in error messages. Losses whose scale differs
    from DPO's (SimPO, ORPO) have their own keys, so switching losses never silently reuses a
    beta tuned for another quantity.
    """

    beta: float = 0.1  # inverse temperature on the reference log-ratio: DPO, cDPO, rDPO, IPO (tau), hinge, LiPO
    label_smoothing: float = 0.1  # cDPO / rDPO: assumed rate eps of flipped labels, in [0, 0.5)
    reference_free: bool = False  # reference-based losses use ref = 0 (a uniform reference) instead of ref_logps
    ipo_length_normalize: bool = False  # IPO on per-token mean log-probs (TRL's choice) instead of sums (paper)
    simpo_beta: float = 2.0  # SimPO reward scale (paper: 2.0 or 2.5)
    simpo_gamma_beta_ratio: float = 0.5  # SimPO target margin gamma = simpo_beta * ratio (authors' advice: 0.5)
    orpo_lambda: float = 0.1  # ORPO weight of the odds-ratio term (authors' Mistral-ORPO: 0.1)

    def __post_init__(self) -> None:
        _check(self.beta > 0, "algorithm.preference.beta", "must be > 0")
        _check(0.0 <= self.label_smoothing < 0.5, "algorithm.preference.label_smoothing", "must be in [0, 0.5)")
        _check(self.simpo_beta > 0, "algorithm.preference.simpo_beta", "must be > 0")
        _check(self.simpo_gamma_beta_ratio >= 0, "algorithm.preference.simpo_gamma_beta_ratio", "must be >= 0")
        _check(self.orpo_lambda >= 0, "algorithm.preference.orpo_lambda", "must be >= 0")

    @property
    def simpo_gamma(self) -> float:
        return self.simpo_beta * self.simpo_gamma_beta_ratio


@dataclass
class PreferenceOutput:
    loss: torch.Tensor  # [B] per-prompt loss; the objective is its mean
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars


PreferenceLossFn = Callable[[PreferenceInput, PreferenceConfig], PreferenceOutput]
PREFERENCE_LOSSES: Registry[PreferenceLossFn] = Registry("preference loss")


# ---------------------------------------------------------------- helpers
def _labels(inp: PreferenceInput) -> torch.Tensor:
    """psi [B, K]: the given scores, else column order (column 0 best: K-1, ..., 0)."""
    if inp.scores is not None:
        return inp.scores.to(inp.logps.dtype)
    k = inp.num_completions
    return torch.arange(k - 1, -1, -1, dtype=inp.logps.dtype, device=inp.logps.device).expand_as(inp.logps)


def _ref(inp: PreferenceInput, cfg: PreferenceConfig, name: str) -> torch.Tensor:
    if cfg.reference_free:
        return torch.zeros_like(inp.logps)
    if inp.ref_logps is None:
        raise ValueError(f"preference loss {name!r} needs ref_logps (or algorithm.preference.reference_free=true)")
    return inp.ref_logps.to(inp.logps.dtype)


def _need_pairs(inp: PreferenceInput, name: str) -> None:
    if inp.num_completions != 2:
        raise ValueError(f"preference loss {name!r} is pairwise: it needs K = 2 completions per row, got "
                         f"K = {inp.num_completions} (use 'lipo' for lists)")


def _margin(inp: PreferenceInput) -> torch.Tensor:
    if inp.margins is None:
        return torch.zeros_like(inp.logps[:, 0])
    return inp.margins.to(inp.logps.dtype)


def _no_margins(inp: PreferenceInput, name: str) -> None:
    if inp.margins is not None:
        raise ValueError(f"preference loss {name!r} does not use margins; pass margins=None")


def _reward_metrics(rewards: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Implicit-reward metrics over the ordered pairs (i, j) with psi_i > psi_j of each row.

    For pairs that is the single pair (chosen, rejected): ``reward_accuracy`` is the fraction of
    pairs whose preferred completion has the strictly higher reward.
    """
    r = rewards.detach()
    better = labels.unsqueeze(2) > labels.unsqueeze(1)  # [B, K, K]: i preferred to j
    diff = r.unsqueeze(2) - r.unsqueeze(1)
    n = better.sum().clamp_min(1).to(r.dtype)
    winners = (r.unsqueeze(2) * better).sum() / n
    losers = (r.unsqueeze(1) * better).sum() / n
    return {
        "reward_chosen": winners,
        "reward_rejected": losers,
        "reward_margin": (diff * better).sum() / n,
        "reward_accuracy": ((diff > 0) & better).sum().to(r.dtype) / n,
    }


def _finish(loss: torch.Tensor, rewards: torch.Tensor, inp: PreferenceInput,
            extra: Optional[dict[str, torch.Tensor]] = None) -> PreferenceOutput:
    metrics = {**_reward_metrics(rewards, _labels(inp)), **(extra or {})}
    return PreferenceOutput(loss=loss, metrics={k: v.detach() for k, v in metrics.items()})


def _dpo_logit(inp: PreferenceInput, cfg: PreferenceConfig, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """z = beta * h - m and the implicit rewards beta * (pi - ref) [B, 2]."""
    _need_pairs(inp, name)
    rewards = cfg.beta * (inp.logps - _ref(inp, cfg, name))
    return rewards[:, 0] - rewards[:, 1] - _margin(inp), rewards


# ---------------------------------------------------------------- pairwise losses
@PREFERENCE_LOSSES.register(
    "dpo", paper="Direct Preference Optimization: Your Language Model is Secretly a Reward Model (arXiv:2305.18290)"
)
def dpo(inp: PreferenceInput, cfg: PreferenceConfig) -> PreferenceOutput:
    """DPO (sigmoid): L = -log sigma(beta * h - m), h = (pi_c - ref_c) - (pi_r - ref_r).

    Paper: arXiv:2305.18290, with beta = 0.1 (its default; ``beta``). The implicit reward is
    beta * (pi - ref). ``margins`` m are the offset of ODPO ("Direct Preference Optimization
    with an Offset", arXiv:2402.10571); m = 0 without them. ``label_smoothing`` is not read
    here (that is ``cdpo``). Gradient: dL/dpi_c = -beta * sigma(-z) = -dL/dpi_r, z = beta h - m.
    """
    z, rewards = _dpo_logit(inp, cfg, "dpo")
    return _finish(-F.logsigmoid(z), rewards, inp)


@PREFERENCE_LOSSES.register(
    "cdpo",
    paper="A note on DPO with noisy preferences & relationship to IPO (E. Mitchell, 2023; not on arXiv)",
)
def cdpo(inp: PreferenceInput, cfg: PreferenceConfig) -> PreferenceOutput:
    """Conservative DPO: L = -(1 - eps) log sigma(z) - eps log sigma(-z), z = beta * h - m.

    Source: E. Mitchell's note "A note on DPO with noisy preferences & relationship to IPO"
    (2023, no arXiv id): DPO's cross-entropy against labels smoothed by the assumed flip rate
    eps = ``label_smoothing``. The note fixes no eps; our default 0.1 is a choice, set it to
    your estimate of the noise. Since -log sigma(-z) = -log sigma(z) + z, L = L_dpo + eps z, so
    the loss is minimised at a finite z = log((1 - eps) / eps) instead of growing z forever.
    Gradient: dL/dpi_c = beta * (eps - sigma(-z)).
    """
    eps = cfg.label_smoothing
    z, rewards = _dpo_logit(inp, cfg, "cdpo")
    return _finish(-(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z), rewards, inp)


@PREFERENCE_LOSSES.register(
    "rdpo", paper="Provably Robust DPO: Aligning Language Models with Noisy Feedback (arXiv:2403.00409)"
)
def rdpo(inp: PreferenceInput, cfg: PreferenceConfig) -> PreferenceOutput:
    """Robust DPO: L = [(1 - eps) * -log sigma(z) - eps * -log sigma(-z)] / (1 - 2 eps), z = beta h - m.

    Paper: arXiv:2403.00409. The debiased loss under labels flipped at rate eps
    (``label_smoothing``, in [0, 0.5)): its expectation over the noise equals the clean DPO
    loss. The paper sets eps to the (estimated) flip rate and fixes no default; our 0.1 is a
    choice. Equivalently L = L_dpo - eps z / (1 - 2 eps): unlike cDPO the pull on z never
    vanishes. Gradient: dL/dpi_c = -beta * (sigma(-z) + eps / (1 - 2 eps)).
    """
    eps = cfg.label_smoothing
    z, rewards = _dpo_logit(inp, cfg, "rdpo")
    loss = ((1.0 - eps) * -F.logsigmoid(z) - eps * -F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    return _finish(loss, rewards, inp)


@PREFERENCE_LOSSES.register(
    "ipo", paper="A General Theoretical Paradigm to Understand Learning from Human Preferences (arXiv:2310.12036)"
)
def ipo(inp: PreferenceInput, cfg: PreferenceConfig) -> PreferenceOutput:
    """IPO: L = (h - 1 / (2 tau))^2 with tau = ``beta``.

    Paper: arXiv:2310.12036 (its empirical IPO loss, the regression of h onto 1/(2 tau)). There
    h is built from whole-sequence log-probabilities, our default. TRL divides the policy and
    reference log-probs by the completion length for IPO; ``ipo_length_normalize=true`` does the
    same: h = (pi_c - ref_c) / |y_c| - (pi_r - ref_r) / |y_r|. The paper's experiments are
    bandit-scale and give no LLM tau; beta = 0.1 (target h = 5) follows DPO and TRL. Margins are
    not supported. Gradient: dL/dpi_c = 2 (h - 1/(2 tau)) (divided by |y_c| when normalised).
    """
    _need_pairs(inp, "ipo")
    _no_margins(inp, "ipo")
    ratios = inp.logps - _ref(inp, cfg, "ipo")
    if cfg.ipo_length_normalize:
        ratios = ratios / inp.lengths.to(ratios.dtype)
    h = ratios[:, 0] - ratios[:, 1]
    return _finish((h - 1.0 / (2.0 * cfg.beta)) ** 2, cfg.beta * ratios, inp)


@PREFERENCE_LOSSES.register(
    "hinge", paper="SLiC-HF: Sequence Likelihood Calibration with Human Feedback (arXiv:2305.10425)"
)
def hinge(inp: PreferenceInput, cfg: PreferenceConfig) -> PreferenceOutput:
    """SLiC hinge: L = max(0, 1 - (beta * h - m)) = beta * max(0, 1/beta + m/beta - h).

    Paper: arXiv:2305.10425, whose calibration loss is max(0, delta - log P(y_c) + log P(y_r))
    on the policy alone; here delta = 1 / ``beta`` and the log-probs are taken relative to the
    reference (the "normalized likelihood" form used by TRL). ``reference_free=true`` gives the
    paper's un-normalised form. SLiC-HF's separate regulariser (an SFT term) is not included.
    Gradient while the hinge is active: dL/dpi_c = -beta = -dL/dpi_r; 0 once beta h - m >= 1.
    """
    z, rewards = _dpo_logit(inp, cfg, "hinge")
    return _finish(torch.relu(1.0 - z), rewards, inp)


@PREFERENCE_LOSSES.register(
    "simpo", paper="SimPO: Simple Preference Optimization with a Reference-Free Reward (arXiv:2405.14734)"
)
def simpo(inp: PreferenceInput, cfg: PreferenceConfig) -> PreferenceOutput:
    """SimPO: L = -log sigma(beta/|y_c| * pi_c - beta/|y_r| * pi_r - gamma - m), no reference model.

    Paper: arXiv:2405.14734. The reward is the length-normalised log-likelihood
    beta * pi / |y|; gamma is a target reward margin. beta = ``simpo_beta`` = 2.0 (the paper
    uses 2.0 or 2.5); gamma = beta * ``simpo_gamma_beta_ratio`` with ratio 0.5, the authors'
    recommended starting point and their Llama-3-Base setting (gamma = 1.0). Their trainer's
    class default ratio is 0.25. ``ref_logps`` is ignored. Gradient:
    dL/dpi_c = -sigma(-z) * beta / |y_c|, dL/dpi_r = sigma(-z) * beta / |y_r|.
    """
    _need_pairs(inp, "simpo")
    rewards = cfg.simpo_beta * inp.logps / inp.lengths.to(inp.logps.dtype)
    z = rewards[:, 0] - rewards[:, 1] - cfg.simpo_gamma - _margin(inp)
    return _finish(-F.logsigmoid(z), rewards, inp)


def _log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(mean_logp); mean_logp is clamped just below 0 so 1 - p > 0."""
    a = mean_logp.clamp(max=-1e-6)
    return a - torch.log(-torch.expm1(a))


@PREFERENCE_LOSSES.register(
    "orpo", paper="ORPO: Monolithic Preference Optimization without Reference Model (arXiv:2403.07691)"
)
def orpo(inp: PreferenceInput, cfg: PreferenceConfig) -> PreferenceOutput:
    """ORPO: L = NLL(y_c) - lambda * log sigma(log odds(y_c) - log odds(y_r)), no reference model.

    Paper: arXiv:2403.07691. odds(y) = p / (1 - p) with p = exp(pi / |y|), the per-token geometric
    mean probability; NLL(y_c) = -pi_c / |y_c|, the chosen completion's mean token NLL (or
    ``chosen_nll`` when given). lambda = ``orpo_lambda`` = 0.1, the authors' Mistral-ORPO
    setting (also TRL's default). Margins are not supported. With a = pi / |y| and
    R = log odds(y_c) - log odds(y_r) (d log odds / da = 1 / (1 - p)), the gradient is
    dL/dpi_c = -(1 + lambda sigma(-R) / (1 - p_c)) / |y_c| and
    dL/dpi_r = lambda sigma(-R) / ((1 - p_r) |y_r|) (the first term is the SFT part).
    """
    _need_pairs(inp, "orpo")
    _no_margins(inp, "orpo")
    mean_logp = inp.logps / inp.lengths.to(inp.logps.dtype)
    log_odds = _log_odds(mean_logp)
    ratio = log_odds[:, 0] - log_odds[:, 1]
    nll = inp.chosen_nll if inp.chosen_nll is not None else -mean_logp[:, 0]
    or_loss = -F.logsigmoid(ratio)
    loss = nll + cfg.orpo_lambda * or_loss
    extra = {"nll": nll.mean(), "odds_ratio_loss": or_loss.mean(), "log_odds_ratio": ratio.mean()}
    return _finish(loss, log_odds, inp, extra)


# ---------------------------------------------------------------- listwise losses
def lipo_lambda_weights(labels: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Delta_ij = |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)| for psi_i > psi_j, else 0: [B, K, K].

    G = 2^psi - 1 (DCG gain), D(tau) = log2(1 + tau), tau = 1-based rank of each completion
    when sorted by ``scores`` (descending, ties kept in column order). No gradient.
    """
    scores = scores.detach()
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(1, scores.shape[-1] + 1, device=scores.device).expand_as(order)
    ranks.scatter_(-1, order, positions)
    inv_discount = 1.0 / torch.log2(1.0 + ranks.to(scores.dtype))
    gain = torch.pow(2.0, labels.to(scores.dtype)) - 1.0
    gain_gap = (gain.unsqueeze(2) - gain.unsqueeze(1)).abs()
    discount_gap = (inv_discount.unsqueeze(2) - inv_discount.unsqueeze(1)).abs()
    delta = gain_gap * discount_gap
    return delta * (labels.unsqueeze(2) > labels.unsqueeze(1))


@PREFERENCE_LOSSES.register(
    "lipo", paper="LiPO: Listwise Preference Optimization through Learning-to-Rank (arXiv:2402.01878)"
)
def lipo(inp: PreferenceInput, cfg: PreferenceConfig) -> PreferenceOutput:
    """LiPO-lambda: L = sum_{psi_i > psi_j} Delta_ij * -log sigma(s_i - s_j), s = beta * (pi - ref).

    Paper: arXiv:2402.01878 (the LambdaLoss objective applied to K ranked completions).
    Delta_ij = |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)| with gain G = 2^psi - 1, discount
    D(tau) = log2(1 + tau) and tau_i the rank of completion i under the current scores s
    (stop-gradient), as in LambdaLoss. psi = ``scores`` (None: column order, column 0 best
    with psi = K - 1). The sum runs over pairs without normalisation, as in the paper; pairs with
    equal labels contribute nothing. At K = 2 with labels (1, 0), Delta = 1 - 1/log2(3), so the
    loss is DPO times 0.369. beta is shared with DPO (0.1). Margins are not supported.
    Gradient: dL/ds_i = -sum_{j: psi_i > psi_j} Delta_ij sigma(s_j - s_i)
    + sum_{j: psi_j > psi_i} Delta_ji sigma(s_i - s_j).
    """
    _no_margins(inp, "lipo")
    s = cfg.beta * (inp.logps - _ref(inp, cfg, "lipo"))
    labels = _labels(inp)
    delta = lipo_lambda_weights(labels, s)
    pair_loss = -F.logsigmoid(s.unsqueeze(2) - s.unsqueeze(1))  # [B, K, K]: -log sigma(s_i - s_j)
    loss = (delta * pair_loss).sum(dim=(1, 2))
    return _finish(loss, s, inp, {"lambda_weight_sum": delta.sum(dim=(1, 2)).mean()})
