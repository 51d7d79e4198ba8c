import torch

from posttrain.models.logprobs import completion_logprobs
from posttrain.models.tiny import tiny_model_and_tokenizer
from posttrain.rollout.engine import HFRolloutEngine, PromptTooLongError, SamplingParams, _filter_logits
from posttrain.tasks.base import Problem

PROBLEMS = [Problem(id=f"p{i}", prompt=f"What is {i} + {i}?", answer=str(2 * i)) for i in range(3)]


def engine(dtype=torch.float32):
    model, tok = tiny_model_and_tokenizer()
    return model, tok, HFRolloutEngine(model, tok, dtype=dtype)


def test_shapes_groups_and_masks():
    _, tok, eng = engine()
    r = eng.generate(PROBLEMS, 4, SamplingParams(max_new_tokens=10), torch.Generator().manual_seed(0))
    assert len(r) == 12
    assert r.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert [p.id for p in r.problems[:5]] == ["p0"] * 4 + ["p1"]
    lengths = r.completion_mask.sum(-1).long()
    for i in range(12):
        ids = r.completion_ids[i, : lengths[i]].tolist()
        assert r.completion_mask[i, lengths[i]:].sum() == 0
        # a sample ends early only on EOS; otherwise it is flagged truncated at the budget
        if r.truncated[i]:
            assert lengths[i] == 10 and tok.eos_token_id not in ids
        else:
            assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
        assert r.texts[i] == tok.decode(ids, skip_special_tokens=True)


def test_behaviour_logprobs_match_learner_and_entropies_are_correct():
    model, _, eng = engine()
    r = eng.generate(PROBLEMS, 3, SamplingParams(max_new_tokens=8, temperature=0.7), torch.Generator().manual_seed(1))
    with torch.no_grad():
        lp, ent = completion_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask,
                                      temperature=0.7, chunk_tokens=16, with_entropy=True)
        # reference: full logits, no chunking
        ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
        att = torch.cat([r.prompt_mask, r.completion_mask.long()], 1)
        logits = model(input_ids=ids, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp_min(0)).logits
        logits = logits[:, r.prompt_ids.shape[1] - 1 : -1] / 0.7
        ref = torch.log_softmax(logits, -1)
        ref_lp = ref.gather(-1, r.completion_ids[..., None]).squeeze(-1) * r.completion_mask
        ref_ent = -(ref.exp() * ref).sum(-1) * r.completion_mask
    assert torch.allclose(lp, ref_lp, atol=1e-5)
    assert torch.allclose(r.behaviour_logprobs, ref_lp, atol=1e-5)
    assert torch.allclose(ent, ref_ent, atol=1e-4)
    assert torch.allclose(r.entropies, ref_ent, atol=1e-4)


