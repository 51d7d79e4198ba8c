"""Per-token log-probs (and entropies) of completions, without full-vocabulary logits.

The decoder runs once over prompt + completion. The output projection and log-softmax then
run as one fused autograd function (``TokenLogProbs``) over chunks of completion positions:
the softmax and its gradient are formed in place one ``[chunk, V]`` fp32 block at a time, and
only log Z per token (plus, when they fit, the low-precision logits) is kept for the backward.
A batch of 64 x 80 tokens over SmolLM2's 49k vocabulary would otherwise hold ~1 GB of fp32
logits (plus as much again for their gradient).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from posttrain.models import fast_decoder
from posttrain.models.attention import attention_for, cache_kwargs

DECODER_CHOICES = ("auto", "hf")

SAVED_LOGITS_MAX_BYTES = 256 * 2**20
# Rows of [rows, V] logits formed at once (trainer.logprob_chunk_tokens' default): 151 MB in bf16 for a 49k
# vocabulary. Fewer, larger chunks: the head's matmuls ran ~2x faster at 768+ rows than at 256 on this
# project's AMX host, and the recomputing backward adds one fp32 [V, H] weight gradient per chunk (113 MB
# for SmolLM2). 256 -> 1536 took a 32 x 256-token forward+backward (SmolLM2-135M) from 16.0 to 14.8 s.
CHUNK_ROWS = 1536
ELEMENTWISE_ROWS = 32  # rows per fp32 softmax block (see TokenLogProbs._fp32_blocks)
# the nucleus is looked for among each row's this many most likely tokens first; a row whose
# nucleus is wider (rare once trained, at p = 0.8) is sorted whole (see TokenLogProbs._nucleus_cut)
NUCLEUS_CANDIDATES = 256


class TokenLogProbs(torch.autograd.Function):
    """log p(y_i | h_i) = z_{i,y_i} - logsumexp_j z_ij with z_i = W h_i / temperature, and the
    entropy H_i = -sum_j p_ij log p_ij, for rows of ``hidden`` [M, H] and ``weight`` [V, H].

    Gradients, per row (g = dL/dlogp, e = dL/dH):
        dL/dz_j = g (1[j = y] - p_j) - e p_j (log p_j + H)
    then dL/dh = (dL/dz) W / temperature and dL/dW = (dL/dz)^T h / temperature. The matmuls
    run in the autocast dtype (bf16 on CPUs that have it) and the softmax in fp32. The forward
    keeps the low-precision logits for the backward when they take at most
    ``SAVED_LOGITS_MAX_BYTES`` (a micro-batch of 1000 tokens over 49k: 100 MB in bf16), which
    spares one of the head's four matmuls; otherwise the backward recomputes them chunk by chunk.

    ``with_sum_pi2`` adds a third output, S_i = sum_j p_ij^2 (no gradient): the optimal token
    baseline's per-token term (``advantages_otb``), read off the softmax block already in cache,
    so it costs one more reduction over that block instead of a second pass over the head.

    ``entropy_top_p`` = p replaces H_i by the entropy of the row's nucleus S_i (SIREN's top-p
    mask; "Rethinking Entropy Regularization in Large Reasoning Models", arXiv:2509.25133):
        q_j = p_j / sum_{k in S} p_k on S,   H^S = -sum_{j in S} q_j log q_j,
        dH^S/dz_j = -q_j (log q_j + H^S) for j in S, 0 elsewhere (S held fixed, as a mask is).
    S holds the most likely tokens whose cumulative probability, summed in decreasing order,
    stays strictly below p: the token that crosses p is left out. That is the official code's
    cut (github.com/Linn3a/siren, ``efficient_top_p_sampling``: ``searchsorted`` of p in the
    cumulative probabilities, then ``index < cutoff``), kept so that H^S (and SIREN's anchor)
    means what it meant in the paper's runs; the usual sampling nucleus keeps the crossing
    token. So a row whose top token alone has probability >= p has an empty nucleus and H^S = 0
    (no gradient), as there. S is a threshold on the logit, so tokens tied with the last kept one
    are kept too (a tie has no order); the official code also caps the candidates at the top
    10,000 tokens, which is not done here. Per row the forward saves its max logit, the cut-off
    (shifted by that max) and log sum_{k in S} e^{z_k}: three floats, no [M, V] state.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, chunk: int, with_entropy: bool,
                with_sum_pi2: bool = False, entropy_top_p: Optional[float] = None):
        check_entropy_top_p(entropy_top_p, with_entropy)
        nucleus = entropy_top_p is not None
        dtype = fast_decoder.compute_dtype(hidden)
        w = weight.to(dtype)
        b = (bias / temperature).to(dtype) if bias is not None else None  # z = W (h / T) + b / T
        h = (hidden / temperature if temperature != 1.0 else hidden).to(dtype)
        M = h.shape[0]
        logp = torch.empty(M, dtype=torch.float32, device=h.device)
        logz = torch.empty(M, dtype=torch.float32, device=h.device)
        entropy = torch.zeros(M, dtype=torch.float32, device=h.device)
        sum_pi2 = torch.zeros(M, dtype=torch.float32, device=h.device) if with_sum_pi2 else None
        # nucleus: per row its max logit, cut-off (logit - max) and log-normaliser (see the docstring)
        nuc_top, nuc_cut, nuc_logz = (torch.zeros(M, dtype=torch.float32, device=h.device) for _ in range(3)) \
            if nucleus else (None, None, None)
        rows = max(1, chunk)
        keep = any(ctx.needs_input_grad[:3]) and M * w.shape[0] * w.element_size() <= SAVED_LOGITS_MAX_BYTES
        saved = torch.empty((M, w.shape[0]), dtype=dtype, device=h.device) if keep else None
        with torch.autocast(h.device.type, enabled=False):
            z_buf = torch.empty((min(ELEMENTWISE_ROWS, M), w.shape[0]), dtype=torch.float32, device=h.device)
            for s in range(0, M, rows):
                logits = TokenLogProbs._logits(h[s : s + rows], w, b, saved[s : s + rows] if keep else None)
                for e, z in TokenLogProbs._fp32_blocks(logits, z_buf):
                    i, j = s + e, s + e + z.shape[0]
                    target_logit = z.gather(-1, targets[i:j, None]).squeeze(-1)
                    top = z.amax(-1, keepdim=True)
                    z.sub_(top)  # z - max: log-probs up to the log-normaliser
                    if with_entropy:
                        p = z.exp()
                        norm = p.sum(-1)
                        if nucleus:
                            nuc_top[i:j] = top.squeeze(-1)
                            entropy[i:j], nuc_cut[i:j], nuc_logz[i:j] = TokenLogProbs._nucleus(
                                z, p, norm, top.squeeze(-1), entropy_top_p)
                        else:
                            # H = log S - sum_j p_j z_j (z shifted by max; S = sum_j exp z_j)
                            entropy[i:j] = norm.log() - (p * z).sum(-1) / norm
                    else:
                        p = z.exp_()
                        norm = p.sum(-1)
                    if with_sum_pi2:  # sum_j (e^{z_j} / S)^2, on the unnormalised p already formed
                        sum_pi2[i:j] = torch.linalg.vector_norm(p, 2, -1).square_().div_(norm.square())
                    lz = top.squeeze(-1) + norm.log()
                    logz[i:j] = lz
                    logp[i:j] = target_logit - lz
        ctx.save_for_backward(h, w, b, targets, logz, entropy, nuc_top, nuc_cut, nuc_logz, saved)
        ctx.temperature, ctx.rows, ctx.with_entropy = temperature, rows, with_entropy
        ctx.weight_dtype, ctx.hidden_dtype = weight.dtype, hidden.dtype
        if with_sum_pi2:
            ctx.mark_non_differentiable(sum_pi2)
            return logp, entropy, sum_pi2
        return logp, entropy

    @staticmethod
    def _nucleus(z, p, norm, top, top_p: float):
        """(H^S, cut-off, log sum_{k in S} e^{z_k}) per row of a block: ``z`` its logits minus
        their max ``top``, ``p`` = e^z and ``norm`` = sum p. S = {j : z_j >= cut-off}."""
        cut = TokenLogProbs._nucleus_cut(z, norm, top_p)
        kept = torch.where(z >= cut[:, None], p, 0.0)
        mass = kept.sum(-1)
        empty = mass == 0  # the top token alone reaches p
        entropy = (mass.log() - (kept * z).sum(-1) / mass).masked_fill_(empty, 0.0)
        # an empty row keeps the full log-normaliser: finite, and the backward masks it out anyway
        logz = torch.where(empty, top + norm.log(), top + mass.log())
        return entropy, cut, logz

    @staticmethod
    def _nucleus_cut(z, norm, top_p: float):
        """Per row, the smallest (shifted) logit of its nucleus, +inf where the nucleus is empty:
        the most likely tokens whose cumulative probability stays < ``top_p``. Read off the top
        ``NUCLEUS_CANDIDATES`` logits; rows where all of those stay below p are sorted whole."""
        V = z.shape[-1]

        def cut_of(ordered, scale):  # ordered: [r, k] shifted logits, decreasing
            kept = (ordered.exp().cumsum(-1).div_(scale[:, None]) < top_p).sum(-1)
            cut = ordered.gather(-1, (kept - 1).clamp_min(0)[:, None]).squeeze(-1)
            return cut.masked_fill_(kept == 0, float("inf")), kept

        head = z.topk(min(NUCLEUS_CANDIDATES, V), -1).values
        cut, kept = cut_of(head, norm)
        wider = (kept == head.shape[-1]) & (head.shape[-1] < V)
        if wider.any():
            rows = wider.nonzero().squeeze(-1)
            cut[rows] = cut_of(z[rows].sort(-1, descending=True).values, norm[rows])[0]
        return cut

    @staticmethod
    def _logits(h, w, b, out):
        """z = h W^T + b for a chunk of rows, written into ``out`` when given (the saved logits)."""
        if out is None:
            return F.linear(h, w, b)
        return torch.addmm(b, h, w.t(), out=out) if b is not None else torch.mm(h, w.t(), out=out)

    @staticmethod
    def _fp32_blocks(logits, z_buf):
        """(offset, fp32 copy) of ``logits`` in blocks of ``ELEMENTWISE_ROWS`` rows.

        The softmax math makes about six passes over each block; at 32 x 49k x 4 bytes (6.3 MB)
        a block stays in a typical L3 cache, where a whole 256-row chunk (50 MB) would not: the
        update took 4.4% less time with 64-row blocks than with 256 (paired A/B, SmolLM2-135M,
        32 MB L3), and 32 rows timed like 64.
        """
        for e in range(0, logits.shape[0], z_buf.shape[0]):
            block = logits[e : e + z_buf.shape[0]]
            z = z_buf[: block.shape[0]]
            z.copy_(block)
            yield e, z

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, *_grad_sum_pi2):
        h, w, b, targets, logz, entropy, nuc_top, nuc_cut, nuc_logz, saved = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        rows, temperature, M = ctx.rows, ctx.temperature, h.shape[0]
        use_entropy = ctx.with_entropy and grad_entropy is not None
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = None
        grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=h.device) if need_b else None
        with torch.autocast(h.device.type, enabled=False):
            z_buf = torch.empty((min(ELEMENTWISE_ROWS, M), w.shape[0]), dtype=torch.float32, device=h.device)
            for s in range(0, M, rows):
                hs = h[s : s + rows]
                # dz overwrites the logits it was computed from: in the saved buffer (read once,
                # so dW and dh are then one matmul each over all rows) or in the recomputed chunk
                dz_low = saved[s : s + rows] if saved is not None else F.linear(hs, w, b)
                for e, z in TokenLogProbs._fp32_blocks(dz_low, z_buf):
                    i, j = s + e, s + e + z.shape[0]
                    g = grad_logp[i:j, None].float()
                    if use_entropy and nuc_top is not None:
                        # the forward's nucleus: the same fp32 logits minus the same max, against its cut-off
                        inside = torch.sub(z, nuc_top[i:j, None]) >= nuc_cut[i:j, None]
                        log_q = z - nuc_logz[i:j, None]  # log q_j = z_j - log sum_{k in S} e^{z_k}
                        q = log_q.exp()
                        p = z.sub_(logz[i:j, None]).exp_()
                        # -e q (log q + H^S) on the nucleus, 0 elsewhere; - g p
                        dz = log_q.add_(entropy[i:j, None]).mul_(q).mul_(-grad_entropy[i:j, None].float())
                        dz.masked_fill_(~inside, 0.0).addcmul_(p, g, value=-1.0)
                    else:
                        z.sub_(logz[i:j, None])  # log p
                        if use_entropy:
                            p = z.exp()
                            # -e p (log p + H) - g p
                            dz = z.add_(entropy[i:j, None]).mul_(p).mul_(-grad_entropy[i:j, None].float())
                            dz.addcmul_(p, g, value=-1.0)
                        else:
                            dz = z.exp_().mul_(-g)
                    dz.scatter_add_(1, targets[i:j, None], g)
                    dz_low[e : e + z.shape[0]].copy_(dz)
                    if need_b:
                        grad_b.add_(dz.sum(0))
                if saved is None:
                    if need_h:
                        grad_h[s : s + rows] = dz_low @ w
                    if need_w:
                        part = dz_low.t() @ hs
                        grad_w = part.to(torch.promote_types(part.dtype, torch.float32)) if grad_w is None \
                            else grad_w.add_(part)
            if saved is not None and M:
                if need_h:
                    torch.mm(saved, w, out=grad_h)
                if need_w:
                    grad_w = saved.t() @ h
        if need_h:
            grad_h = grad_h.to(ctx.hidden_dtype)
            if temperature != 1.0:
                grad_h = grad_h / temperature
        if need_b:
            grad_b = (grad_b / temperature).to(ctx.weight_dtype)
        # dW is already divided by the temperature: h was saved pre-scaled.
        if need_w:
            grad_w = torch.zeros(w.shape, dtype=ctx.weight_dtype, device=h.device) if grad_w is None else grad_w
            grad_w = grad_w.to(ctx.weight_dtype)
        return (grad_h, grad_w, grad_b) + (None,) * (len(ctx.needs_input_grad) - 3)  # 7 to 9 inputs


