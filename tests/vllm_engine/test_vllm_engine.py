"""VLLMRolloutEngine against a real vLLM (the CPU build here): one engine for the module, since
each start costs ~15-30 s on two cores.

The policy is posttrain's tiny random Llama with 2 heads (head_dim 32): vLLM's CPU attention
has no kernel for the default tiny shape's head_dim 16 (supported: 32, 64, 80, ...).
"""

import copy
import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.vllm]
pytest.importorskip("vllm")

from posttrain.models.logprobs import completion_logprobs  # noqa: E402
from posttrain.models.tiny import tiny_model_and_tokenizer  # noqa: E402
from posttrain.rollout.sampler import SamplingParams  # noqa: E402
from posttrain.rollout.vllm_engine import (  # noqa: E402
    KVCacheTooSmallError,
    UnsupportedSamplingError,
    VLLMNotInstalledError,
    VLLMRolloutEngine,
    VLLMUnsupportedDtypeError,
    VLLMUnsupportedModelError,
    import_vllm,
)
from posttrain.tasks.base import Problem  # noqa: E402

PROBLEMS = [Problem(id=f"p{i}", prompt="What is " + "1 + " * i + "1?", answer=str(i + 1)) for i in range(3)]
# fp32 engine vs fp32 learner: same math, different kernels (vLLM's CPU attention and GEMMs vs
# torch SDPA). Measured on 2 Xeon cores (2662 tokens, T=0.7): mean |diff| 1.7e-7, max 1.4e-6 nats per token.
LOGPROB_TOL = 1e-4
KV_GB = 0.05  # 1 KiB of K+V per token for this model: ~52k tokens, 409 blocks of 128


def tiny(**kw):
    return tiny_model_and_tokenizer(num_heads=2, **kw)


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny()
    engine = VLLMRolloutEngine(model, tok, dtype=torch.float32, kv_cache_gb=KV_GB, gpu_memory_utilization=0.5,
                               seed=0)
    yield model, tok, engine
    engine.close()


def learner_logprobs(model, r, temperature):
    with torch.no_grad():
        lp, _ = completion_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask,
                                    temperature=temperature)
    return lp


def max_logprob_diff(model, r, temperature):
    return float(((learner_logprobs(model, r, temperature) - r.behaviour_logprobs) * r.completion_mask).abs().max())


