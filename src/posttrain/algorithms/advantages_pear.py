"""PEAR: the phase entropy aware reward, as an advantage estimator (catalog 002-97).

"PEAR: Phase Entropy Aware Reward for Efficient Reasoning" (Huang, Lu, Zhang; arXiv:2510.08026,
ICLR 2026). A response y = (y_1..y_T) is split at the token k that closes the thinking phase
(``</think>``); with the per-token entropy H_t of the policy at the rollout weights (pi_old),

    H_think  = mean_{t < k} H_t,        H_answer = mean_{t > k} H_t      (the tag itself in neither)
    P(y)     = max(0, H_think - alpha * H_answer)                       (alpha = 1 in the paper)
    r(y)     = min(1, s - P(y))  if the answer is correct,   r_fmt otherwise

and r(y) replaces the binary reward in GRPO's group normalisation. A response without the tag is
all thinking: k = T, H_answer = 0. So among correct answers the one whose thinking is least
uncertain, relative to its answer, is preferred; wrong answers are untouched.

Where the formula comes from: the official code (github.com/iNLP-Lab/PEAR) could not be fetched
here; the equations above are those that two independent write-ups of the paper give identically
(the ICLR 2026 paper notes at papernotes.org and a Chinese summary, both with Eq. 5-7), and the
ICLR reviews confirm the max in Eq. 7, entropy under pi_old, and the missing-tag rule.

What differs from the paper, and why:
- "Correct" is ``reward > 0`` (as everywhere in posttrain's shaped estimators) and s is that
  sample's own reward, so r = r_i - P_i on correct samples and r_i elsewhere; with the paper's
  binary reward (s = 1, r_fmt = 0) this is its r(y) (min(1, s - P) = s - P since P >= 0, s <= 1).
  The paper does not floor r, and neither do we: a correct answer with P > s scores below a wrong
  one, which the paper's LRMs (thinking entropies well under 1 nat) never reach.
- The phase boundary is found as the token-id sequence of ``pear_close_tag`` (the tokenizer's
  encoding of it, matched at its first occurrence); a tag tokenised differently in context is not
  found, and the response counts as all thinking, the paper's rule for a missing tag.
- H_t are the entropies the trainer has at the rollout weights: the sampler's recorded ones (hf
  engine), else the learner's pass at the rollout weights (pi_old exactly), as for the 80/20 mask.
"""

from __future__ import annotations

from typing import Sequence

import torch

from posttrain.algorithms.advantages import broadcast, group_stats, scale_by_std
from posttrain.algorithms.base import ADVANTAGES, AdvantageConfig, AdvantageInput

THINK, ANSWER = 1, 2  # values of AdvantageInput.phases; 0 marks the closing tag and padding


def think_phases(completion_ids: torch.Tensor, mask: torch.Tensor, close_ids: Sequence[int]) -> torch.Tensor:
    """[N, T] long: 1 on thinking tokens, 2 on answer tokens, 0 on the closing tag and padding.

    The thinking phase ends at the first occurrence of the token sequence ``close_ids`` among the
    completion's tokens; without one the whole completion is thinking (PEAR's k = T).
    """
    if len(close_ids) == 0:
        raise ValueError("pear: the closing tag encodes to no tokens; set algorithm.advantage.pear_close_tag")
    valid = mask > 0
    phases = torch.where(valid, THINK, 0).long()
    tag = torch.tensor(list(close_ids), dtype=completion_ids.dtype, device=completion_ids.device)
    width = tag.numel()
    T = completion_ids.shape[1]
    if T < width:
        return phases
    windows = completion_ids.unfold(1, width, 1)  # [N, T - width + 1, width]
    hit = (windows == tag).all(-1) & valid[:, width - 1:]  # the whole tag among generated tokens
    for i in hit.any(-1).nonzero().flatten().tolist():
        k = int(hit[i].nonzero()[0])
        phases[i, k:k + width] = 0
        phases[i, k + width:] = torch.where(valid[i, k + width:], ANSWER, 0)
    return phases


def phase_entropies(entropies: torch.Tensor, phases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_think, H_answer), float64 [N]: the mean entropy of each phase, 0 for an empty phase."""
    ent = entropies.detach().to(torch.float64)

    def mean(which: int) -> torch.Tensor:
        sel = (phases == which).to(torch.float64)
        return (ent * sel).sum(-1) / sel.sum(-1).clamp_min(1.0)

    return mean(THINK), mean(ANSWER)


def pear_penalty(entropies: torch.Tensor, phases: torch.Tensor, alpha: float) -> torch.Tensor:
    """P(y) = max(0, H_think - alpha * H_answer), float64 [N]."""
    think, answer = phase_entropies(entropies, phases)
    return (think - alpha * answer).clamp_min(0.0)


@ADVANTAGES.register(
    "pear",
    paper="PEAR: Phase Entropy Aware Reward for Efficient Reasoning (arXiv:2510.08026)",
)
def pear(inp: AdvantageInput, cfg: AdvantageConfig) -> torch.Tensor:
    """GRPO on PEAR's phase-entropy-shaped reward (see the module docstring):

        r'_i = r_i - max(0, H_think_i - alpha H_answer_i)   if r_i > 0 (correct),   r_i otherwise
        A_i  = (r'_i - mean_group r') / (std_group r' + eps)       (no std with std_normalize=false)

    alpha = ``cfg.pear_alpha`` (paper: 1). Needs ``inp.entropies`` and ``inp.phases`` (the trainer
    fills them: entropies at the rollout weights, phases split at ``cfg.pear_close_tag``).
    """
    if inp.entropies is None or inp.phases is None:
        raise ValueError("advantage estimator pear needs per-token entropies and the thinking/answer phases "
                         "(AdvantageInput.entropies, .phases); the RL trainer fills both")
    rewards = inp.rewards.to(torch.float64)
    penalty = pear_penalty(inp.entropies, inp.phases, cfg.pear_alpha).to(rewards.device)
    shaped = torch.where(rewards > 0, rewards - penalty, rewards)
    mean, std, _ = group_stats(shaped, inp.group_ids)
    adv = shaped - mean
    adv = scale_by_std(adv, std, cfg.eps) if cfg.std_normalize else adv
    return broadcast(adv, inp.mask)