def check_entropy_top_p(entropy_top_p: Optional[float], with_entropy: bool) -> None:
    if entropy_top_p is not None and not (with_entropy and 0.0 < entropy_top_p < 1.0):
        raise ValueError(f"entropy_top_p must be in (0, 1) and needs with_entropy=True (None: the full-vocabulary "
                         f"entropy), got {entropy_top_p!r} with with_entropy={with_entropy}")


def uses_fast_decoder(decoder, mode: str) -> bool:
    """``mode`` auto: posttrain's lean decoder (``fast_decoder``) when the architecture allows."""
    if mode not in DECODER_CHOICES:
        raise ValueError(f"decoder must be one of {DECODER_CHOICES}, got {mode!r}")
    return mode == "auto" and fast_decoder.supports(decoder)


def _hidden_states(model, prompt_ids, prompt_mask, completion_ids, completion_mask, share_prompts: bool,
                   attention: str = "auto", prompt_states: Optional["PromptStates"] = None,
                   decoder_mode: str = "auto", checkpoint_layers: bool = False):
    """Decoder states that predict each completion token: [n, T, H].

    ``attention`` picks the attention kernel (see ``posttrain.models.attention``);
    ``decoder_mode`` picks posttrain's lean decoder ("auto", when supported) or transformers'
    ("hf"); ``checkpoint_layers`` recomputes each layer in the backward (lean decoder only).

    With ``share_prompts``, identical prompt rows (the n completions of one prompt) run through
    the decoder once; their keys/values are then indexed out to every row, so the completion
    pass attends to them and gradients from all rows flow back into the one shared prompt pass.
    This is the same computation as running each row separately, with the prompt tokens' share
    of the FLOPs divided by the group size. ``prompt_states`` (from ``SharedPromptPass``)
    supplies that prompt pass from outside, shared across micro-batches.
    """
    decoder = model.get_decoder()
    prompt_mask, completion_mask = prompt_mask.long(), completion_mask.long()
    with attention_for(decoder, attention, prompt_ids.shape[1] + completion_ids.shape[1], "learner") as kernel:
        passes = _DecoderPasses(decoder, uses_fast_decoder(decoder, decoder_mode), kernel, checkpoint_layers)
        if prompt_states is not None:
            return passes.completion_pass(prompt_states.kv, prompt_states.last, prompt_mask, completion_ids,
                                          completion_mask)
        return passes.states(prompt_ids, prompt_mask, completion_ids, completion_mask, share_prompts)