def test_rollouts_layout_matches_the_hf_engine(setup):
    _, tok, engine = setup
    r = engine.generate(PROBLEMS, 4, SamplingParams(max_new_tokens=12), torch.Generator().manual_seed(0))
    assert len(r) == 12 and r.entropies is None
    assert r.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert [p.id for p in r.problems] == [p.id for p in PROBLEMS for _ in range(4)]
    prompts = engine.encode(PROBLEMS, 12)
    assert r.prompt_ids.shape == (12, max(map(len, prompts)))
    for i in range(12):  # prompts left-padded with the pad id, identical to posttrain's encoding
        ids = prompts[i // 4]
        pad = r.prompt_ids.shape[1] - len(ids)
        assert r.prompt_ids[i, pad:].tolist() == ids and r.prompt_mask[i, pad:].all()
        assert (r.prompt_ids[i, :pad] == tok.pad_token_id).all() and r.prompt_mask[i, :pad].sum() == 0
    lengths = r.completion_mask.sum(-1).long()
    assert r.completion_ids.shape[1] == int(lengths.max()) and r.completion_mask.dtype == torch.float32
    assert not torch.equal(r.completion_ids[0], r.completion_ids[1])  # n completions are not copies
    for i in range(12):
        ids = r.completion_ids[i, : lengths[i]].tolist()
        assert r.completion_mask[i, lengths[i]:].sum() == 0
        assert (r.completion_ids[i, lengths[i]:] == tok.pad_token_id).all()
        assert (r.behaviour_logprobs[i, : lengths[i]] < 0).all() and (r.behaviour_logprobs[i, lengths[i]:] == 0).all()
        if r.truncated[i]:
            assert lengths[i] == 12 and tok.eos_token_id not in ids
        else:  # ended on EOS, which stays in the completion (as in the HF engine)
            assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
        assert r.texts[i] == tok.decode(ids, skip_special_tokens=True)
    assert set(engine.last_stats) >= {"gen_wall_s", "gen_tokens", "gen_tok_per_s"}
    assert engine.last_stats["gen_tokens"] == float(lengths.sum())


def test_stop_strings_cut_the_text_and_do_not_truncate(setup):
    _, tok, engine = setup
    stops = list("abcdefghij")  # one-character tokens: ~10% of the tiny model's draws each step
    params = SamplingParams(max_new_tokens=40, stop=stops)
    r = engine.generate(PROBLEMS[:2], 8, params, torch.Generator().manual_seed(3))
    lengths = r.completion_mask.sum(-1).long()
    stopped = 0
    for i in range(len(r)):
        full = tok.decode(r.completion_ids[i, : lengths[i]].tolist(), skip_special_tokens=True)
        assert not any(s in r.texts[i] for s in stops)
        if full[-1:] in stops:  # ended on a stop string: the token stays, the text loses it
            stopped += 1
            assert r.texts[i] == full[:-1] and not r.truncated[i] and lengths[i] < 40
    assert stopped >= 8


def test_behaviour_logprobs_match_learner(setup):
    model, _, engine = setup
    for T in (0.7, 1.0):
        params = SamplingParams(max_new_tokens=16, temperature=T)
        r = engine.generate(PROBLEMS, 4, params, torch.Generator().manual_seed(1))
        assert max_logprob_diff(model, r, T) < LOGPROB_TOL


def test_greedy_is_top_k_1_with_unscaled_logprobs(setup):
    model, _, engine = setup
    r = engine.generate(PROBLEMS[:1], 3, SamplingParams(max_new_tokens=10, top_k=1), torch.Generator().manual_seed(2))
    assert torch.equal(r.completion_ids[0], r.completion_ids[1])
    assert torch.equal(r.completion_ids[0], r.completion_ids[2])
    assert max_logprob_diff(model, r, 1.0) < LOGPROB_TOL


def test_same_generator_seed_reproduces_samples(setup):
    _, _, engine = setup
    params = SamplingParams(max_new_tokens=16)
    a = engine.generate(PROBLEMS, 4, params, torch.Generator().manual_seed(11))
    b = engine.generate(PROBLEMS, 4, params, torch.Generator().manual_seed(11))
    c = engine.generate(PROBLEMS, 4, params, torch.Generator().manual_seed(12))
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.behaviour_logprobs, b.behaviour_logprobs)
    assert a.texts == b.texts
    assert a.completion_ids.shape != c.completion_ids.shape or not torch.equal(a.completion_ids, c.completion_ids)


def test_weight_push_changes_samples_to_the_new_policy(setup):
    model, _, engine = setup
    # The long prompt (~300 tokens, so >= 2 full KV blocks of 128) lands in vLLM's prefix cache;
    # the push must invalidate it, or the new policy would continue from the old policy's KV.
    problems = PROBLEMS + [Problem(id="long", prompt="Sum the digits: " + "1234567890" * 30)]
    params = SamplingParams(max_new_tokens=16, temperature=0.8)
    before = engine.generate(problems, 4, params, torch.Generator().manual_seed(5))
    assert before.policy_version.tolist() == [0] * 16
    new = copy.deepcopy(model)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    engine.load_weights(dict(new.named_parameters()), 1)  # tied model: no lm_head.weight in here
    assert engine.policy_version == 1 and engine.last_stats["sync_s"] > 0
    after = engine.generate(problems, 4, params, torch.Generator().manual_seed(5))
    assert after.policy_version.tolist() == [1] * 16
    assert max_logprob_diff(new, after, 0.8) < LOGPROB_TOL
    # the same tokens scored by the old policy differ: the push (head included) took effect
    old_scores = learner_logprobs(model, after, 0.8)
    assert float(((old_scores - after.behaviour_logprobs) * after.completion_mask).abs().max()) > 0.05
    engine.load_weights(dict(model.named_parameters()), 2)  # restore for the tests below
    back = engine.generate(problems, 4, params, torch.Generator().manual_seed(5))
    assert torch.equal(back.completion_ids, before.completion_ids)


