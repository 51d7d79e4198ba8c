"""A lean forward for Llama-architecture decoders (Llama, SmolLM2, Qwen2), for sampler and learner.

transformers' decoder layer is written for every model and backend; on a CPU its generic
plumbing (mask builders, cache objects, ``repeat_kv`` copies, fp32 casts kept for autograd)
costs about as much as the arithmetic for a 135M model. This module computes the same function
from the same ``nn.Module`` weights with the fewest tensors alive:

    h   = x + o_proj(attention(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1)))   n1 = rms(x)
    out = h + down_proj(silu(gate_proj(n2)) * up_proj(n2))                       n2 = rms(h)
    rms(x) = w * (x / sqrt(mean(x^2) + eps))   (in fp32, rounded to the compute dtype)

Three autograd functions keep only what their backward needs:

- ``RMSNormFn`` saves its input and 1/rms (not the fp32 copies autograd would keep);
- ``GroupedAttentionFn`` runs grouped-query attention without repeating K/V per query head
  and saves the probabilities in the compute dtype (autograd keeps them in fp32 and again in
  bf16);
- ``SwiGLUFn`` recomputes silu(g) * u in the backward instead of saving it and silu(g).

The elementwise work between the matmuls (the norms, the SiLU gate, RoPE, the masked softmax,
and their backwards) comes from ``models/fused.py``: one compiled kernel each on large CPU
tensors, eager PyTorch otherwise.

Per token and layer of SmolLM2-135M this keeps about 17 KB of bf16 activations where the
transformers layer keeps about 28 KB. Keys and values go through a small protocol (``KVStore.attend``) so one
layer function serves the learner (optionally with a prompt prefix computed once for many
rows) and the sampler (static pre-allocated cache, no ``torch.cat`` per step). Given the
positions that matter (``tokens``), the token-wise work runs on the real tokens only and
attention alone sees the padded grid (``Packing``).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from posttrain.models.fused import (RopeFn, masked_softmax, masked_softmax_backward, rms_norm, rms_norm_backward,
                                    silu_mul, silu_mul_backward)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


def unsupported_reason(decoder) -> Optional[str]:
    """None when ``decoder`` (a transformers ``*Model``) can run here; else why not."""
    config = getattr(decoder, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} is not silu"
    if getattr(config, "use_sliding_window", False):
        return "sliding-window attention"
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(decoder, name):
            return f"the decoder has no {name!r}"
    for layer in decoder.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return "a layer lacks the Llama attention projections"
        if not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            return "a layer lacks the SwiGLU MLP"
        if any(getattr(mlp, p).bias is not None for p in ("gate_proj", "up_proj", "down_proj")):
            return "MLP biases"
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return "per-head q/k norms"
        # peft's LoRA layers (model.lora) wrap the nn.Linear as base_layer: this decoder reads the
        # projection weights directly, which would skip the adapter (models/lora.py)
        if any(hasattr(getattr(m, p), "base_layer") for m, names in ((attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                                                     (mlp, ("gate_proj", "up_proj", "down_proj")))
               for p in names):
            return "LoRA adapter layers (peft) wrap the projections, and the lean decoder reads their weights directly"
    return None


def supports(decoder) -> bool:
    return unsupported_reason(decoder) is None


# ------------------------------------------------------------------------ autograd functions
def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``t`` runs in here: autocast's when it is on, else ``t``'s own."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


def _to_compute(ctx, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Cast the inputs of a matmul function as autocast would; remember their dtypes for the grads.

    The function bodies then run with autocast off (a backward does not see the forward's
    autocast state, so both sides must be explicit).
    """
    dtype = compute_dtype(tensors[0])
    ctx.input_dtypes = [t.dtype for t in tensors]
    return [t.to(dtype) for t in tensors]


def _from_compute(ctx, *grads):
    return tuple(g.to(dt) if g is not None else None for g, dt in zip(grads, ctx.input_dtypes))