class _DecoderPasses:
    """The learner's three decoder passes, on posttrain's lean decoder or on transformers' forward.

    Keys/values travel as a per-layer list of (K, V) [rows, KV heads, length, head dim] on both
    backends; transformers' forward receives them as a ``DynamicCache``.
    """

    def __init__(self, decoder, lean: bool, kernel: str, checkpoint_layers: bool):
        self.decoder, self.lean = decoder, lean
        self.options = dict(use_sdpa=kernel != "eager", checkpoint_layers=checkpoint_layers)

    def _forward(self, input_ids, positions, key_mask, tokens, prefix=None, record: bool = False):
        """(hidden states, the inputs' per-layer keys/values when ``record``) after ``prefix``.

        Only the states at ``tokens`` are needed (and nothing needed attends to the others): the
        lean decoder skips the rest; transformers' forward computes them too.
        """
        if self.lean:
            kv = fast_decoder.PrefixKV(prefix, record=record)
            return fast_decoder.decoder_forward(self.decoder, input_ids, positions, key_mask, kv, tokens=tokens,
                                                **self.options), kv.recorded
        from transformers import DynamicCache

        cache = None
        if prefix is not None or record:
            cache = DynamicCache()
            for layer, (k, v) in enumerate(prefix or []):
                cache.update(k, v, layer)
        hidden = self.decoder(input_ids=input_ids, attention_mask=key_mask, position_ids=positions,
                              use_cache=cache is not None, **cache_kwargs(self.decoder, cache)).last_hidden_state
        return hidden, [(layer.keys, layer.values) for layer in cache.layers] if record else None

    def prompt_pass(self, prompt_ids, prompt_mask):
        """(per-layer keys/values, last hidden state) of left-padded prompts."""
        hidden, kv = self._forward(prompt_ids, (prompt_mask.cumsum(-1) - 1).clamp_min(0), prompt_mask, prompt_mask,
                                   record=True)
        return kv, hidden[:, -1]

    def completion_pass(self, prefix, last_prompt_state, prompt_mask, completion_ids, completion_mask):
        """States predicting each completion token, given the prompts' keys/values (one row per sample)."""
        T = completion_ids.shape[1]
        first = last_prompt_state[:, None]  # predicts the first completion token
        if T == 1:
            return first
        positions = prompt_mask.sum(-1, keepdim=True) + torch.arange(T - 1, device=completion_ids.device)[None]
        keys = torch.cat([prompt_mask, completion_mask[:, : T - 1]], 1)
        # input j predicts token j + 1: needed while that token is real
        rest, _ = self._forward(completion_ids[:, : T - 1], positions, keys, completion_mask[:, 1:], prefix)
        return torch.cat([first, rest], 1)

    def states(self, prompt_ids, prompt_mask, completion_ids, completion_mask, share_prompts: bool):
        n, P = prompt_ids.shape
        T = completion_ids.shape[1]
        unique, inverse = torch.unique(torch.cat([prompt_ids, prompt_mask], 1), dim=0, return_inverse=True)
        if not share_prompts or unique.shape[0] == n:
            # The last completion token predicts nothing, so it is not an input. Right padding
            # of completions stays masked; positions count real tokens only.
            inputs = torch.cat([prompt_ids, completion_ids[:, : T - 1]], 1)
            keys = torch.cat([prompt_mask, completion_mask[:, : T - 1]], 1)
            hidden, _ = self._forward(inputs, (keys.cumsum(-1) - 1).clamp_min(0), keys,
                                      torch.cat([prompt_mask, completion_mask[:, 1:]], 1))
            return hidden[:, P - 1:]
        kv, last = self.prompt_pass(unique[:, :P], unique[:, P:])
        prefix = [(k[inverse], v[inverse]) for k, v in kv]
        return self.completion_pass(prefix, last[inverse], prompt_mask, completion_ids, completion_mask)


