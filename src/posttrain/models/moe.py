"""Mixture-of-Experts routing: capture, routing replay (R3), routing mismatch, the router
load-balancing loss and a router-aware importance-weight factor.

Supported: transformers' Mixtral and Qwen2-MoE families, whose sparse block calls a top-k router
``mlp.gate`` returning ``(router_logits [M, E], top-k weights [M, k], top-k expert ids [M, k])``
over the block's M flattened tokens. ``RoutingCapture`` puts a forward hook on each router for
the length of one ``with`` block (no module swap: parameter names, checkpoints and
``load_weights`` stay as transformers has them; no hook survives a ``deepcopy``):

- it records the expert ids each token was sent to (the sampler: ``rollout/engine.py``);
- with ``replay`` it replaces the router's own top-k by given expert ids and recomputes their
  weights from the router's logits, w_j = p_{e_j} / sum_i p_{e_i} with p = softmax(router logits)
  (the router's own renormalisation; Qwen2-MoE without ``norm_topk_prob`` keeps p_{e_j}), so the
  gate stays differentiable for the replayed experts;
- it keeps the router logits of a training pass for the load-balancing loss.

Routing replay, R3: "Stabilizing MoE Reinforcement Learning by Aligning Training and Inference
Routers" (Ma et al., arXiv:2510.11370, catalog 000-3). The inference engine records each token's
selected experts; the training forward passes (old log-probs, reference, training) route every
token the sampler routed through those experts. Tokens the sampler never fed forward (the last
completion token, padding) carry id -1 and keep the learner's own routing: nothing that is
scored depends on them.

Routing mismatch (``routing_mismatch``): over the completion tokens the sampler routed (every
completion token but the last, which is never an input) and every MoE layer l, the fraction of
(token, layer) pairs whose top-k expert SET differs between the sampler and the learner:

    mismatch = sum_{t, l} 1[S^roll_{t,l} != S^train_{t,l}] / (#tokens x #layers)

and ``any_layer``: the fraction of tokens with a different set in at least one layer. The
learner's set is the one its pass used (the replayed one under R3, so 0 there) and, as
``unreplayed``, the one its own router picks.

Load balancing (``load_balancing_loss``), Switch Transformer (Fedus et al., arXiv:2101.03961,
eqs. 4-6) with top-k routing as in Mixtral (arXiv:2401.04088), per MoE layer l over its M real
tokens, then averaged over layers:

    L_aux = (1/L) sum_l E * sum_{i=1..E} f_{l,i} * P_{l,i}
    f_{l,i} = (1/M) sum_x 1[i in topk_l(x)]      (fraction of tokens sent to expert i; sums to k)
    P_{l,i} = (1/M) sum_x softmax(z_l(x))_i       (mean router probability of expert i)

f has no gradient; P carries it. Balanced routing gives L_aux = k. (transformers' own
``load_balancing_loss_func`` pools the layers before the product instead of averaging per layer.)

Router-aware IS factor (``router_is_factor``), after "Router-aware Importance-Sampling rescaling
for MoE off-policy RL" (arXiv:2510.23027, catalog 000-1). The abstract says only that the IS
weights are rescaled by a factor guided by the router logits of training and rollout, which
lowers gradient variance; it gives no formula. What is built here is our own simplest version of
that description, not the paper's method: with p^roll, p^train the full-softmax router
probabilities of the sampler's selected experts S_{t,l} (the sampler's recorded at sampling time,
the learner's from its old-log-prob pass),

    D_t = (1/L) sum_l sum_{j in S_{t,l}} |p^train_{t,l}(j) - p^roll_{t,l}(j)|      (in [0, 2])
    w_t <- w_t * exp(-beta * D_t)

so a token whose routing distribution moved between the engines counts less. beta = 0 is off.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F

UNROUTED = -1  # expert id of a token the sampler did not route (never fed forward, or padding)


def routers(model) -> list[torch.nn.Module]:
    """The top-k routers of ``model``'s sparse MoE layers, in layer order (empty for a dense model).
    Dense layers of a partly-sparse model (Qwen2-MoE's ``mlp_only_layers``) are skipped: layer index
    l in every routing tensor counts sparse layers only."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if get is not None else model
    found = []
    for layer in getattr(decoder, "layers", []):
        mlp = getattr(layer, "mlp", None)
        gate = getattr(mlp, "gate", None)
        if gate is not None and hasattr(mlp, "experts") and hasattr(gate, "top_k") and hasattr(gate, "num_experts"):
            found.append(gate)
    return found


def is_moe(model) -> bool:
    return bool(routers(model))


def moe_shape(model) -> tuple[int, int, int]:
    """(sparse layers L, experts E, experts per token k)."""
    found = routers(model)
    return len(found), int(found[0].num_experts), int(found[0].top_k)


class RoutingCapture:
    """Forward hooks on every router of ``model`` while the ``with`` block runs.

    ``replay``: [M, L, k] expert ids (UNROUTED: keep the router's own) for the M tokens of the one
    forward pass run inside the block, in the decoder's flattened (row, position) order.
    ``keep_logits``: keep each layer's router logits (with their graph) for ``aux_inputs``.
    ``probs_of``: [M, L, k] expert ids whose full-softmax router probabilities to keep (no grad).
    After each forward, ``take()`` returns what the routers did in it.
    """

    def __init__(self, model, replay: Optional[torch.Tensor] = None, keep_logits: bool = False,
                 probs_of: Optional[torch.Tensor] = None, record_probs: bool = False):
        self.routers = routers(model)
        self.replay, self.keep_logits, self.probs_of, self.record_probs = replay, keep_logits, probs_of, record_probs
        self.handles: list = []
        self._clear()

    def _clear(self) -> None:
        L = len(self.routers)
        self.used = [[] for _ in range(L)]  # expert ids the pass computed with, per forward
        self.own = [[] for _ in range(L)]  # the router's own top-k
        self.logits = [[] for _ in range(L)]
        self.probs = [[] for _ in range(L)]  # router probabilities of the used (or probs_of) experts

    def __enter__(self) -> "RoutingCapture":
        for layer, router in enumerate(self.routers):
            self.handles.append(router.register_forward_hook(
                lambda module, args, output, layer=layer: self._hook(layer, module, output)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, layer: int, router, output):
        logits, weights, own = output
        used = own
        probs = None
        if self.replay is not None or self.record_probs or self.probs_of is not None:
            probs = torch.softmax(logits.float(), dim=-1)
        if self.replay is not None:
            forced = self.replay[:, layer].to(own.device).long()
            if forced.shape != own.shape:
                raise RuntimeError(f"routing replay: the router of MoE layer {layer} routes {tuple(own.shape)} "
                                   f"(tokens, k) but the replayed routing has {tuple(forced.shape)}; the pass must "
                                   "run exactly the tokens the routing was recorded for")
            known = (forced >= 0).all(-1, keepdim=True)
            used = torch.where(known, forced, own)
            top = probs.gather(-1, used)
            if getattr(router, "norm_topk_prob", True):  # Mixtral always renormalises over the top k
                top = top / top.sum(-1, keepdim=True)
            weights = top.to(weights.dtype)
        self.used[layer].append(used.detach())
        self.own[layer].append(own.detach())
        if self.keep_logits:
            self.logits[layer].append(logits)
        if probs is not None and (self.record_probs or self.probs_of is not None):
            of = used if self.probs_of is None else self.probs_of[:, layer].to(own.device).long().clamp_min(0)
            self.probs[layer].append(probs.detach().gather(-1, of))
        return logits, weights, used

    def take(self) -> dict[str, torch.Tensor]:
        """What the routers did since the last ``take``: ``used`` / ``own`` [M, L, k] ids, ``probs``
        [M, L, k] (when recorded), ``logits``: per layer [M, E] (when kept); then forgets it."""
        out = {"used": torch.stack([torch.cat(x) for x in self.used], 1),
               "own": torch.stack([torch.cat(x) for x in self.own], 1)}
        if self.probs and self.probs[0]:
            out["probs"] = torch.stack([torch.cat(x) for x in self.probs], 1)
        if self.logits and self.logits[0]:
            out["logits"] = [torch.cat(x) for x in self.logits]
        self._clear()
        return out


def routing_mismatch(sampler: torch.Tensor, learner: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Routing mismatch between two [N, T, L, k] expert-id tensors over the tokens where ``mask``
    [N, T] is set and the sampler routed the token (ids >= 0): ``mismatch`` the fraction of
    (token, layer) pairs whose top-k SETS differ, ``any_layer`` the fraction of tokens with a
    difference in some layer, ``tokens`` how many tokens were compared."""
    routed = (sampler >= 0).all(-1).all(-1) & mask.bool()  # [N, T]
    same = (sampler.long().sort(-1).values == learner.long().sort(-1).values).all(-1)  # [N, T, L]
    differ = (~same)[routed]  # [tokens, L]
    n = int(routed.sum())
    if n == 0:
        return {"mismatch": 0.0, "any_layer": 0.0, "tokens": 0.0}
    return {"mismatch": float(differ.float().mean()), "any_layer": float(differ.any(-1).float().mean()),
            "tokens": float(n)}


def load_balancing_loss(logits: list[torch.Tensor], selected: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Switch / Mixtral load-balancing loss (module docstring) of one pass: ``logits`` per layer
    [M, E], ``selected`` [M, L, k] the experts the pass used, ``mask`` [M] its real tokens."""
    keep = mask.bool().to(logits[0].device)
    total = logits[0].new_zeros((), dtype=torch.float32)
    for layer, z in enumerate(logits):
        E = z.shape[-1]
        p = torch.softmax(z[keep].float(), -1)  # [M', E]
        f = F.one_hot(selected[keep][:, layer].long(), E).sum(1).float().mean(0)  # [E], sums to k
        total = total + E * (f * p.mean(0)).sum()
    return total / len(logits)


def router_distance(rollout_probs: torch.Tensor, train_probs: torch.Tensor) -> torch.Tensor:
    """[N, T] D_t = (1/L) sum_l sum_{j in S_{t,l}} |p^train(j) - p^roll(j)| (module docstring) from the
    [N, T, L, k] router probabilities of the sampler's experts; 0 where the sampler recorded none (< 0)."""
    known = (rollout_probs >= 0).all(-1).all(-1)
    D = (train_probs.float() - rollout_probs.float()).abs().sum(-1).mean(-1)
    return torch.where(known, D, torch.zeros_like(D))


def router_is_factor(distance: torch.Tensor, mask: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """[N, T] factor exp(-beta D_t) of the router-aware IS rescaling (module docstring), 1 off ``mask``,
    and its metrics over ``mask``."""
    on = mask.bool()
    factor = torch.where(on, torch.exp(-beta * distance.float()), torch.ones_like(distance, dtype=torch.float32))
    n = max(1, int(on.sum()))
    return factor, {"moe/router_distance": float(distance[on].sum()) / n,
                    "moe/router_is_factor": float(factor[on].sum()) / n}


class LearnerRouting:
    """The learner's side of MoE routing for its policy (trainers/learner.py): each log-prob pass runs
    inside ``in_pass``, which replays the sampler's routing (``replay``, R3), adds the pass's routing
    mismatch to ``counts`` (``measure``: the policy's passes, not the reference's), keeps the
    training pass's load-balancing loss in ``aux`` (``keep_aux``, under grad) and, when
    ``want_distance``, the router distance D of the pass's rows in ``distance``.

    The pass must run the batch's rows as one sequence each (prompt + completion[:-1], no shared
    prompt pass), the layout the recorded routing is flattened into.
    """

    def __init__(self):
        self.replay = self.keep_aux = self.want_distance = False
        self.aux: Optional[torch.Tensor] = None
        self.distance: Optional[torch.Tensor] = None
        self.reset()

    def reset(self) -> None:
        self.counts: dict[str, float] = {}

    @staticmethod
    def pooled(counts: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
        """(sums, counts) of the routing metrics, for a token-weighted mean (``sums / counts``, also over
        data-parallel ranks): ``moe/routing_mismatch`` (sampler vs the experts the learner's passes
        used), ``moe/routing_mismatch_any_layer``, and ``..._unreplayed``: vs the learner router's own top-k."""
        sums = {f"moe/routing_{k}": v for k, v in sorted(counts.items()) if k != "tokens"}
        return sums, {k: counts["tokens"] for k in sums}

    def metrics(self) -> dict[str, float]:
        """The routing metrics of the passes since ``reset`` (one process)."""
        if not self.counts.get("tokens"):
            return {}
        sums, counts = self.pooled(self.counts)
        return {k: v / counts[k] for k, v in sums.items()}

    def _add(self, name: str, result: dict[str, float]) -> None:
        for key in ("mismatch", "any_layer"):
            k = ("mismatch" if key == "mismatch" else "mismatch_any_layer") + name
            self.counts[k] = self.counts.get(k, 0.0) + result[key] * result["tokens"]
        if not name:
            self.counts["tokens"] = self.counts.get("tokens", 0.0) + result["tokens"]

    @contextmanager
    def in_pass(self, model, batch, measure: bool):
        routed = batch.completion_routing is not None and batch.prompt_routing is not None
        if self.replay and not routed:
            raise RuntimeError("algorithm.moe.routing_replay: this batch carries no routing from the sampler (its "
                               "engine does not record it; the hf engine does)")
        keep = self.keep_aux and torch.is_grad_enabled()
        if not (routed or keep):
            yield
            return
        P, T = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
        masks = torch.cat([batch.prompt_mask, batch.completion_mask[:, : T - 1]], 1).bool()  # the pass's inputs
        n, S = masks.shape
        flat = None
        if routed:  # the routing of the pass's inputs, in its flattened (row, position) order
            seq = torch.cat([batch.prompt_routing, batch.completion_routing[:, : T - 1]], 1)
            flat = seq.reshape(n * S, *seq.shape[2:])
        want = self.want_distance and measure and routed
        capture = RoutingCapture(model, replay=flat if self.replay else None, keep_logits=keep,
                                 probs_of=flat if want else None)
        with capture:
            yield
        got = capture.take()
        if keep:
            self.aux = load_balancing_loss(got["logits"], got["used"], masks.reshape(-1))
        if not routed:
            return
        sampler = batch.completion_routing[:, : T - 1]
        mask = batch.completion_mask[:, : T - 1]
        if measure:
            for name, ids in (("", got["used"]), ("_unreplayed", got["own"])):
                self._add(name, routing_mismatch(sampler, ids.cpu().view(n, S, *ids.shape[1:])[:, P:], mask))
        if want:
            probs = got["probs"].cpu().view(n, S, *got["probs"].shape[1:])[:, P:]
            D = router_distance(batch.completion_router_probs[:, : T - 1], probs)
            self.distance = torch.cat([D, D.new_zeros((n, 1))], 1)  # the last token was never routed
