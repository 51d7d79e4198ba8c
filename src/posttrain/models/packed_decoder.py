"""The sampler's forward on a CPU: no autograd, weights pre-packed for oneDNN's bf16 matmuls.

Decoding a 135M model at batch 64 on two cores spends most of a step outside arithmetic: the
lean decoder (``fast_decoder``) serves the learner too, so it goes through autograd functions,
three q/k/v and two gate/up matmuls, and an attention that reads the static KV cache through
strided slices (which ``bmm`` copies before multiplying). This module computes the same layer,

    h   = x + o_proj(attention(rope(q(n1)), rope(k(n1)), v(n1)))      n1 = rms(x)
    out = h + down(silu(gate(n2)) * up(n2))                          n2 = rms(h)

with, per layer, one matmul for [q; k; v], one rotary pass over q and k together, PyTorch's
fused SDPA kernel (which reads strided keys/values in place), and the MLP's and residuals'
elementwise work done by the matmuls themselves as oneDNN post-ops (SiLU after gate, the product
with gate after up, each residual add after o and down), on weights reordered once into oneDNN's
blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, the layout inductor's weight
freezing uses). Packing costs a copy of the weights (one more
model's worth of memory in bf16) and ~0.1 s for SmolLM2-135M; it is redone only after
``invalidate`` (the engine calls it in ``load_weights``, which every trainer calls after an
optimizer step) or when a parameter's storage or in-place version counter changed. Writes
through ``.data`` (as the split-master optimizer's) bump no version: those must go through
``load_weights``, as the Sampler contract asks anyway.

Matmuls on packed weights give the same bits as ``F.linear`` here; a post-op applies to the
fp32 accumulator before the one rounding to bf16 (the learner rounds the matmul, then the SiLU
or add: at most an ulp apart, the post-op nearer the exact value), and the attention kernel
differs from the learner's eager one (fp32 scores with an online softmax, where eager rounds
the scores to bf16). The behaviour/learner log-prob mismatch metrics measure both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from posttrain.models.fast_decoder import StaticKV, additive_mask, grouped_attention
from posttrain.models.fused import rms_norm, rope


def packing_available(model: torch.nn.Module) -> bool:
    """oneDNN can pack this model's weights: bf16 on a CPU whose oneDNN computes bf16."""
    param = next(model.parameters())
    return (param.device.type == "cpu" and param.dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    # ``rows`` only guides oneDNN's choice of layout; any number of rows multiplies correctly.
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows)


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor], post: str = "none") -> torch.Tensor:
    """post(x W^T + b): ``post`` "none", or "swish" (SiLU) applied before rounding."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, post, [None], "")


def _linear_then(x: torch.Tensor, other: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor],
                 op: str) -> torch.Tensor:
    """(x W^T + b) op other, ``op`` "add" or "mul", in the matmul's output pass: one fewer
    kernel and one fewer bf16 rounding than a separate elementwise op (~15 us an add and
    ~100 us for SiLU-times-up a layer at batch 64 on SmolLM2-135M, this project's host)."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, packed, bias, op)


def _cat_bias(*linears) -> Optional[torch.Tensor]:
    if all(m.bias is None for m in linears):
        return None
    return torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.weight.shape[0])
                      for m in linears])


@dataclass
class _PackedLayer:
    qkv: torch.Tensor
    qkv_bias: Optional[torch.Tensor]
    o: torch.Tensor
    o_bias: Optional[torch.Tensor]
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    norm1: torch.Tensor
    norm2: torch.Tensor
    eps1: float
    eps2: float