class PromptStates:
    """A micro-batch's view of a ``SharedPromptPass``: per-row prompt keys/values and last state."""

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]], last: torch.Tensor):
        self.kv, self.last = kv, last


class SharedPromptPass:
    """The distinct prompts of a mini-batch through the decoder once, for all its micro-batches.

    Micro-batches are cut by completion length, so one prompt's samples land in several of
    them, and a per-micro-batch prompt pass repeats work (4 micro-batches of 16 from 8 prompts
    x 8 samples ran ~1200 prompt tokens instead of ~350). Here each micro-batch reads leaf
    copies of the prompt keys/values and last state, so its backward stops at the leaves and
    leaves their gradient there; ``backward()`` then sends the summed gradient through the
    prompt pass once. The parameter gradients equal those of a prompt pass per micro-batch.

    With ``checkpoint_layers`` (the learner sets it when the mini-batch has several micro-batches)
    the lean decoder's prompt pass checkpoints its layers: its activations would otherwise stay
    alive through every micro-batch (~150 MB for 8 prompts of 44 tokens on SmolLM2-135M), and
    recomputing them costs one prompt forward (8-9% of the update at 8 prompts x 4 samples of
    ~30 tokens). With one micro-batch they live no longer than that micro-batch's own.
    """

    def __init__(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, attention: str,
                 decoder_mode: str = "auto", checkpoint_layers: bool = True):
        device = next(model.parameters()).device
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device).long()
        unique, self.inverse = torch.unique(torch.cat([prompt_ids, prompt_mask], 1), dim=0, return_inverse=True)
        P = prompt_ids.shape[1]
        decoder = model.get_decoder()
        # the kernel for the prompts' own width: SDPA's CPU backward is ~6x eager's at 8 x 44 tokens
        with attention_for(decoder, attention, P, "learner") as kernel:
            passes = _DecoderPasses(decoder, uses_fast_decoder(decoder, decoder_mode), kernel, checkpoint_layers)
            kv, last = passes.prompt_pass(unique[:, :P], unique[:, P:])
        self.roots = [t for pair in kv for t in pair] + [last]
        self.leaves = [r.detach().requires_grad_(r.requires_grad) for r in self.roots]

    def rows(self, rows: torch.Tensor) -> PromptStates:
        idx = self.inverse[rows.to(self.inverse.device)]
        picked = [leaf[idx] for leaf in self.leaves]
        return PromptStates(list(zip(picked[:-1:2], picked[1:-1:2])), picked[-1])

    def backward(self) -> None:
        pairs = [(r, leaf.grad) for r, leaf in zip(self.roots, self.leaves) if r.requires_grad and leaf.grad is not None]
        if pairs:
            torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs])
        self.roots = self.leaves = []


