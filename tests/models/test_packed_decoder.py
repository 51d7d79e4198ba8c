"""The sampler's packed-weight forward (models/packed_decoder.py) against the lean decoder."""

import pytest
import torch

from posttrain.models import fast_decoder as fd
from posttrain.models.packed_decoder import PackedDecoder, packing_available
from posttrain.models.tiny import tiny_model_and_tokenizer
from posttrain.rollout import engine as engine_module
from posttrain.rollout.engine import HFRolloutEngine, SamplingParams
from posttrain.tasks.base import Problem

pytestmark = pytest.mark.skipif(
    not packing_available(torch.nn.Linear(2, 2).to(torch.bfloat16)), reason="oneDNN computes no bf16 on this CPU")


def _model(kind: str):
    """A 2-layer bf16 model with grouped-query attention: Llama, or Qwen2 with non-zero q/k/v biases."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager")
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape, rope_theta=100000.0))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    return model.to(torch.bfloat16).eval()


def _lean_logits(model, ids, pos, mask, cache, use_sdpa):
    with torch.no_grad():
        hidden = fd.decoder_forward(model.get_decoder(), ids, pos, mask, cache, use_sdpa=use_sdpa, last_only=True)
        cache.advance(ids.shape[1])
        return model.get_output_embeddings()(hidden)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("use_sdpa", [True, False])
def test_packed_logits_equal_the_lean_decoder_through_prefill_a_dropped_row_and_decoding(kind, use_sdpa):
    model = _model(kind)
    g = torch.Generator().manual_seed(1)
    n, P, T = 3, 5, 4
    ids = torch.randint(0, 64, (n, P + T), generator=g)
    mask = torch.ones(n, P + T, dtype=torch.long)
    mask[0, :2] = 0  # a left-padded (shorter) prompt
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    packed = PackedDecoder(model, rows_hint=n)
    packed.refresh()
    caches = [fd.StaticKV.for_config(model.config, n, P + T, torch.bfloat16, "cpu") for _ in range(2)]
    rows = torch.arange(n)
    for start, end in [(0, P)] + [(t, t + 1) for t in range(P, P + T)]:
        if start == P + 1:  # drop row 1 from the batch, as the sampler does for finished rows
            rows = torch.tensor([0, 2])
            for cache in caches:
                cache.select_rows(torch.tensor([0, 2]))
        args = ids[rows, start:end], pos[rows, start:end], mask[rows, :end]
        ref = _lean_logits(model, *args, caches[0], use_sdpa)
        out = packed.logits(*args, caches[1], use_sdpa=use_sdpa)
        assert out.shape == ref.shape == (len(rows), 64)
        # the same arithmetic in the same dtype: equal up to a matmul's summation order
        assert torch.allclose(out.float(), ref.float(), atol=1e-2 * ref.float().abs().max().item()), (start, end)
    for ref_kv, packed_kv in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):  # the same cache written
        assert torch.allclose(packed_kv.float(), ref_kv.float(), atol=1e-2 * ref_kv.float().abs().max().item())


def test_refresh_repacks_only_when_a_weight_changed_and_uses_the_new_weights():
    model = _model("llama")
    packed = PackedDecoder(model)
    ids, pos, mask = torch.tensor([[3, 4, 5]]), torch.tensor([[0, 1, 2]]), torch.ones(1, 3, dtype=torch.long)

    def logits(forward):
        cache = fd.StaticKV.for_config(model.config, 1, 3, torch.bfloat16, "cpu")
        return forward(ids, pos, mask, cache)

    assert packed.refresh() is True
    before = logits(packed.logits)
    assert packed.refresh() is False  # nothing changed: the packed weights are reused
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(-1.0)  # an in-place update, as an optimizer makes
    assert packed.refresh() is True
    after = logits(packed.logits)
    ref = logits(lambda *a: _lean_logits(model, *a, use_sdpa=True))
    assert not torch.allclose(after, before)
    assert torch.allclose(after.float(), ref.float(), atol=1e-2 * ref.float().abs().max().item())


def test_packed_decoder_refuses_fp32_weights_and_a_forward_before_packing():
    model = _model("llama")
    with pytest.raises(ValueError, match="bf16 model"):
        PackedDecoder(model.float())
    packed = PackedDecoder(model.to(torch.bfloat16))
    cache = fd.StaticKV.for_config(model.config, 1, 2, torch.bfloat16, "cpu")
    with pytest.raises(RuntimeError, match="refresh"):
        packed.logits(torch.tensor([[1]]), torch.tensor([[0]]), torch.ones(1, 1, dtype=torch.long), cache)


PROBLEMS = [Problem(id=f"p{i}", prompt=f"What is {i} + {i}?", answer=str(2 * i)) for i in range(3)]


def test_bf16_engine_samples_the_same_as_without_packing_and_repacks_after_a_weight_load(monkeypatch):
    model, tok = tiny_model_and_tokenizer()
    params = SamplingParams(max_new_tokens=8)
    eng = HFRolloutEngine(model, tok, dtype=torch.bfloat16)
    a = eng.generate(PROBLEMS, 3, params, torch.Generator().manual_seed(4))
    assert eng._packed is not None and eng.last_stats["gen_pack_s"] > 0
    packed_layers = eng._packed.layers
    eng.generate(PROBLEMS, 3, params, torch.Generator().manual_seed(4))
    assert eng._packed.layers is packed_layers  # same weights: not repacked

    monkeypatch.setattr(engine_module, "packing_available", lambda model: False)
    plain = HFRolloutEngine(model, tok, dtype=torch.bfloat16)
    b = plain.generate(PROBLEMS, 3, params, torch.Generator().manual_seed(4))
    assert plain._packed is None and plain.last_stats["gen_pack_s"] == 0.0
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.allclose(a.behaviour_logprobs, b.behaviour_logprobs, atol=0.05)
    monkeypatch.undo()

    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    eng.load_weights(dict(model.named_parameters()), 1)
    c = eng.generate(PROBLEMS, 3, params, torch.Generator().manual_seed(4))
    assert eng._packed.layers is not packed_layers  # the loaded weights were packed before sampling
    plain.load_weights(dict(model.named_parameters()), 1)
    d = plain.generate(PROBLEMS, 3, params, torch.Generator().manual_seed(4))
    assert torch.equal(c.completion_ids, d.completion_ids)


def test_fp32_engine_does_not_pack():
    model, tok = tiny_model_and_tokenizer()
    eng = HFRolloutEngine(model, tok, dtype=torch.float32)
    eng.generate(PROBLEMS[:1], 2, SamplingParams(max_new_tokens=3), torch.Generator().manual_seed(0))
    assert eng._packed is None and eng.last_stats["gen_pack_s"] == 0.0


def test_a_shared_weight_written_through_data_is_repacked_at_load_weights():
    """The split-master optimizer writes the shared bf16 weights through ``.data``, which bumps no
    version counter; ``load_weights`` (called after every optimizer step) must still repack."""
    model, tok = tiny_model_and_tokenizer()
    model = model.to(torch.bfloat16)
    eng = HFRolloutEngine(model, tok, dtype=torch.bfloat16)
    assert eng.model is model  # shared: load_weights copies nothing
    params = SamplingParams(max_new_tokens=6)
    eng.generate(PROBLEMS, 2, params, torch.Generator().manual_seed(0))
    stale = eng._packed.layers
    versions = [p._version for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.data.mul_(-1.0)
    assert [p._version for p in model.parameters()] == versions  # invisible to the version stamp
    eng.load_weights(dict(model.named_parameters()), 1)
    after = eng.generate(PROBLEMS, 2, params, torch.Generator().manual_seed(0))
    assert eng._packed.layers is not stale
    plain = HFRolloutEngine(model, tok, dtype=torch.bfloat16)
    plain._pack_weights = lambda cache, rows: 0.0  # the lean decoder on the same (new) weights
    ref = plain.generate(PROBLEMS, 2, params, torch.Generator().manual_seed(0))
    assert torch.equal(after.completion_ids, ref.completion_ids)
    assert torch.allclose(after.behaviour_logprobs, ref.behaviour_logprobs, atol=0.05)


def test_release_memory_drops_the_packed_copy_and_the_next_generate_samples_the_same():
    model, tok = tiny_model_and_tokenizer()
    params = SamplingParams(max_new_tokens=8)
    eng = HFRolloutEngine(model, tok, dtype=torch.bfloat16)
    a = eng.generate(PROBLEMS, 3, params, torch.Generator().manual_seed(4))
    assert eng._packed is not None
    eng.release_memory()
    assert eng._packed is None  # nothing of the packed copy is referenced any more
    b = eng.generate(PROBLEMS, 3, params, torch.Generator().manual_seed(4))
    assert eng._packed is not None and eng.last_stats["gen_pack_s"] > 0  # packed again, before sampling
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.behaviour_logprobs, b.behaviour_logprobs)