class PackedDecoder:
    """Logits of the last position for a Llama-architecture ``model`` (``fast_decoder.supports``)."""

    def __init__(self, model: torch.nn.Module, rows_hint: int = 64):
        if not packing_available(model):
            raise ValueError("PackedDecoder needs a bf16 model on a CPU whose oneDNN computes bf16 "
                             "(check packing_available first)")
        self.model = model
        self.rows_hint = rows_hint
        self.layers: list[_PackedLayer] = []
        self.head: Optional[torch.Tensor] = None
        self._stamp: Optional[list[tuple[int, int]]] = None

    def _current_stamp(self) -> list[tuple[int, int]]:
        # storage and in-place version of every parameter: an in-place op (``copy_``, ``add_``)
        # bumps the version, a replaced tensor changes the storage; ``.data`` writes show in neither
        return [(p.data_ptr(), p._version) for p in self.model.parameters()]

    def invalidate(self) -> None:
        """The weights changed (a load, an optimizer step): repack at the next ``refresh``."""
        self._stamp = None

    @torch.no_grad()
    def refresh(self) -> bool:
        """Repack after ``invalidate`` or a visible weight change; True when it repacked."""
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return False
        rows, layers = self.rows_hint, []
        for layer in self.model.get_decoder().layers:
            attn, mlp = layer.self_attn, layer.mlp
            projections = (attn.q_proj, attn.k_proj, attn.v_proj)
            layers.append(_PackedLayer(
                qkv=_pack(torch.cat([m.weight for m in projections]), rows), qkv_bias=_cat_bias(*projections),
                o=_pack(attn.o_proj.weight, rows),
                o_bias=attn.o_proj.bias.detach() if attn.o_proj.bias is not None else None,
                gate=_pack(mlp.gate_proj.weight, rows), up=_pack(mlp.up_proj.weight, rows),
                down=_pack(mlp.down_proj.weight, rows),
                norm1=layer.input_layernorm.weight.detach(), eps1=layer.input_layernorm.variance_epsilon,
                norm2=layer.post_attention_layernorm.weight.detach(),
                eps2=layer.post_attention_layernorm.variance_epsilon))
        self.layers = layers
        self.head = _pack(self.model.get_output_embeddings().weight, rows)
        self._stamp = stamp
        return True

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor,
               kv: StaticKV, use_sdpa: bool = True) -> torch.Tensor:
        """Logits [n, V] after the last of ``input_ids`` [n, L]; writes their keys/values into ``kv``
        (and advances it). ``key_mask`` [n, cached + L] marks real tokens; attention is causal."""
        if self._stamp is None:
            raise RuntimeError("PackedDecoder.refresh() must run before a forward (first use, or after invalidate)")
        decoder = self.model.get_decoder()
        config = decoder.config
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        n, L = input_ids.shape
        x = decoder.embed_tokens(input_ids)
        cos, sin = decoder.rotary_emb(x, position_ids)
        cos, sin = cos[:, :, None], sin[:, :, None]
        mask = additive_mask(key_mask, L, x.dtype)
        D = cos.shape[-1]
        scale = getattr(decoder.layers[0].self_attn, "scaling", D ** -0.5)
        rotated = (heads + kv_heads) * D
        for index, pl in enumerate(self.layers):
            h = rms_norm(x, pl.norm1, pl.eps1)[0]
            qkv = _linear(h, pl.qkv, pl.qkv_bias)
            qk = qkv[..., :rotated].view(n, L, heads + kv_heads, D)
            qk = rope(qk, cos, sin)
            q, k = qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2)
            v = qkv[..., rotated:].view(n, L, kv_heads, D).transpose(1, 2)
            o = grouped_attention(q, *kv.attend(index, k, v), mask, scale, use_sdpa)
            x = _linear_then(o.transpose(1, 2).reshape(n, L, heads * D), x, pl.o, pl.o_bias, "add")
            h = rms_norm(x, pl.norm2, pl.eps2)[0]
            swiglu = _linear_then(h, _linear(h, pl.gate, None, "swish"), pl.up, None, "mul")  # silu(g) * u
            x = _linear_then(swiglu, x, pl.down, None, "add")
        kv.advance(L)
        norm = decoder.norm
        return _linear(rms_norm(x[:, -1], norm.weight, norm.variance_epsilon)[0], self.head,
                       self.model.get_output_embeddings().bias)
