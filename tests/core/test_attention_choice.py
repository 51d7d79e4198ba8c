import pytest
import torch

from posttrain.models.attention import EAGER_MAX_TOKENS, attention_for, choose_attention
from posttrain.models.logprobs import completion_logprobs
from posttrain.models.tiny import tiny_model_and_tokenizer
from posttrain.rollout.engine import HFRolloutEngine, SamplingParams
from posttrain.tasks.base import Problem


def test_auto_picks_eager_for_short_cpu_sequences_only():
    assert choose_attention("auto", "cpu", 100, "learner", "sdpa") == "eager"
    assert choose_attention("auto", "cpu", EAGER_MAX_TOKENS["learner"] + 1, "learner", "sdpa") == "sdpa"
    assert choose_attention("auto", "cpu", EAGER_MAX_TOKENS["learner"] + 1, "sampler", "sdpa") == "eager"
    assert choose_attention("auto", "cuda", 10, "sampler", "sdpa") == "sdpa"
    assert choose_attention("sdpa", "cpu", 10, "learner", "eager") == "sdpa"
    with pytest.raises(ValueError, match="attention must be one of"):
        choose_attention("flash", "cpu", 10, "learner", "sdpa")


def test_context_switches_and_restores():
    model, _ = tiny_model_and_tokenizer()
    model.config._attn_implementation = "sdpa"
    with attention_for(model, "auto", 20, "learner") as chosen:
        assert chosen == "eager" and model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError):
        with attention_for(model, "eager", 20, "learner"):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_eager_and_sdpa_give_the_same_logprobs_gradients_and_samples():
    model, tok = tiny_model_and_tokenizer()
    model.config._attn_implementation = "sdpa"
    problems = [Problem(id=f"p{i}", prompt=f"What is {i} + {i * 3}?", answer="0") for i in range(3)]
    outs = {}
    for mode in ("eager", "sdpa"):
        eng = HFRolloutEngine(model, tok, dtype=torch.float32, attention=mode)
        r = eng.generate(problems, 3, SamplingParams(max_new_tokens=8), torch.Generator().manual_seed(0))
        model.zero_grad()
        lp, _ = completion_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask,
                                    attention=mode)
        lp.sum().backward()
        outs[mode] = (r.completion_ids, r.behaviour_logprobs, lp.detach(),
                      torch.cat([p.grad.flatten() for p in model.parameters()]))
    (ids_e, beh_e, lp_e, g_e), (ids_s, beh_s, lp_s, g_s) = outs["eager"], outs["sdpa"]
    assert torch.equal(ids_e, ids_s)
    assert torch.allclose(beh_e, beh_s, atol=1e-5)
    assert torch.allclose(lp_e, lp_s, atol=1e-5)
    assert torch.allclose(g_e, g_s, atol=1e-5)