def test_bf16_raw_logprobs_engine_scores_top_p_samples_unfiltered():
    """raw_logprobs at T = 1: the log-prob of the full softmax even when top-p filters the draw
    (processed_logprobs would renormalize over the nucleus, off by -log(nucleus mass) ~ 0.1-0.3 here).
    bf16 engine vs fp32 learner, measured: mean |diff| ~1e-3, max ~7e-3 nats per token."""
    model, tok = tiny()
    with VLLMRolloutEngine(model, tok, dtype=torch.bfloat16, kv_cache_gb=KV_GB, gpu_memory_utilization=0.5,
                           logprobs_mode="raw_logprobs") as engine:
        r = engine.generate(PROBLEMS, 8, SamplingParams(max_new_tokens=24, top_p=0.8), torch.Generator().manual_seed(4))
        diff = ((learner_logprobs(model, r, 1.0) - r.behaviour_logprobs) * r.completion_mask).abs()
        assert float(diff.max()) < 2e-2 and float(diff.sum() / r.completion_mask.sum()) < 3e-3
        with pytest.raises(UnsupportedSamplingError, match="before temperature"):
            engine.generate(PROBLEMS, 2, SamplingParams(temperature=0.7))


def test_partial_weight_push_is_refused(setup):
    model, _, engine = setup
    weights = dict(model.named_parameters())
    weights.pop("model.layers.0.self_attn.q_proj.weight")
    with pytest.raises(ValueError, match="missing.*q_proj"):
        engine.load_weights(weights, 3)
    assert engine.policy_version == 2


@pytest.mark.parametrize("params, match", [
    (SamplingParams(top_p=0.9), "renormalized over the top-k/top-p set"),
    (SamplingParams(top_k=5), "renormalized over the top-k/top-p set"),
    (SamplingParams(temperature=2.5), r"temperatures in \(0, 2.0\]"),
    (SamplingParams(temperature=0.5, top_k=1), "greedy"),
])
def test_sampling_options_vllm_cannot_honour_are_refused(setup, params, match):
    _, _, engine = setup
    with pytest.raises(UnsupportedSamplingError, match=match):
        engine.generate(PROBLEMS, 2, params)


def test_batch_larger_than_the_kv_cache_is_refused_before_sampling(setup):
    _, _, engine = setup
    assert engine.kv_blocks * engine.block_size >= 40_000  # what KV_GB buys; the check below uses the real figure
    with pytest.raises(KVCacheTooSmallError, match="raise kv_cache_gb to at least"):
        engine.generate(PROBLEMS, engine.kv_blocks // 2, SamplingParams(max_new_tokens=100))


def test_unservable_models_and_settings_fail_before_start(monkeypatch):
    model, tok = tiny_model_and_tokenizer()  # head_dim 16
    with pytest.raises(VLLMUnsupportedModelError, match="head_dim=16"):
        VLLMRolloutEngine(model, tok, dtype=torch.float32, kv_cache_gb=KV_GB, gpu_memory_utilization=0.5)
    model, tok = tiny()
    with pytest.raises(VLLMUnsupportedDtypeError, match="float64"):
        VLLMRolloutEngine(model, tok, dtype=torch.float64, kv_cache_gb=KV_GB, gpu_memory_utilization=0.5)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    with pytest.raises(ValueError, match="kv_cache_gb is required"):
        VLLMRolloutEngine(model, tok, dtype=torch.float32, kv_cache_gb=None, gpu_memory_utilization=0.5)
    with pytest.raises(KVCacheTooSmallError, match="max_model_len=512"):
        VLLMRolloutEngine(model, tok, dtype=torch.float32, kv_cache_gb=1e-4, gpu_memory_utilization=0.5)
    model.config.architectures = ["NoSuchModelForCausalLM"]
    with pytest.raises(VLLMUnsupportedModelError, match="NoSuchModelForCausalLM"):
        VLLMRolloutEngine(model, tok, dtype=torch.float32, kv_cache_gb=KV_GB, gpu_memory_utilization=0.5)


def test_missing_vllm_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` sees when it is not installed
    with pytest.raises(VLLMNotInstalledError, match=r"pip install -e '\.\[vllm\]'"):
        import_vllm()


def test_close_ends_engine_processes_and_removes_tmpfs_copy(setup):
    _, _, engine = setup
    procs, directory = list(engine._procs), engine._dir
    assert procs and all(p.is_running() for p in procs)  # EngineCore and its worker
    assert directory.startswith("/dev/shm/") and os.path.isdir(directory)
    assert not list(Path(directory, "model").glob("*.safetensors"))  # dropped once vLLM holds the weights
    engine.close()
    assert not any(p.is_running() for p in procs)
    assert not os.path.exists(directory)
    engine.close()  # idempotent: the fixture closes again
