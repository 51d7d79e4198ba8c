"""posttrain's lean decoder (models/fast_decoder.py) against transformers' forward and by hand."""

import pytest
import torch

from posttrain.models import fast_decoder as fd
from posttrain.models.logprobs import SharedPromptPass, completion_logprobs
from posttrain.rollout.engine import HFRolloutEngine, SamplingParams
from posttrain.tasks.base import Problem


def _gqa_model(dtype=torch.float32, seed=0):
    """A Llama with grouped-query attention (4 query heads over 2 K/V heads), 2 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_theta=100000.0, attn_implementation="eager")
    return LlamaForCausalLM(config).to(dtype).eval()


def _batch(n=3, L=7, vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, L), generator=g)
    mask = torch.ones(n, L, dtype=torch.long)
    mask[0, :2] = 0  # left padding (a short prompt)
    mask[2, -2:] = 0  # right padding (a short completion)
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _states_and_grads(model, forward):
    """(states, parameter gradients) of ``forward(decoder, ids, pos, mask)`` on ``_batch()``, with the
    loss a fixed random weighting of the states at real positions; also returns the real-position mask."""
    ids, mask, pos = _batch()
    valid = mask.bool()[..., None]
    weights = torch.randn(*ids.shape, 32, generator=torch.Generator().manual_seed(2))
    model.zero_grad()
    out = forward(model.get_decoder(), ids, pos, mask)
    (out * weights * valid).sum().backward()
    return out.detach(), _grads(model), valid


# ------------------------------------------------------------------------ by hand
def test_rmsnorm_by_hand():
    x = torch.tensor([[3.0, 4.0]], requires_grad=True)
    w = torch.tensor([2.0, 0.5], requires_grad=True)
    y = fd.RMSNormFn.apply(x, w, 0.0)
    # rms = sqrt((9 + 16) / 2) = sqrt(12.5); y = w * x / rms
    rms = 12.5 ** 0.5
    assert torch.allclose(y, torch.tensor([[2 * 3 / rms, 0.5 * 4 / rms]]))
    y.sum().backward()
    # dw_j = x_j / rms; dx = r (g' - x_hat mean(g' x_hat)), g' = w (g = 1)
    x_hat = torch.tensor([3.0, 4.0]) / rms
    gw = torch.tensor([2.0, 0.5])
    dx = (gw - x_hat * (gw * x_hat).mean()) / rms
    assert torch.allclose(w.grad, x_hat)
    assert torch.allclose(x.grad[0], dx)


def test_swiglu_by_hand():
    # one token, hidden 1, intermediate 1: y = wd * silu(wg x) * (wu x)
    x = torch.tensor([[2.0]], dtype=torch.float64, requires_grad=True)
    wg, wu, wd = (torch.tensor([[v]], dtype=torch.float64, requires_grad=True) for v in (0.5, 3.0, -1.5))
    y = fd.SwiGLUFn.apply(x, wg, wu, wd)
    g, u = 1.0, 6.0  # wg x, wu x
    s = 1 / (1 + torch.exp(torch.tensor(-g, dtype=torch.float64)))
    assert torch.allclose(y, -1.5 * g * s * u)
    y.sum().backward()
    dsilu = s * (1 + g * (1 - s))
    assert torch.allclose(wd.grad, g * s * u)
    assert torch.allclose(wu.grad, -1.5 * g * s * 2.0)  # da * silu(g) * x
    assert torch.allclose(wg.grad, -1.5 * u * dsilu * 2.0)
    assert torch.allclose(x.grad, -1.5 * (u * dsilu * 0.5 + g * s * 3.0))


def test_autograd_functions_pass_gradcheck():
    torch.manual_seed(0)
    d = dict(dtype=torch.float64, requires_grad=True)
    x, w = torch.randn(2, 3, 5, **d), torch.randn(5, **d)
    assert torch.autograd.gradcheck(lambda a, b: fd.RMSNormFn.apply(a, b, 1e-6), (x, w))
    h, wg, wu, wd = torch.randn(2, 3, 4, **d), torch.randn(6, 4, **d), torch.randn(6, 4, **d), torch.randn(4, 6, **d)
    assert torch.autograd.gradcheck(fd.SwiGLUFn.apply, (h, wg, wu, wd))
    # 2 K/V heads, 3 query heads each, 2 queries over 4 keys (2 prefix keys)
    q, k, v = torch.randn(1, 2, 6, 3, **d), torch.randn(1, 2, 4, 3, **d), torch.randn(1, 2, 4, 3, **d)
    mask = fd.additive_mask(torch.tensor([[0, 1, 1, 1]]), 2).double()
    assert torch.autograd.gradcheck(lambda a, b, c: fd.GroupedAttentionFn.apply(a, b, c, mask, 0.7, 3), (q, k, v))


def test_additive_mask_is_causal_and_hides_padding():
    mask = fd.additive_mask(torch.tensor([[0, 1, 1, 1]]), 2)[0, 0]
    allowed = mask == 0
    # queries are the last 2 positions (2 and 3); key 0 is padding
    assert allowed.tolist() == [[False, True, True, False], [False, True, True, True]]


def test_grouped_attention_equals_repeated_heads_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 2 * 3, 4), torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    mask = fd.additive_mask(torch.ones(2, 3, dtype=torch.long), 3)
    out = fd.GroupedAttentionFn.apply(q, k, v, mask, 0.5, 2)
    # reference: every query head h attends with K/V head h // 2
    qh = q.view(2, 2, 2, 3, 4).reshape(2, 4, 3, 4)
    kh, vh = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    ref = torch.softmax(qh @ kh.transpose(-1, -2) * 0.5 + mask, -1) @ vh
    assert torch.allclose(out.view(2, 4, 3, 4), ref, atol=1e-6)


# ------------------------------------------------------------------------ against transformers
@pytest.mark.parametrize("use_sdpa", [False, True])
@pytest.mark.parametrize("checkpoint_layers", [False, True])
def test_matches_transformers_states_and_gradients(use_sdpa, checkpoint_layers):
    model = _gqa_model()
    ref, ref_grads, valid = _states_and_grads(model, lambda decoder, ids, pos, mask: decoder(
        input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state)
    out, grads, _ = _states_and_grads(model, lambda decoder, ids, pos, mask: fd.decoder_forward(
        decoder, ids, pos, mask, use_sdpa=use_sdpa, checkpoint_layers=checkpoint_layers))
    assert torch.allclose(out * valid, ref * valid, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 9 + 2  # every layer weight, embedding, final norm
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], atol=1e-5, rtol=1e-4), name


def test_prefix_and_static_caches_equal_the_full_pass():
    model = _gqa_model()
    decoder = model.get_decoder()
    ids, mask, pos = _batch()
    full = fd.decoder_forward(decoder, ids, pos, mask)
    P = 4
    prompt = fd.PrefixKV(record=True)
    fd.decoder_forward(decoder, ids[:, :P], pos[:, :P], mask[:, :P], prompt)
    assert len(prompt.recorded) == 2 and prompt.recorded[0][0].shape == (3, 2, P, 8)
    rest = fd.decoder_forward(decoder, ids[:, P:], pos[:, P:], mask, fd.PrefixKV(prompt.recorded))
    valid = mask.bool()[:, P:, None]
    assert torch.allclose(rest * valid, full[:, P:] * valid, atol=1e-5)
    # the sampler's static cache, one token at a time, after dropping row 1
    cache = fd.StaticKV(2, 3, 2, ids.shape[1], 8, torch.float32, "cpu")
    fd.decoder_forward(decoder, ids[:, :P], pos[:, :P], mask[:, :P], cache)
    cache.advance(P)
    keep = torch.tensor([0, 2])
    cache.select_rows(keep)
    for t in range(P, ids.shape[1]):
        last = fd.decoder_forward(decoder, ids[keep, t:t + 1], pos[keep, t:t + 1], mask[keep, :t + 1], cache,
                                  last_only=True)
        cache.advance(1)
        real = mask[keep, t].bool()[:, None]
        assert torch.allclose(last * real, full[keep, t] * real, atol=1e-5)
    with pytest.raises(ValueError, match="capacity"):
        fd.decoder_forward(decoder, ids[keep, :1], pos[keep, :1], mask[keep, :8].repeat(1, 1), cache)


def test_packing_by_hand():
    packing = fd.Packing(torch.tensor([[0, 1, 1], [1, 0, 0]], dtype=torch.bool))
    assert packing.index.tolist() == [1, 2, 3]
    grid = torch.arange(6.0).view(2, 3, 1)
    assert packing.pack(grid).flatten().tolist() == [1.0, 2.0, 3.0]
    assert packing.unpack(torch.tensor([[7.0], [8.0], [9.0]])).flatten().tolist() == [0, 7, 8, 9, 0, 0]


@pytest.mark.parametrize("use_sdpa, checkpoint_layers", [(False, False), (True, False), (False, True)])
def test_packed_tokens_give_the_padded_results_at_the_computed_positions(use_sdpa, checkpoint_layers):
    """Skipping left/right padding (``tokens``) changes nothing at the real positions, values or grads."""
    model = _gqa_model()
    options = dict(use_sdpa=use_sdpa, checkpoint_layers=checkpoint_layers)
    full, full_grads, valid = _states_and_grads(model, lambda decoder, ids, pos, mask: fd.decoder_forward(
        decoder, ids, pos, mask, **options))
    packed, packed_grads, _ = _states_and_grads(model, lambda decoder, ids, pos, mask: fd.decoder_forward(
        decoder, ids, pos, mask, tokens=mask, **options))
    assert torch.allclose(packed * valid, full * valid, atol=1e-5)
    assert torch.count_nonzero(packed * ~valid) == 0  # skipped positions are zeros, not computed
    for name, g in packed_grads.items():
        assert torch.allclose(g, full_grads[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("one_prompt", [False, True])  # True: the shared prompt pass
def test_empty_and_one_token_completions_on_the_packed_path_equal_transformers(one_prompt):
    model = _gqa_model()
    g = torch.Generator().manual_seed(4)
    prompts = torch.randint(0, 64, (3, 4), generator=g)
    prompt_mask = torch.ones_like(prompts)
    prompt_mask[1, 0] = 0
    if one_prompt:
        prompts, prompt_mask = prompts[:1].repeat(3, 1), prompt_mask[1:2].repeat(3, 1)
    completions = torch.randint(0, 64, (3, 5), generator=g)
    completion_mask = (torch.arange(5)[None] < torch.tensor([[0], [1], [4]])).float()
    results = []
    for mode in ("hf", "auto"):
        model.zero_grad()
        lp, _ = completion_logprobs(model, prompts, prompt_mask, completions, completion_mask, decoder_mode=mode)
        lp.sum().backward()
        results.append((lp.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert torch.count_nonzero(results[1][0][0]) == 0 and torch.count_nonzero(results[1][0][1]) == 1
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5)


def test_bf16_autocast_gives_fp32_gradients_close_to_transformers():
    model = _gqa_model()
    decoder = model.get_decoder()
    ids, mask, pos = _batch()
    valid = mask.bool()[..., None]
    outs = {}
    for name in ("hf", "lean"):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if name == "hf":
                h = decoder(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
            else:
                h = fd.decoder_forward(decoder, ids, pos, mask)
        (h.float() * valid).pow(2).sum().backward()
        outs[name] = (h.float(), _grads(model))
    (h_ref, g_ref), (h_lean, g_lean) = outs["hf"], outs["lean"]
    assert all(g.dtype == torch.float32 for g in g_lean.values())
    assert torch.allclose(h_lean * valid, h_ref * valid, atol=0.05, rtol=0.02)
    for name, g in g_lean.items():
        assert torch.allclose(g, g_ref[name], atol=0.02 * g_ref[name].abs().max().item() + 1e-4), name


def test_unsupported_architectures_fall_back_to_transformers():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32)).eval()
    assert "model_type 'gpt2'" in fd.unsupported_reason(model.get_decoder() if hasattr(model, "get_decoder")
                                                         else model.transformer)
    llama = _gqa_model()
    assert fd.unsupported_reason(llama.get_decoder()) is None
    llama.config.hidden_act = "gelu"
    assert "silu" in fd.unsupported_reason(llama.get_decoder())


def test_learner_logprobs_and_gradients_equal_the_transformers_path():
    model = _gqa_model()
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, 64, (2, 5), generator=g).repeat_interleave(3, 0)  # 2 groups of 3
    prompt_mask = torch.ones_like(prompts)
    prompt_mask[:3, :2] = 0
    completions = torch.randint(0, 64, (6, 4), generator=g)
    completion_mask = torch.ones(6, 4)
    completion_mask[1, 2:] = 0
    results = {}
    for mode, share in (("hf", True), ("auto", True), ("auto", False)):
        model.zero_grad()
        lp, ent = completion_logprobs(model, prompts, prompt_mask, completions, completion_mask, with_entropy=True,
                                      share_prompts=share, decoder_mode=mode)
        (lp.sum() + ent.sum()).backward()
        results[(mode, share)] = (lp.detach(), ent.detach(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    ref = results[("hf", True)]
    for key in (("auto", True), ("auto", False)):
        for a, b in zip(results[key], ref):
            assert torch.allclose(a, b, atol=1e-5), key
    # the mini-batch prompt pass shared across micro-batches, on the lean decoder
    model.zero_grad()
    shared = SharedPromptPass(model, prompts, prompt_mask, "auto")
    for rows in (torch.tensor([0, 3]), torch.tensor([1, 2, 4, 5])):
        lp, ent = completion_logprobs(model, prompts[rows], prompt_mask[rows], completions[rows],
                                      completion_mask[rows], with_entropy=True, prompt_states=shared.rows(rows))
        (lp.sum() + ent.sum()).backward()
    shared.backward()
    assert torch.allclose(torch.cat([p.grad.flatten() for p in model.parameters()]), ref[2], atol=1e-5)


def test_sampler_on_the_lean_decoder_samples_what_transformers_samples():
    from posttrain.models.tiny import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer()
    problems = [Problem(id=f"p{i}", prompt=f"What is {i} + {2 * i}?", answer="0") for i in range(3)]
    out = {}
    for mode in ("hf", "auto"):
        engine = HFRolloutEngine(model, tok, dtype=torch.float32, decoder=mode)
        r = engine.generate(problems, 4, SamplingParams(max_new_tokens=10), torch.Generator().manual_seed(0))
        out[mode] = r
    assert torch.equal(out["hf"].completion_ids, out["auto"].completion_ids)
    assert torch.allclose(out["hf"].behaviour_logprobs, out["auto"].behaviour_logprobs, atol=1e-5)
    assert out["hf"].texts == out["auto"].texts


def test_bad_decoder_mode_is_refused():
    from posttrain.models.logprobs import uses_fast_decoder

    with pytest.raises(ValueError, match="decoder must be one of"):
        uses_fast_decoder(_gqa_model().get_decoder(), "fast")


def test_qwen2_with_attention_biases_matches_transformers():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="eager")
    model = Qwen2ForCausalLM(config).eval()
    decoder = model.get_decoder()
    assert decoder.layers[0].self_attn.q_proj.bias is not None and fd.unsupported_reason(decoder) is None
    for layer in decoder.layers:  # non-zero biases, so a dropped bias would show
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            torch.nn.init.normal_(proj.bias, std=0.5)
    ids, mask, pos = _batch()
    valid = mask.bool()[..., None]
    ref = decoder(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    weights = torch.randn(*ids.shape, 32, generator=torch.Generator().manual_seed(2))
    (ref * weights * valid).sum().backward()
    ref_grads = _grads(model)
    model.zero_grad()
    out = fd.decoder_forward(decoder, ids, pos, mask)
    assert torch.allclose(out * valid, ref * valid, atol=1e-5)
    (out * weights * valid).sum().backward()
    grads = _grads(model)
    assert "model.layers.0.self_attn.q_proj.bias" in grads
    for name, g in grads.items():  # fp32 rounding differs (transformers' RMSNorm), relative to the scale
        assert torch.allclose(g, ref_grads[name], atol=1e-4 * ref_grads[name].abs().max().item()), name
