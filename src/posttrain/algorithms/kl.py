"""Per-token divergence estimators between the current policy and a reference, for tokens
sampled from the current policy.

With delta = logp_ref - logp (Schulman, "Approximating KL Divergence",
http://joschu.net/blog/kl-approx.html) and rho = exp(delta) = pi_ref / pi:

    k1          = -delta                      KL(pi||ref), unbiased, high variance, can be < 0
    k2          = delta^2 / 2                 biased, low variance; its gradient is the exact
                                              gradient of the reverse KL's score-function form
    k3          = rho - 1 - delta             KL(pi||ref), unbiased, low variance, >= 0
    abs         = |delta|
    low_var_kl  = clamp(k3, max=10)           verl's name for k3, clamped for stability
    fkl         = rho * delta - rho + 1       forward KL(ref||pi) = E_pi[rho log rho], importance-
                                              weighted, unbiased, >= 0 (mass-covering)
    js          = 1/2 [rho log rho - (1 + rho) log((1 + rho)/2)]   Jensen-Shannon, >= 0

``fkl`` and ``js`` are the mass-covering f-divergences (generator functions f(rho) with
f(1) = 0, f'(1) = 0, so every term is >= 0) that "The Choice of Divergence" (DPH-RL,
arXiv:2509.07430) uses against the initial policy to keep pass@k from collapsing. DPH-RL
evaluates them on samples pre-drawn from the initial policy, where the forward KL reduces to
the negative log-likelihood of those samples; the forms here use the current policy's own
samples via the ratio rho instead, so no extra data path is needed.

Any kind followed by ``+`` (``k1+``, ``k3+``, ``low_var_kl+``, ...) is straight-through: its
forward value is that estimator, its gradient that of k2 (value = k2 - sg(k2) + sg(kind)), as in
verl. All estimators clamp delta to [-20, 20].

With ``mask`` given, delta is selected (``torch.where``) to 0 where ``mask == 0`` before any
estimator runs, so NaN / inf log-probs at padded positions give a 0 estimate there and a
gradient of exactly 0 (not 0 * NaN) to those positions.
"""

from __future__ import annotations

from typing import Optional

import torch

BASE_KL_ESTIMATORS = ("k1", "k2", "k3", "abs", "low_var_kl", "fkl", "js")
KL_ESTIMATORS = BASE_KL_ESTIMATORS + ("k1+", "k3+", "low_var_kl+")

# name -> (one-line summary, paper); "" = no arXiv paper (textbook / blog)
KL_INFO: dict[str, tuple[str, str]] = {
    "k1": ("k1 = log pi - log pi_ref: unbiased reverse-KL estimate, high variance.", ""),
    "k2": ("k2 = (log pi - log pi_ref)^2 / 2: low variance; gradient of the reverse KL.", ""),
    "k3": ("k3 = rho - 1 - log rho, rho = pi_ref/pi: unbiased, low variance, non-negative.", ""),
    "abs": ("|log pi - log pi_ref|.", ""),
    "low_var_kl": ("k3 clamped at 10 (verl's low_var_kl).", ""),
    "fkl": (
        "Forward KL(ref||pi) = E_pi[rho log rho - rho + 1]: mass-covering, from the policy's own samples.",
        "The Choice of Divergence: A Neglected Key to Mitigating Diversity Collapse in Reinforcement Learning "
        "with Verifiable Reward (arXiv:2509.07430)",
    ),
    "js": (
        "Jensen-Shannon divergence to the reference via its f-divergence generator: mass-covering, bounded.",
        "The Choice of Divergence: A Neglected Key to Mitigating Diversity Collapse in Reinforcement Learning "
        "with Verifiable Reward (arXiv:2509.07430)",
    ),
    "k1+": ("Straight-through: value of k1, gradient of k2.", ""),
    "k3+": ("Straight-through: value of k3, gradient of k2.", ""),
    "low_var_kl+": ("Straight-through: value of low_var_kl, gradient of k2.", ""),
}


def _base(delta: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "k1":
        return -delta
    if kind == "k2":
        return 0.5 * delta**2
    if kind == "k3":
        return torch.exp(delta) - 1.0 - delta
    if kind == "abs":
        return delta.abs()
    if kind == "low_var_kl":
        return (torch.exp(delta) - 1.0 - delta).clamp(max=10.0)
    if kind == "fkl":
        rho = torch.exp(delta)
        return rho * delta - rho + 1.0
    if kind == "js":
        rho = torch.exp(delta)
        return 0.5 * (rho * delta - (1.0 + rho) * torch.log((1.0 + rho) / 2.0))
    raise ValueError(f"unknown KL estimator {kind!r}; use one of {', '.join(KL_ESTIMATORS)} (or any base kind + '+')")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3",
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token divergence estimate [N, T] (see the module docstring for the formulas).

    ``mask`` [N, T]: positions with ``mask == 0`` get exactly 0 (value and gradient), whatever
    the log-probs hold there.
    """
    delta = ref_logprobs - logprobs
    if mask is not None:
        delta = torch.where(mask > 0, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
    delta = delta.clamp(-20.0, 20.0)
    if kind.endswith("+"):
        value = _base(delta, kind[:-1])
        k2 = 0.5 * delta**2
        return k2 - k2.detach() + value.detach()
    return _base(delta, kind)