def completion_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = CHUNK_ROWS,
    with_entropy: bool = False,
    share_prompts: bool = True,
    attention: str = "auto",
    prompt_states: Optional[PromptStates] = None,
    decoder_mode: str = "auto",
    checkpoint_layers: bool = False,
    with_sum_pi2: bool = False,
    entropy_top_p: Optional[float] = None,
) -> tuple[torch.Tensor, ...]:
    """log pi(o_t | q, o_<t) / temperature-scaled, for every completion token: two [n, T] tensors.

    ``prompt_ids`` are left-padded and ``completion_ids`` right-padded, as in ``Rollouts``.
    Entropies are zeros unless ``with_entropy``. ``with_sum_pi2`` returns a third [n, T] tensor,
    sum over the vocabulary of pi^2 at each completion token (0 on padding, no gradient), from
    the same fused pass. ``entropy_top_p`` = p: the entropies are those of each token's nucleus
    (top-p, renormalised; SIREN's top-p mask, see ``TokenLogProbs``), gradient included.
    """
    check_entropy_top_p(entropy_top_p, with_entropy)
    device = next(model.parameters()).device
    n, T = completion_ids.shape
    hidden = _hidden_states(model, prompt_ids.to(device), prompt_mask.to(device), completion_ids.to(device),
                            completion_mask.to(device), share_prompts, attention, prompt_states, decoder_mode,
                            checkpoint_layers)
    mask = completion_mask.to(device).bool()
    flat_hidden = hidden[mask]
    flat_targets = completion_ids.to(device)[mask]
    head = model.get_output_embeddings()
    flat = TokenLogProbs.apply(flat_hidden, head.weight, head.bias, flat_targets, temperature, chunk_tokens,
                               with_entropy, with_sum_pi2, entropy_top_p)
    return tuple(torch.zeros((n, T), device=device, dtype=torch.float32).masked_scatter(mask, x) for x in flat)
