"""An estimate of a run's peak memory, checked against what the machine has before anything is
sampled, so an impossible configuration fails in seconds with the knob to turn, not minutes later
with an allocator traceback.

    weights   = params x (4 B fp32 master + 2 B bf16 compute copy)      (the learner's; 4 B in fp32)
    optimizer = trainable params x (8 B AdamW moments + 4 B fp32 gradient)
    kv_cache  = rows x (prompt + max_new_tokens) x layers x 2 (K, V) x kv_heads x head_dim x s B
                rows = rollout.num_prompts x rollout.num_completions (the engine's static cache)
    logits    = rows x vocab x 4 B per decoding step, and min(micro-batch tokens, logprob_chunk_tokens)
                x vocab x 4 B in the learner's fused log-prob pass (its chunk bound)
    learner   = micro-batch tokens x hidden x layers x 17 x c B, where micro-batch tokens =
                micro_batch_size x (prompt + max_new_tokens), at most micro_batch_tokens when set
                (its default: 8192 in bf16, 4096 in fp32, trainers.learner.token_cap)
                (saved activations of one micro-batch, the lean decoder's ~17 tensors per layer)

with c and s the bytes per element the learner and the sampler compute in: 2 in bf16, 4 in fp32
(``auto`` is fp32 on a CPU without bf16 instructions, rollout.engine.resolve_dtype).

It is an estimate meant to catch order-of-magnitude mistakes (a typo'd num_completions), not to
budget memory to the byte: the check refuses only when the estimate exceeds the available memory.
"""

from __future__ import annotations

from dataclasses import dataclass


class ResourceError(ValueError):
    """The configured run cannot fit this machine's memory (the message names the knob)."""


@dataclass
class MemoryEstimate:
    weights: float
    optimizer: float
    kv_cache: float
    logits: float
    learner: float

    @property
    def total(self) -> float:
        return self.weights + self.optimizer + self.kv_cache + self.logits + self.learner


def estimate(model_config, params: int, trainable: int, rows: int, prompt_tokens: int, max_new_tokens: int,
             micro_batch_size: int, logprob_chunk_tokens: int, micro_batch_tokens: int = 0, learner_bytes: int = 2,
             sampler_bytes: int = 2) -> MemoryEstimate:
    c = model_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    length = prompt_tokens + max_new_tokens
    # a row longer than the token cap still forms a micro-batch of its own
    tokens = max(min(micro_batch_size * length, micro_batch_tokens), length) if micro_batch_tokens \
        else micro_batch_size * length
    return MemoryEstimate(
        weights=params * (4.0 + (learner_bytes if learner_bytes < 4 else 0)),
        optimizer=trainable * 12.0,
        kv_cache=rows * length * c.num_hidden_layers * 2 * kv_heads * head_dim * float(sampler_bytes),
        logits=rows * c.vocab_size * 4.0 + min(tokens, logprob_chunk_tokens) * c.vocab_size * 4.0,
        learner=tokens * c.hidden_size * c.num_hidden_layers * 17.0 * learner_bytes,
    )


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def compute_bytes(cfg, device=None) -> tuple[int, int]:
    """Bytes per element of the learner's and the sampler's compute dtype for ``cfg`` on ``device``
    (default: ``trainer.device`` resolved as the trainer resolves it)."""
    from posttrain.rollout.engine import resolve_dtype
    from posttrain.trainers.learner import learner_dtype, resolve_device

    device = device or resolve_device(getattr(cfg.trainer, "device", "auto"))
    learner = learner_dtype(getattr(cfg.trainer, "autocast", "auto"), device)
    return learner.itemsize, resolve_dtype(getattr(cfg.rollout, "dtype", "auto"), device).itemsize


def check_memory(cfg, model, prompt_tokens: int, available: float | None = None, device=None) -> MemoryEstimate:
    """Raise ``ResourceError`` when the RL run of ``cfg`` on ``model`` (longest prompt
    ``prompt_tokens``) would need more than ``available`` bytes (default: what the OS reports)."""
    import psutil

    from posttrain.trainers.learner import token_cap

    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ro, tc = cfg.rollout, cfg.trainer
    rows = ro.num_prompts * ro.num_completions
    learner_bytes, sampler_bytes = compute_bytes(cfg, device)
    est = estimate(model.config, params, trainable, rows, prompt_tokens, ro.max_new_tokens, tc.micro_batch_size,
                   tc.logprob_chunk_tokens, token_cap(tc.micro_batch_tokens, learner_bytes), learner_bytes,
                   sampler_bytes)
    available = psutil.virtual_memory().available if available is None else available
    if est.total > available:
        biggest = max(("weights", est.weights), ("optimizer", est.optimizer), ("kv_cache", est.kv_cache),
                      ("logits", est.logits), ("learner", est.learner), key=lambda kv: kv[1])[0]
        fix = {"kv_cache": "lower rollout.num_prompts x rollout.num_completions (now "
                           f"{ro.num_prompts} x {ro.num_completions}) or rollout.max_new_tokens",
               "logits": "lower rollout.num_prompts x rollout.num_completions or trainer.logprob_chunk_tokens",
               "learner": "lower trainer.micro_batch_size (or trainer.micro_batch_tokens)",
               "weights": "pick a smaller model, or train a LoRA adapter (model.lora={})",
               "optimizer": "train a LoRA adapter (model.lora={}): the frozen base then has no optimizer state"}[biggest]
        raise ResourceError(
            f"this run needs an estimated {_size(est.total)} of memory (weights {_size(est.weights)}, optimizer "
            f"{_size(est.optimizer)}, KV cache {_size(est.kv_cache)} for {rows} sequences of "
            f"{prompt_tokens + ro.max_new_tokens} tokens, logits {_size(est.logits)}, learner activations "
            f"{_size(est.learner)}) and {_size(available)} is available; the largest part is {biggest}: {fix}")
    return est
