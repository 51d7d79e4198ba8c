"""Per-token log-probs (and entropies) of completions, without full-vocabulary logits.

The decoder runs once over prompt + completion; the output projection and log-softmax then
run over chunks of completion positions only, each chunk under activation checkpointing, so
at most one chunk of [chunk_tokens, V] logits is alive in the forward *and* the backward
pass. A batch of 64 x 80 tokens over SmolLM2's 49k vocabulary would otherwise hold ~1 GB
of fp32 logits (plus as much again for their gradient).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    targets: torch.Tensor, temperature: float, with_entropy: bool):
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logz
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    probs = torch.softmax(logits, dim=-1)
    entropy = logz - (probs * logits).sum(-1)
    return logp, entropy


def _hidden_states(model, prompt_ids, prompt_mask, completion_ids, completion_mask, share_prompts: bool):
    """Decoder states that predict each completion token: [n, T, H].

    With ``share_prompts``, identical prompt rows (the n completions of one prompt) run through
    the decoder once; their KV cache is then indexed out to every row, so the completion pass
    attends to it and gradients from all rows flow back into the one shared prompt pass. This
    is the same computation as running each row separately, with the prompt tokens' share of
    the FLOPs divided by the group size.
    """
    n, P = prompt_ids.shape
    T = completion_ids.shape[1]
    decoder = model.get_decoder()
    prompt_mask = prompt_mask.long()
    completion_mask = completion_mask.long()
    keys = torch.cat([prompt_ids, prompt_mask], 1)
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
    if not share_prompts or unique.shape[0] == n:
        input_ids = torch.cat([prompt_ids, completion_ids], 1)
        attention = torch.cat([prompt_mask, completion_mask], 1)
        # Right padding of completions stays masked; positions count real tokens only.
        position_ids = (attention.cumsum(-1) - 1).clamp_min(0)
        hidden = decoder(input_ids=input_ids, attention_mask=attention, position_ids=position_ids).last_hidden_state
        return hidden[:, P - 1 : P + T - 1]
    from transformers import DynamicCache

    u_ids, u_mask = unique[:, :P], unique[:, P:]
    cache = DynamicCache()
    prompt_out = decoder(input_ids=u_ids, attention_mask=u_mask, position_ids=(u_mask.cumsum(-1) - 1).clamp_min(0),
                         past_key_values=cache, use_cache=True)
    cache.batch_select_indices(inverse)
    first = prompt_out.last_hidden_state[:, -1][inverse]  # predicts the first completion token
    if T == 1:
        return first[:, None]
    positions = prompt_mask.sum(-1, keepdim=True) + torch.arange(T - 1, device=prompt_ids.device)[None]
    attention = torch.cat([prompt_mask, completion_mask[:, : T - 1]], 1)
    rest = decoder(input_ids=completion_ids[:, : T - 1], attention_mask=attention, position_ids=positions,
                   past_key_values=cache, use_cache=True).last_hidden_state
    return torch.cat([first[:, None], rest], 1)


def completion_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    with_entropy: bool = False,
    share_prompts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(o_t | q, o_<t) / temperature-scaled, for every completion token: two [n, T] tensors.

    ``prompt_ids`` are left-padded and ``completion_ids`` right-padded, as in ``Rollouts``.
    Entropies are zeros unless ``with_entropy``.
    """
    device = next(model.parameters()).device
    n, T = completion_ids.shape
    hidden = _hidden_states(model, prompt_ids.to(device), prompt_mask.to(device), completion_ids.to(device),
                            completion_mask.to(device), share_prompts)
    mask = completion_mask.to(device).bool()
    flat_hidden = hidden[mask]
    flat_targets = completion_ids.to(device)[mask]
    head = model.get_output_embeddings()
    pieces_logp, pieces_ent = [], []
    for start in range(0, flat_hidden.shape[0], chunk_tokens):
        h = flat_hidden[start : start + chunk_tokens]
        y = flat_targets[start : start + chunk_tokens]
        if torch.is_grad_enabled():
            lp, ent = checkpoint(_chunk_logprobs, h, head.weight, head.bias, y, temperature, with_entropy,
                                 use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(h, head.weight, head.bias, y, temperature, with_entropy)
        pieces_logp.append(lp)
        pieces_ent.append(ent)
    logp = torch.zeros((n, T), device=device, dtype=torch.float32)
    ent = torch.zeros((n, T), device=device, dtype=torch.float32)
    if pieces_logp:
        logp = logp.masked_scatter(mask, torch.cat(pieces_logp))
        ent = ent.masked_scatter(mask, torch.cat(pieces_ent))
    return logp, ent
