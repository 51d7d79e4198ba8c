"""``algorithm.moe``: Mixture-of-Experts options of the RL trainer (formulas in models/moe.py).

    algorithm.moe.routing_replay: true    # R3 (arXiv:2510.11370): the learner's passes route each token
                                          # through the experts the sampler chose for it
    algorithm.moe.aux_loss_coef: 0.01     # Switch/Mixtral load-balancing loss added to the policy loss
    algorithm.moe.router_is_beta: 1.0     # IS weights x exp(-beta D_t), D_t the router-probability
                                          # distance of train vs rollout (our version of arXiv:2510.23027)

Read only when the model has MoE layers (``model.name=tiny-random-moe``, a Mixtral or Qwen2-MoE
checkpoint); on a dense model any of them is an error at learner start. The routing metrics
(``moe/routing_mismatch`` ...) are logged for every MoE model whatever these say.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass
class MoEConfig:
    routing_replay: bool = False
    aux_loss_coef: float = 0.0
    router_is_beta: float = 0.0

    def __post_init__(self) -> None:
        for key in ("aux_loss_coef", "router_is_beta"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"algorithm.moe.{key} must be a finite number >= 0 (0 turns it off), got {value!r}")

    @property
    def active(self) -> bool:
        return self.routing_replay or self.aux_loss_coef > 0 or self.router_is_beta > 0


def moe_issue(cfg) -> Optional[tuple[str, str]]:
    """(key, message) when an RLConfig asks for an MoE option its other sections rule out, else None."""
    moe = cfg.algorithm.moe
    if (moe.routing_replay or moe.router_is_beta > 0) and cfg.rollout.engine == "vllm":
        key = "algorithm.moe.routing_replay" if moe.routing_replay else "algorithm.moe.router_is_beta"
        return key, ("needs the sampler's per-token expert routing, which posttrain's vLLM engine does not return "
                     "(vLLM's LLM.generate reports no routed experts); use rollout.engine=hf, or turn it off")
    if (moe.routing_replay or moe.router_is_beta > 0) and cfg.environment is not None:
        return "algorithm.moe", ("routing replay and the router IS factor work on single-turn rollouts only: "
                                 "multi-turn episodes do not carry the sampler's routing; set environment=null")
    return None
