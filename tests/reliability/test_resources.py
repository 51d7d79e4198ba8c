"""Memory is checked up front: an absurd size fails in seconds naming the knob, leaving nothing."""

import time
from types import SimpleNamespace

import pytest

from posttrain.cli import main
from posttrain.models.loading import load_model_and_tokenizer
from posttrain.trainers.resources import ResourceError, check_memory, estimate


def test_the_estimate_by_hand():
    config = SimpleNamespace(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                             vocab_size=100)
    est = estimate(config, params=1000, trainable=500, rows=8, prompt_tokens=10, max_new_tokens=6,
                   micro_batch_size=4, logprob_chunk_tokens=256)
    assert est.weights == 6000 and est.optimizer == 6000
    assert est.kv_cache == 8 * 16 * 2 * 2 * 2 * 16 * 2  # rows x length x layers x (K, V) x kv heads x head dim x 2 B
    assert est.logits == 8 * 100 * 4 + min(4 * 16, 256) * 100 * 4
    assert est.learner == 4 * 16 * 64 * 2 * 34
    # a token cap bounds the micro-batch: 4 rows x 16 tokens = 64 > 40, so 40 tokens count
    capped = estimate(config, params=1000, trainable=500, rows=8, prompt_tokens=10, max_new_tokens=6,
                      micro_batch_size=4, logprob_chunk_tokens=256, micro_batch_tokens=40)
    assert capped.learner == 40 * 64 * 2 * 34 and capped.logits == 8 * 100 * 4 + 40 * 100 * 4
    # ... but never below one row, which forms a micro-batch of its own
    assert estimate(config, params=1000, trainable=500, rows=8, prompt_tokens=10, max_new_tokens=6,
                    micro_batch_size=4, logprob_chunk_tokens=256, micro_batch_tokens=5).learner == 16 * 64 * 2 * 34
    # in fp32 (auto on a CPU without bf16 instructions): no bf16 copy, and 4-byte KV and activations
    fp32 = estimate(config, params=1000, trainable=500, rows=8, prompt_tokens=10, max_new_tokens=6,
                    micro_batch_size=4, logprob_chunk_tokens=256, learner_bytes=4, sampler_bytes=4)
    assert fp32.weights == 4000 and fp32.optimizer == 6000
    assert fp32.kv_cache == 2 * est.kv_cache and fp32.learner == 4 * 16 * 64 * 2 * 17 * 4


def test_the_estimate_uses_the_precision_the_run_will_compute_in(monkeypatch):
    from posttrain.rollout import engine
    from posttrain.trainers.resources import compute_bytes

    def cfg(autocast: str, dtype: str):
        return SimpleNamespace(trainer=SimpleNamespace(autocast=autocast, device="cpu"),
                               rollout=SimpleNamespace(dtype=dtype))

    def native(yes: bool):  # the learner's auto defers to the sampler's rule, which reads this probe
        monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: yes)

    native(False)  # a CPU that emulates bf16
    assert compute_bytes(cfg("auto", "auto")) == (4, 4)
    assert compute_bytes(cfg("bfloat16", "bfloat16")) == (2, 2)  # asked for by name
    native(True)
    assert compute_bytes(cfg("auto", "auto")) == (2, 2)
    assert compute_bytes(cfg("none", "float32")) == (4, 4)


def test_a_run_that_cannot_fit_is_refused_naming_the_knob():
    model, _ = load_model_and_tokenizer("tiny-random")
    cfg = SimpleNamespace(rollout=SimpleNamespace(num_prompts=8, num_completions=1000, max_new_tokens=32),
                          trainer=SimpleNamespace(micro_batch_size=16, logprob_chunk_tokens=256,
                                                           micro_batch_tokens=0))
    assert check_memory(cfg, model, 20, available=1e10).total < 1e10
    with pytest.raises(ResourceError, match="largest part is kv_cache: lower rollout.num_prompts x "
                                            "rollout.num_completions \\(now 8 x 1000\\)"):
        check_memory(cfg, model, 20, available=1e8)


def test_an_absurd_num_completions_fails_fast_and_leaves_no_run_directory(tmp_path, capsys):
    t0 = time.perf_counter()
    code = main(["rl", "examples/arithmetic.yaml", "model.name=tiny-random", "rollout.num_completions=100000000",
                 "--output-dir", str(tmp_path / "run")])
    assert code == 2 and time.perf_counter() - t0 < 30
    err = capsys.readouterr().err
    assert "largest part is kv_cache" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_an_optimizer_bound_run_is_told_to_train_a_lora_adapter():
    import torch

    from posttrain.config import load_config

    cfg = load_config(None, ["model.name=tiny-random"])
    config = SimpleNamespace(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
                             vocab_size=10)
    weight = torch.nn.Parameter(torch.zeros(10**6))  # many weights, tiny activations: the optimizer dominates
    model = SimpleNamespace(config=config, parameters=lambda: iter([weight]))
    with pytest.raises(ResourceError, match=r"largest part is optimizer: train a LoRA adapter \(model.lora=\{\}\)"):
        check_memory(cfg, model, 8, available=10**6)


def test_the_default_token_cap_keeps_activation_bytes_across_precisions(monkeypatch):
    """trainer.micro_batch_tokens null: 8192 tokens in bf16 (2 B), 4096 in fp32 (4 B); a set value
    (0 = no cap) is kept. The Learner and the memory check resolve it alike."""
    import torch

    from posttrain.config import ModelConfig, TrainerConfig
    from posttrain.rollout import engine
    from posttrain.trainers.learner import Learner, token_cap

    assert (token_cap(None, 2), token_cap(None, 4), token_cap(0, 4), token_cap(1000, 2)) == (8192, 4096, 0, 1000)
    assert TrainerConfig().micro_batch_tokens is None

    model, _ = load_model_and_tokenizer("tiny-random")
    learner = Learner(model, TrainerConfig(autocast="none"), ModelConfig(), temperature=1.0,
                      device=torch.device("cpu"), sampler_dtype=torch.float32)
    assert learner.micro_batch_tokens == 4096
    assert Learner(model, TrainerConfig(autocast="none", micro_batch_tokens=300), ModelConfig(), temperature=1.0,
                   device=torch.device("cpu"), sampler_dtype=torch.float32).micro_batch_tokens == 300

    # the estimate: 64 rows x (20 + 200) tokens = 14,080 > the cap; tiny-random: hidden 64, 2 layers
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)  # auto is fp32 here
    cfg = SimpleNamespace(rollout=SimpleNamespace(num_prompts=8, num_completions=8, max_new_tokens=200),
                          trainer=SimpleNamespace(micro_batch_size=64, logprob_chunk_tokens=256,
                                                  micro_batch_tokens=None, autocast="auto", device="cpu"))
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    assert check_memory(cfg, model, 20, available=1e12).learner == 4096 * hidden * layers * 17 * 4
    cfg.trainer.autocast = "bfloat16"
    assert check_memory(cfg, model, 20, available=1e12).learner == 8192 * hidden * layers * 17 * 2
