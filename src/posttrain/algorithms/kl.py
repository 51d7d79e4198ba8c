"""KL estimators between the current policy and a reference, per token.

Schulman, "Approximating KL Divergence" (http://joschu.net/blog/kl-approx.html), with
delta = logp_ref - logp (samples drawn from the current policy):
    k1 = -delta            (unbiased, high variance)
    k2 = delta^2 / 2       (biased, low variance)
    k3 = exp(delta) - 1 - delta   (unbiased, low variance, >= 0)
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    delta = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    if kind == "k1":
        return -delta
    if kind == "k2":
        return 0.5 * delta**2
    if kind == "k3":
        return torch.exp(delta) - 1.0 - delta
    raise ValueError(f"unknown KL estimator {kind!r}; use one of {', '.join(KL_ESTIMATORS)}")
