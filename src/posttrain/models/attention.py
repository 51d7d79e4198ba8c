"""Which attention kernel a forward pass uses, chosen per call from the sequence length.

On a CPU, PyTorch's fused SDPA kernel has a high fixed cost per call. For SmolLM2-135M at the
lengths of the quickstart (<= ~110 tokens) the plain matmul + softmax path of transformers
("eager") made the learner's forward + backward 1.2x faster and decoding 1.25x faster on this
project's 2-core machine. Eager attention materialises [rows, heads, L, L] scores (kept for
the backward in the learner), so ``auto`` uses it only for short sequences, and never on GPUs,
where the fused kernels win.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from typing import Iterator

ATTENTION_CHOICES = ("auto", "eager", "sdpa")
# Longest sequence (prompt + completion) for which ``auto`` picks eager attention. The learner
# keeps the scores for its backward, so its limit is lower than the sampler's. The sampler's
# entry governs transformers' forward only (MoE models, model.decoder=hf): on the lean decoder's
# static KV cache the sampler uses SDPA under ``auto`` (rollout/engine.py says why).
EAGER_MAX_TOKENS = {"learner": 256, "sampler": 1024}


def choose_attention(mode: str, device_type: str, length: int, role: str, current: str) -> str:
    if mode not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {mode!r}")
    if mode != "auto":
        return mode
    if device_type == "cpu" and length <= EAGER_MAX_TOKENS[role]:
        return "eager"
    return current


@contextmanager
def attention_for(model, mode: str, length: int, role: str) -> Iterator[str]:
    """Run the block with the attention implementation ``choose_attention`` picks for ``model``.

    transformers reads ``config._attn_implementation`` at every forward, so switching it for the
    duration of a call is enough; the previous value is restored afterwards.
    """
    config = model.config
    before = getattr(config, "_attn_implementation", None) or "eager"
    device_type = next(model.parameters()).device.type
    chosen = choose_attention(mode, device_type, length, role, before)
    if chosen == before:
        yield chosen
        return
    config._attn_implementation = chosen
    try:
        yield chosen
    finally:
        config._attn_implementation = before


@functools.lru_cache(maxsize=None)
def _takes_cache(forward_owner: type) -> bool:
    return "cache" in inspect.signature(forward_owner.forward).parameters


def cache_kwargs(module, cache) -> dict:
    """The KV cache as the model's forward takes it: ``cache=`` in transformers >= 5.2x, which
    deprecates ``past_key_values=`` (to be removed in 5.40), else ``past_key_values=`` (the vLLM
    extra pins transformers < 5.20)."""
    return {"cache" if _takes_cache(type(module)) else "past_key_values": cache}
