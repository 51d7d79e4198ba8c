"""Tiny random models with a locally built tokenizer, for tests and smoke runs.

The tokenizer is character level over printable ASCII plus the chat special tokens, so it
needs no download and round-trips any ASCII text exactly. The chat template mirrors
SmolLM2's ``<|im_start|>role\\n...<|im_end|>`` format.
"""

from __future__ import annotations

import string

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]


def tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: i for i, tok in enumerate(SPECIAL + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model_and_tokenizer(
    *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, seed: int = 0, max_positions: int = 512
):
    """A Llama-architecture model with random weights (deterministic for ``seed``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    model = _built_with_seed(LlamaForCausalLM, config, seed)
    model.config.name_or_path = "tiny-random"
    return model.eval(), tokenizer


def _built_with_seed(model_class, config, seed: int):
    """``model_class(config)`` with weights drawn from ``seed``, leaving the caller's RNG state as it was."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return model_class(config)
    finally:
        torch.random.set_rng_state(state)


def tiny_moe_model_and_tokenizer(
    *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, num_experts: int = 4, top_k: int = 2,
    seed: int = 0, max_positions: int = 512
):
    """A Mixtral-architecture Mixture-of-Experts model with random weights (``tiny-random-moe``):
    ``num_experts`` SwiGLU experts per layer, ``top_k`` of them per token (models/moe.py).

    Mixtral rather than Qwen2-MoE: its sparse block is router + experts only (Qwen2-MoE adds a
    gated shared expert), so what routing replay changes is the routing alone. No router jitter:
    the sampler's and the learner's routers see the same logits up to precision.
    """
    from transformers import MixtralConfig, MixtralForCausalLM

    tokenizer = tiny_tokenizer()
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
        sliding_window=None,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    model = _built_with_seed(MixtralForCausalLM, config, seed)
    model.config.name_or_path = "tiny-random-moe"
    return model.eval(), tokenizer