def test_chunked_gradient_equals_unchunked():
    model, _, eng = engine()
    r = eng.generate(PROBLEMS, 2, SamplingParams(max_new_tokens=6), torch.Generator().manual_seed(2))
    grads = []
    for chunk in (16, 10_000):
        model.zero_grad()
        lp, _ = completion_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask,
                                    chunk_tokens=chunk)
        (lp.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_shared_prefill_equals_separate_prefill_and_seed_determinism():
    _, _, eng = engine()
    params = SamplingParams(max_new_tokens=8)
    a = eng.generate(PROBLEMS, 3, params, torch.Generator().manual_seed(5), share_prefill=True)
    b = eng.generate(PROBLEMS, 3, params, torch.Generator().manual_seed(5), share_prefill=False)
    c = eng.generate(PROBLEMS, 3, params, torch.Generator().manual_seed(5), share_prefill=True)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.allclose(a.behaviour_logprobs, b.behaviour_logprobs, atol=1e-5)
    assert torch.equal(a.completion_ids, c.completion_ids)


def test_stop_strings_end_the_sample_and_are_cut_from_text():
    _, tok, eng = engine()
    # top_k=1 makes sampling greedy; find what greedy writes, then stop on its 3rd character
    greedy = eng.generate(PROBLEMS[:1], 1, SamplingParams(max_new_tokens=8, top_k=1), torch.Generator().manual_seed(0))
    text = greedy.texts[0]
    assert len(text) >= 3
    stop = text[2]
    r = eng.generate(PROBLEMS[:1], 1, SamplingParams(max_new_tokens=8, top_k=1, stop=(stop,)),
                     torch.Generator().manual_seed(0))
    assert r.texts[0] == text[: text.find(stop)]
    assert not bool(r.truncated[0])
    assert int(r.completion_mask.sum()) == text.find(stop) + 1


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    k2 = _filter_logits(logits, top_k=2, top_p=1.0)
    assert torch.isinf(k2[0, 2:]).all() and torch.isfinite(k2[0, :2]).all()
    p = torch.softmax(logits, -1)[0]  # [0.644, 0.237, 0.087, 0.032]
    top_p = _filter_logits(logits, top_k=0, top_p=0.85)  # smallest prefix with mass >= 0.85: two tokens
    assert p[:2].sum() > 0.85 > p[0]
    assert torch.isinf(top_p[0, 2:]).all() and torch.isfinite(top_p[0, :2]).all()


def test_bf16_sampling_copy_syncs_weights():
    model, _, eng = engine(dtype=torch.bfloat16)
    assert eng.model is not model and next(eng.model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    eng.load_weights(dict(model.named_parameters()), 1)
    for a, b in zip(eng.model.parameters(), model.parameters()):
        assert torch.equal(a, b.to(torch.bfloat16))
    assert eng.policy_version == 1
    r = eng.generate(PROBLEMS[:1], 2, SamplingParams(max_new_tokens=3), torch.Generator().manual_seed(0))
    assert r.policy_version.tolist() == [1, 1]


def test_prompt_longer_than_context_is_rejected():
    model, tok = tiny_model_and_tokenizer(max_positions=64)
    eng = HFRolloutEngine(model, tok, dtype=torch.float32)
    long = Problem(id="long", prompt="x" * 80)
    try:
        eng.generate([long], 1, SamplingParams(max_new_tokens=4))
    except PromptTooLongError as exc:
        assert "long" in str(exc) and "max_new_tokens" in str(exc)
    else:
        raise AssertionError("expected PromptTooLongError")


def test_shared_prompt_pass_matches_separate_rows_in_value_and_gradient():
    model, _, eng = engine()
    r = eng.generate(PROBLEMS, 3, SamplingParams(max_new_tokens=7), torch.Generator().manual_seed(4))
    perm = torch.randperm(len(r), generator=torch.Generator().manual_seed(0))  # groups interleaved
    r = r.select(perm)
    results = []
    for share in (True, False):
        model.zero_grad()
        lp, ent = completion_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask,
                                      with_entropy=True, share_prompts=share)
        (lp * torch.arange(1, lp.shape[1] + 1)).sum().backward()
        results.append((lp.detach(), ent.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-4)
    assert torch.allclose(results[0][2], results[1][2], atol=1e-5)


def test_inverse_cdf_sampler_matches_the_distribution():
    from posttrain.rollout.engine import _sample

    logits = torch.log(torch.tensor([[0.5, 0.0, 0.3, 0.2]])).expand(20000, 4)  # token 1 has p = 0
    draws = _sample(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert freq[1] == 0
    assert torch.allclose(freq, torch.tensor([0.5, 0.0, 0.3, 0.2]), atol=0.015)


def test_low_precision_copy_casts_every_weight_and_keeps_tied_ones_tied():
    from posttrain.models.tiny import tiny_model_and_tokenizer
    from posttrain.rollout.engine import low_precision_copy

    model, _ = tiny_model_and_tokenizer()
    model.lm_head.weight = model.model.embed_tokens.weight  # tie, as SmolLM2 does
    copy = low_precision_copy(model, torch.bfloat16)
    assert copy.lm_head.weight is copy.model.embed_tokens.weight
    assert all(p.dtype == torch.bfloat16 for p in copy.parameters())
    for (name, a), (_, b) in zip(model.named_parameters(), copy.named_parameters(), strict=True):
        assert torch.equal(b, a.detach().to(torch.bfloat16)), name
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the original is untouched
    assert copy.model.embed_tokens.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_two_level_sampler_picks_the_flat_inverse_cdf_token_for_the_same_uniform():
    """Block cumsum then in-block cumsum finds the token a flat cumsum over the vocabulary finds."""
    from posttrain.rollout import engine

    V = 3 * engine.SAMPLE_BLOCK + 17  # not a multiple of the block: the padded tail must never win
    probs = torch.rand(64, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    probs[:, engine.SAMPLE_BLOCK:2 * engine.SAMPLE_BLOCK] = 0  # a whole empty block
    probs[:, -5:] = 0  # the last real tokens empty too
    probs /= probs.sum(-1, keepdim=True)
    u = torch.rand(64, 1, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    cdf = probs.cumsum(-1)
    flat = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
    got = engine.sample_from_probs(probs, torch.Generator().manual_seed(7))
    assert torch.equal(got, flat)
    assert not ((got >= engine.SAMPLE_BLOCK) & (got < 2 * engine.SAMPLE_BLOCK)).any()
    assert (got < V - 5).all()


def test_two_level_sampler_never_draws_a_zero_probability_token_at_the_top_edge():
    from posttrain.rollout import engine

    probs = torch.zeros(4, 2 * engine.SAMPLE_BLOCK)
    probs[:, 3] = 1.0  # all mass on one token in the first block; u near the total lands past it
    draws = torch.cat([engine.sample_from_probs(probs, torch.Generator().manual_seed(s)) for s in range(50)])
    assert (draws == 3).all()


def test_next_token_stats_returns_the_chosen_log_prob_and_the_entropy():
    from posttrain.rollout.engine import SamplingParams, next_token_stats

    p = torch.tensor([0.5, 0.25, 0.25])
    logits = torch.log(p).expand(3, 3).to(torch.bfloat16)
    for temperature in (1.0, 0.5):
        tok, logp, ent = next_token_stats(logits, SamplingParams(temperature=temperature), torch.Generator().manual_seed(0))
        q = p.pow(1 / temperature) / p.pow(1 / temperature).sum()  # softmax(log p / T), by hand
        assert logp.dtype == torch.float32
        assert torch.allclose(logp, q.log()[tok], atol=1e-2)
        assert torch.allclose(ent, -(q * q.log()).sum().expand(3), atol=1e-2)


def test_auto_dtype_takes_bf16_only_on_cpus_with_bf16_instructions(monkeypatch):
    """AVX-512 without AVX512_BF16 or AMX emulates bf16 (2-5x slower than fp32): auto must pick fp32 there."""
    from posttrain.rollout import engine

    def cpu(*, computes: bool, avx512_bf16: bool, amx: bool):
        monkeypatch.setattr(engine, "cpu_computes_bf16", lambda: computes)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        return engine.resolve_dtype("auto", torch.device("cpu"))

    assert cpu(computes=True, avx512_bf16=False, amx=False) == torch.float32  # Ice Lake, Cascade Lake
    assert cpu(computes=True, avx512_bf16=True, amx=False) == torch.bfloat16  # Zen 4, Cooper Lake
    assert cpu(computes=True, avx512_bf16=False, amx=True) == torch.bfloat16  # Sapphire Rapids
    assert cpu(computes=False, avx512_bf16=True, amx=True) == torch.float32  # no oneDNN bf16 at all
    assert engine.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16  # by name: always honoured


def test_native_bf16_falls_back_to_the_cpu_flags_without_torch_probes(monkeypatch):
    from posttrain.rollout import engine

    monkeypatch.setattr(engine, "cpu_computes_bf16", lambda: True)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.setattr(engine, "_cpu_flags", lambda: {"avx512f", "avx512bw"})
    assert not engine.cpu_has_native_bf16()
    monkeypatch.setattr(engine, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert engine.cpu_has_native_bf16()


def test_run_start_says_why_auto_chose_fp32(monkeypatch):
    from posttrain.trainers import rl_run

    cpu = torch.device("cpu")
    monkeypatch.setattr(rl_run, "cpu_computes_bf16", lambda: True)
    line = rl_run.precision_line(torch.float32, cpu, "auto")
    assert line.startswith("learner computes in float32 (auto: this CPU has no bf16 instructions")
    assert "trainer.autocast=bfloat16 rollout.dtype=bfloat16" in line
    assert rl_run.precision_line(torch.float32, cpu, "none") == "learner computes in float32"  # asked for
    assert rl_run.precision_line(torch.bfloat16, cpu, "auto") == "learner computes in bfloat16"
    monkeypatch.setattr(rl_run, "cpu_computes_bf16", lambda: False)  # no bf16 at all: nothing was passed over
    assert rl_run.precision_line(torch.float32, cpu, "auto") == "learner computes in float32"
