"""SFT losses: the NLL and the f-divergence variants of Wang et al. (catalog 004-48).

Wang et al., "Implicit Reward as the Bridge: A Unified View of SFT and DPO Connections"
(arXiv:2507.00018), read SFT as implicit-reward learning: with a divergence D_f(pi || pi_ref)
as the regulariser, the policy's implicit reward is (f-DPO, Wang et al., "Beyond Reverse KL:
Generalizing Direct Preference Optimization with Diverse Divergence Constraints",
arXiv:2309.16240)

    r(x, y) = beta f'(u) + const(x),        u = pi_theta(y | x) / pi_ref(y | x)

and SFT maximises the implicit reward of the demonstrations. Under the reverse KL
(f(u) = u log u, f'(u) = log u + 1) the reference is an additive constant and drops out: that
objective is the ordinary NLL, which is the paper's point ("the KL term is constant in SFT", so
nothing constrains the update). Under the other f-divergences whose f' maps onto the reward
without the normaliser (f-DPO's condition: 0 not in the domain of f') -- forward KL,
Jensen-Shannon and the alpha-divergences -- the reference stays in the loss, and the gradient
on a token fades once the policy puts more mass on it than the reference did.

What is implemented, and why. The catalog card (004-48) and the abstract give no formula, and
the paper's body was not available here, so this module implements the construction above, not
the paper's equations: the loss on a demonstration token is -f'(u_t) with f' from f-DPO's table
(beta = 1: it only rescales the gradient, as the learning rate does), and the ratio is taken per
token,

    u_t = pi_theta(y_t | x, y_<t) / pi_ref(y_t | x, y_<t),

so that the token-mean over completion tokens reads as the NLL does (for the NLL the per-token
and per-sequence forms are the same sum; for the others a per-sequence ratio, the exp of a sum
of hundreds of log-ratios, overflows). pi_ref is the policy the run starts from. With
l = log pi_theta(y_t), rho = log pi_ref(y_t) and delta = l - rho (u = e^delta):

    nll         l_t = -l                       dl_t/dl = -1           (reverse KL; no reference)
    forward_kl  l_t = e^(-delta)   (= 1 / u)   dl_t/dl = -1 / u       (f(u) = -log u)
    js          l_t = -log(2u / (1 + u))       dl_t/dl = -sigma(-delta)
                    = -log 2 - log sigma(delta)                      (f(u) = u log u - (u+1) log((u+1)/2))
    alpha       l_t = (u^-alpha - 1) / alpha   dl_t/dl = -u^-alpha    (0 < alpha < 1; alpha -> 0: nll,
                                                                       alpha -> 1: forward_kl up to a constant)

At the start (u = 1) forward_kl and alpha have the NLL's gradient and js half of it; as u grows
past 1 their gradients shrink (1/u, u^-alpha, sigma(-delta)), which is the KL-like constraint the
paper wants kept active. A trainer reduces l_t as it reduces the NLL: sum of m_t l_t over the
batch's completion tokens divided by their count.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from posttrain.algorithms.base import Registry

SFTLossFn = Callable[[torch.Tensor, Optional[torch.Tensor], float], torch.Tensor]
SFT_LOSSES: Registry[SFTLossFn] = Registry("sft_loss")
PAPER = "Implicit Reward as the Bridge: A Unified View of SFT and DPO Connections (arXiv:2507.00018)"
# Losses whose value does not depend on a reference model (the rest need pi_ref's token log-probs).
REFERENCE_FREE = ("nll",)


@SFT_LOSSES.register("nll", textbook=True)
def nll(logp: torch.Tensor, ref_logp: Optional[torch.Tensor] = None, alpha: float = 0.5) -> torch.Tensor:
    """Token NLL: l_t = -log pi_theta(y_t | x, y_<t) (reverse KL's -f'(u) up to terms constant in theta)."""
    return -logp


@SFT_LOSSES.register("forward_kl", paper=PAPER)
def forward_kl(logp: torch.Tensor, ref_logp: Optional[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """Forward-KL SFT: l_t = pi_ref(y_t) / pi_theta(y_t) = exp(-(logp - ref)); -f'(u) of f(u) = -log u."""
    return torch.exp(_ref(ref_logp, "forward_kl") - logp)


@SFT_LOSSES.register("js", paper=PAPER)
def js(logp: torch.Tensor, ref_logp: Optional[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """Jensen-Shannon SFT: l_t = -log(2u / (1 + u)) = -log 2 - log sigmoid(logp - ref), u = pi_theta / pi_ref."""
    # logsigmoid is the stable form of log(u / (1 + u)) for any sign and size of the log-ratio
    return -math.log(2.0) - F.logsigmoid(logp - _ref(ref_logp, "js"))


@SFT_LOSSES.register("alpha", paper=PAPER)
def alpha_divergence(logp: torch.Tensor, ref_logp: Optional[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """alpha-divergence SFT: l_t = (u^-alpha - 1) / alpha, u = pi_theta / pi_ref, 0 < alpha < 1."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"the alpha SFT loss needs 0 < alpha < 1, got {alpha} (alpha -> 0 is nll, -> 1 forward_kl)")
    return (torch.exp(-alpha * (logp - _ref(ref_logp, "alpha"))) - 1.0) / alpha


def _ref(ref_logp: Optional[torch.Tensor], name: str) -> torch.Tensor:
    if ref_logp is None:
        raise ValueError(f"the {name} SFT loss needs the reference model's token log-probs (ref_logp)")
    return ref_logp


def token_losses(name: str, logp: torch.Tensor, ref_logp: Optional[torch.Tensor] = None,
                 alpha: float = 0.5) -> torch.Tensor:
    """Per-token loss l_t of SFT loss ``name`` ([N, T] like ``logp``; the caller masks and averages)."""
    return SFT_LOSSES.get(name)(logp, ref_logp, alpha)


def needs_reference(name: str) -> bool:
    return name not in REFERENCE_FREE


__all__ = ["PAPER", "SFT_LOSSES", "needs_reference", "token_losses"]