class RMSNormFn(torch.autograd.Function):
    """y = w * round(x * r), r = 1 / sqrt(mean(x^2) + eps), computed in fp32.

    Backward with x_hat = x r and g' = g w:  dx = r (g' - x_hat mean(g' x_hat)),  dw = sum g x_hat.
    As in transformers' RMSNorm, w multiplies the rounded x r, and g' = g w is formed in the
    input dtype; everything else is fp32 (mixed-dtype ops promote without a separate copy).
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        y, rstd = rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_w = rms_norm_backward(grad, x, weight, rstd)
        return grad_x, grad_w if ctx.needs_input_grad[1] else None, None


class SwiGLUFn(torch.autograd.Function):
    """y = down(silu(x Wg^T) * (x Wu^T)); saves x, g = x Wg^T, u = x Wu^T and recomputes the rest.

    With a = silu(g) u:  da = dy Wd,  du = da silu(g),  dg = da u silu'(g),
    silu'(g) = s (1 + g (1 - s)), s = sigmoid(g). The elementwise ops are the ones autograd
    runs for ``silu(g) * u`` (same kernels, same rounding); only what is saved differs.
    """

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down):
        x, w_gate, w_up, w_down = _to_compute(ctx, x, w_gate, w_up, w_down)
        with torch.autocast(x.device.type, enabled=False):
            g, u = F.linear(x, w_gate), F.linear(x, w_up)
            ctx.save_for_backward(x, g, u, w_gate, w_up, w_down)
            return F.linear(silu_mul(g, u), w_down)

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors  # read once: checkpointing allows a single unpack
        with torch.autocast(dy.device.type, enabled=False):
            return _from_compute(ctx, *SwiGLUFn._grads(dy.to(saved[0].dtype), *saved))

    @staticmethod
    def _grads(dy, x, g, u, w_gate, w_up, w_down):
        da = dy @ w_down
        a, dg, du = silu_mul_backward(da, g, u)
        grad_down = dy.reshape(-1, dy.shape[-1]).t() @ a.reshape(-1, w_down.shape[1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_gate = dg.reshape(-1, dg.shape[-1]).t() @ x2
        grad_up = du.reshape(-1, du.shape[-1]).t() @ x2
        grad_x = dg @ w_gate
        grad_x += du @ w_up
        return grad_x, grad_gate, grad_up, grad_down


class GroupedAttentionFn(torch.autograd.Function):
    """o = softmax(q k^T * scale + mask) v with G query heads per key/value head.

    q: [n, KV, G*Lq, D] (query heads grouped by their K/V head), k, v: [n, KV, Lk, D],
    mask: additive [n, 1, Lq, Lk]. As transformers' eager attention: scores and mask in the
    compute dtype, the softmax in fp32, the probabilities p kept in the compute dtype.
    Backward: dv = p^T do, dp = do v^T, ds = p (dp - sum(dp p)), dq = ds k * scale,
    dk = ds^T q * scale.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, scale: float, groups: int):
        q, k, v = _to_compute(ctx, q, k, v)
        n, kv, gl, _ = q.shape
        lk = k.shape[2]
        with torch.autocast(q.device.type, enabled=False):
            scores = (q @ k.transpose(-1, -2)).view(n, kv, groups, gl // groups, lk)
            p = masked_softmax(scores, mask[:, :, None], scale).view(n, kv, gl, lk)
            ctx.save_for_backward(q, k, v, p)
            ctx.scale = scale
            return p @ v

    @staticmethod
    def backward(ctx, do):
        q, k, v, p = ctx.saved_tensors
        with torch.autocast(do.device.type, enabled=False):
            do = do.to(q.dtype)
            dv = p.transpose(-1, -2) @ do
            ds = masked_softmax_backward(do @ v.transpose(-1, -2), p, ctx.scale)
            return *_from_compute(ctx, ds @ k, ds.transpose(-1, -2) @ q, dv), None, None, None


# ------------------------------------------------------------------------ keys and values
class KVStore:
    """Where a layer's new keys/values go and what it attends to. ``attend`` returns (K, V)."""

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class PrefixKV(KVStore):
    """Attend to a fixed per-layer prefix (e.g. shared prompt keys/values) plus the new tokens.

    Pure (nothing is stored), so a checkpointed layer can recompute it. ``record=True`` keeps
    the new keys/values, for a prompt pass whose cache later rows read.
    """

    def __init__(self, prefix: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None, record: bool = False):
        self.prefix = prefix
        self.recorded: list[tuple[torch.Tensor, torch.Tensor]] = [] if record else None

    def attend(self, layer, k, v):
        if self.recorded is not None and len(self.recorded) == layer:  # not again on a checkpoint's recompute
            self.recorded.append((k, v))
        if not self.prefix:
            return k, v
        pk, pv = self.prefix[layer]
        return torch.cat([pk, k], 2), torch.cat([pv, v], 2)


class StaticKV(KVStore):
    """Pre-allocated [layers, rows, KV, capacity, D] keys and values for sampling (no grad).

    ``length`` positions are filled; a forward writes its new tokens after them and attends to
    the filled part. ``advance`` moves ``length`` once every layer has run.
    """

    def __init__(self, layers: int, rows: int, kv_heads: int, capacity: int, head_dim: int, dtype, device):
        self.k = torch.zeros((layers, rows, kv_heads, capacity, head_dim), dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    @classmethod
    def for_config(cls, config, rows: int, capacity: int, dtype, device):
        """A cache shaped for a transformers model ``config`` (layers, K/V heads, head dim)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, rows, config.num_key_value_heads, capacity, head_dim, dtype, device)

    def attend(self, layer, k, v):
        end = self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"static KV cache of capacity {self.k.shape[3]} cannot hold {end} positions")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, steps: int) -> None:
        self.length += steps

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only rows ``index`` (in that order), e.g. to drop finished samples or repeat prompts."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)


# ------------------------------------------------------------------------ the forward
def additive_mask(key_mask: torch.Tensor, queries: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[n, 1, Lq, Lk] in ``dtype``: 0 where query i (the last ``queries`` positions) may attend key j.

    Keys are allowed when ``key_mask`` is 1 and they are not in the query's future; the others
    get ``dtype``'s most negative finite value (fp32's would round to -inf in bf16 and turn a
    fully masked row into NaN). Fully masked rows (left padding) get uniform attention.
    """
    n, lk = key_mask.shape
    query_pos = torch.arange(lk - queries, lk, device=key_mask.device)
    allowed = (torch.arange(lk, device=key_mask.device)[None, :] <= query_pos[:, None])[None] & key_mask[:, None, :].bool()
    return torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min)[:, None]


class Packing:
    """The real tokens of an [n, L] grid, packed into rows [T] for the token-wise work.

    Projections, MLPs and norms act on each token alone, so they run on the T real tokens
    only; attention, which needs the grid, scatters queries/keys/values into it (zeros at the
    skipped positions, which the key mask excludes) and gathers its output back. On RL batches
    cut by length this skips the 15-25% of padded positions of every micro-batch.
    """

    def __init__(self, tokens: torch.Tensor):
        self.n, self.L = tokens.shape
        self.index = tokens.reshape(-1).nonzero().squeeze(1)

    def pack(self, grid: torch.Tensor) -> torch.Tensor:
        """[n, L, ...] -> [T, ...]"""
        return grid.reshape(self.n * self.L, *grid.shape[2:]).index_select(0, self.index)

    def unpack(self, rows: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [n, L, ...] with zeros at the skipped positions."""
        grid = rows.new_zeros((self.n * self.L, *rows.shape[1:])).index_copy(0, self.index, rows)
        return grid.view(self.n, self.L, *rows.shape[1:])


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float,
                      use_sdpa: bool) -> torch.Tensor:
    """Attention output [n, H, L, D] of queries q [n, H, L, D] over keys/values [n, KV, Lk, D]
    (H = G * KV), additive ``mask`` [n, 1, L, Lk]: PyTorch's SDPA, or ``GroupedAttentionFn``."""
    n, heads, L, D = q.shape
    kv_heads = keys.shape[1]
    if use_sdpa:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale,
                                              enable_gqa=heads != kv_heads)
    groups = heads // kv_heads
    qg = q.reshape(n, kv_heads, groups * L, D)
    return GroupedAttentionFn.apply(qg, keys, values, mask, scale, groups).view(n, heads, L, D)


def _layer(layer, x, cos, sin, mask, kv: KVStore, index: int, heads: int, kv_heads: int, use_sdpa: bool,
           packing: Optional[Packing] = None):
    """One decoder layer on x [n, L, H], or on packed tokens x [T, H] with ``packing``."""
    attn, mlp = layer.self_attn, layer.mlp
    D = cos.shape[-1]
    n, L = (packing.n, packing.L) if packing is not None else x.shape[:2]
    norm = layer.input_layernorm
    h = RMSNormFn.apply(x, norm.weight, norm.variance_epsilon)
    c, s = cos[..., None, :], sin[..., None, :]

    def heads_first(t: torch.Tensor, count: int, rotate: bool) -> torch.Tensor:
        t = t.view(*t.shape[:-1], count, D)
        if rotate:
            t = RopeFn.apply(t, c, s)
        return (packing.unpack(t) if packing is not None else t).transpose(1, 2)  # [n, count, L, D]

    q = heads_first(F.linear(h, attn.q_proj.weight, attn.q_proj.bias), heads, True)
    k = heads_first(F.linear(h, attn.k_proj.weight, attn.k_proj.bias), kv_heads, True)
    v = heads_first(F.linear(h, attn.v_proj.weight, attn.v_proj.bias), kv_heads, False)
    keys, values = kv.attend(index, k, v)
    o = grouped_attention(q, keys, values, mask, getattr(attn, "scaling", D ** -0.5), use_sdpa).transpose(1, 2)
    o = packing.pack(o).reshape(-1, heads * D) if packing is not None else o.reshape(n, L, heads * D)
    x = x + attn.o_proj(o)
    norm = layer.post_attention_layernorm
    h = RMSNormFn.apply(x, norm.weight, norm.variance_epsilon)
    return x + SwiGLUFn.apply(h, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)


def hookable_layer_calls(decoder) -> None:
    """Give each layer a ``lean_forward`` attribute that ``decoder_forward`` calls instead of
    ``_layer``: a wrapper can then hook it as the layer's forward (posttrain.distributed.fsdp
    registers it with FSDP, which must gather a layer's weights around every call)."""
    for layer in decoder.layers:
        layer.lean_forward = functools.partial(_layer, layer)


def decoder_forward(decoder, input_ids: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor,
                    kv: Optional[KVStore] = None, *, use_sdpa: bool = False, checkpoint_layers: bool = False,
                    last_only: bool = False, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Final-norm hidden states [n, L, H] (or [n, H] with ``last_only``) of ``input_ids`` [n, L].

    ``key_mask`` [n, prefix + L] marks real tokens among the keys (the KV store's prefix, then
    the inputs); attention is causal. ``tokens`` [n, L] (optional) marks the positions to
    compute: the others are skipped (their states are zeros, and they are no key to anyone),
    which is exact when no computed position needs them, as for left-padded prompts or
    right-padded completions. ``checkpoint_layers`` recomputes each layer in the backward
    (activation checkpointing), keeping only the layer inputs alive.
    """
    config = decoder.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    kv = kv or PrefixKV()
    L = input_ids.shape[1]
    packing = None
    if tokens is not None and not bool(tokens.all()):
        packing = Packing(tokens.bool())
        key_mask = torch.cat([key_mask[:, :-L], key_mask[:, -L:] * tokens], 1)  # skipped: no key
        input_ids, position_ids = packing.pack(input_ids), packing.pack(position_ids)[None]
    x = decoder.embed_tokens(input_ids)
    cos, sin = decoder.rotary_emb(x, position_ids)
    if packing is not None:
        cos, sin = cos[0], sin[0]
    mask = additive_mask(key_mask, L, compute_dtype(x))
    for i, layer in enumerate(decoder.layers):
        call = getattr(layer, "lean_forward", None) or functools.partial(_layer, layer)
        if checkpoint_layers and torch.is_grad_enabled():
            x = checkpoint(call, x, cos, sin, mask, kv, i, heads, kv_heads, use_sdpa, packing, use_reentrant=False)
        else:
            x = call(x, cos, sin, mask, kv, i, heads, kv_heads, use_sdpa, packing)
    norm = decoder.norm
    if packing is not None:
        x = packing.unpack(RMSNormFn.apply(x, norm.weight, norm.variance_epsilon))
        return x[:, -1] if last_only else x
    return RMSNormFn.apply(x[:, -1] if last_only else x, norm.weight, norm.variance_epsilon)
