"""LoRA (model.lora): only the adapter trains, the base never moves, the reference is the base
exactly, the learner's log-probs include the adapter, the sampler gets merged weights on the lean
decoder, checkpoints hold the adapter alone and resume exactly, a merged model has the adapter
model's log-probs, and unsupported combinations are config errors."""

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import ConfigError, DPOConfig, LoRAConfig, ModelConfig, SFTConfig, TrainerConfig, load_config
from posttrain.models.logprobs import completion_logprobs, uses_fast_decoder
from posttrain.models.lora import merge_run
from posttrain.models.loading import ModelLoadError, load_model_and_tokenizer
from posttrain.rollout.engine import cpu_computes_bf16
from posttrain.tasks.base import Problem
from posttrain.trainers.learner import Learner
from posttrain.trainers.rl_run import ResumeError
from posttrain.trainers.sft import completion_nll, train_sft
from posttrain.trainers.sft_data import Demonstration, collate, encode

pytest.importorskip("peft")

DEMOS = [Demonstration(Problem("a", "What is 2+2?"), "4", "a"),
         Demonstration(Problem("b", [{"role": "user", "content": "Say hi"}]), "hi there, friend", "b"),
         Demonstration(Problem("c", "x"), "a much longer completion than the others", "c")]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _learner(lora: LoRAConfig, autocast="none", reference=True, lr=3e-2):
    model, tok = load_model_and_tokenizer("tiny-random")
    sampler = torch.float32 if autocast == "none" else torch.bfloat16
    learner = Learner(model, TrainerConfig(autocast=autocast, lr=lr, micro_batch_size=2), ModelConfig(lora=lora),
                      temperature=1.0, device=torch.device("cpu"), sampler_dtype=sampler, reference=reference)
    return learner, tok, collate(encode(tok, DEMOS, True, 512), DEMOS)


def _train(learner, batch, steps=2):
    n = float(batch.completion_mask.sum())
    for _ in range(steps):
        learner.zero_grad()
        learner.forward_backward(batch, lambda micro, logp, _: completion_nll(logp, micro.completion_mask, n))
        learner.clip_grad_norm()
        learner.optim_step(1.0)


def _direct_logprobs(model, batch):
    """log p of each completion token from the model's own forward, prompt + completion per row."""
    out = torch.zeros(batch.completion_ids.shape)
    with torch.no_grad():
        for i in range(len(batch)):
            prompt = batch.prompt_ids[i][batch.prompt_mask[i].bool()]
            T = int(batch.completion_mask[i].sum())
            ids = torch.cat([prompt, batch.completion_ids[i, :T]])[None]
            logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
            out[i, :T] = logp[len(prompt) - 1: len(prompt) - 1 + T].gather(-1, ids[0, len(prompt):, None])[:, 0]
    return out


def test_only_the_adapter_trains_and_its_size_is_rank_times_in_plus_out():
    for rank, targets in ((8, TARGETS), (4, ["q_proj", "v_proj"])):
        learner, _, _ = _learner(LoRAConfig(rank=rank, target_modules=targets))
        cfg = learner.policy.config
        H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
        kv = cfg.num_key_value_heads * (H // cfg.num_attention_heads)
        in_out = {"q_proj": (H, H), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (H, H), "gate_proj": (H, I),
                  "up_proj": (H, I), "down_proj": (I, H)}
        by_hand = L * sum(rank * (i + o) for i, o in (in_out[t] for t in targets))
        assert by_hand == {8: 2 * (4 * 8 * 128 + 3 * 8 * 192), 4: 2 * 2 * 4 * 128}[rank]  # 64 hidden, 128 MLP
        optimized = [p for group in learner.optimizer.param_groups for p in group["params"]]
        trainable = {n: p for n, p in learner.policy.named_parameters() if p.requires_grad}
        assert sum(p.numel() for p in optimized) == sum(p.numel() for p in trainable.values()) == by_hand
        assert {id(p) for p in optimized} == {id(p) for p in trainable.values()}
        assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
        assert all(p.dtype == torch.float32 for p in optimized)
        assert learner.lora.summary()["trainable_params"] == by_hand


@pytest.mark.parametrize("autocast", ["none", "bfloat16"])
def test_base_frozen_reference_is_the_base_and_logprobs_include_the_adapter(autocast):
    learner, tok, batch = _learner(LoRAConfig(), autocast)
    dtype = torch.float32 if autocast == "none" else torch.bfloat16
    base = {n: p.detach().clone() for n, p in learner.policy.named_parameters() if not p.requires_grad}
    assert all(p.dtype == dtype for p in base.values())  # the frozen base in the compute dtype: no fp32 master
    before = learner.logprobs(batch)
    assert torch.equal(before, learner.logprobs(batch, "ref"))  # B = 0: the policy starts as the base exactly
    _train(learner, batch)
    for n, p in learner.policy.named_parameters():  # bit-identical after the steps
        assert p.requires_grad or torch.equal(p, base[n]), n

    # The reference: the base model's log-probs exactly (a fresh load, its weights rounded to the
    # learner's precision as LoRA's frozen base is: to nearest even; buffers as loaded).
    fresh, _ = load_model_and_tokenizer("tiny-random")
    for p in fresh.parameters():
        p.data = p.data.to(dtype)
    plain = Learner(fresh, TrainerConfig(autocast=autocast, micro_batch_size=2), ModelConfig(decoder="hf"),
                    temperature=1.0, device=torch.device("cpu"), sampler_dtype=dtype)
    assert torch.equal(learner.logprobs(batch, "ref"), plain.logprobs(batch))

    # The learner's passes include the adapter: they moved, and match the peft model's own forward.
    after = learner.logprobs(batch)
    assert (after - before).abs().max() > 0.05
    if autocast == "none":
        torch.testing.assert_close(after, _direct_logprobs(learner.policy, batch), rtol=0, atol=2e-5)
    # Routing: the peft model runs transformers' forward, the sampler's merged model the lean decoder.
    assert not uses_fast_decoder(learner.policy.get_decoder(), "auto")
    sampler = learner.sampler_model()
    assert type(sampler).__name__ == "LlamaForCausalLM" and uses_fast_decoder(sampler.get_decoder(), "auto")
    assert next(sampler.parameters()).dtype == dtype
    merged = completion_logprobs(sampler, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                 batch.completion_mask)[0]
    tol = 2e-5 if autocast == "none" else 0.15  # bf16: the merged weights are rounded to bf16
    torch.testing.assert_close(merged * batch.completion_mask, after, rtol=0, atol=tol)
    # The sampler shares the frozen tensors it does not merge; export_weights are its own tensors.
    weights = learner.export_weights()
    assert set(weights) == {n for n, _ in sampler.named_parameters()}
    assert weights["model.embed_tokens.weight"].data_ptr() == \
        learner.policy.get_input_embeddings().weight.data_ptr()


PRECISIONS = {"fp32": ["trainer.autocast=none", "rollout.dtype=float32"],
              "bf16": ["trainer.autocast=bfloat16", "rollout.dtype=bfloat16"]}


@pytest.mark.parametrize("precision", [
    "fp32",  # the merge once wrote into an fp32 base in place (.float() returns the tensor itself)
    pytest.param("bf16", marks=pytest.mark.skipif(not cpu_computes_bf16(), reason="no bf16 matmul on this CPU"))])
def test_lora_rl_steps_leave_the_base_alone_and_the_critic_is_lora_too(tmp_path, precision):
    from posttrain.models.loading import load_model_and_tokenizer as load
    from posttrain.rewards.registry import build_reward
    from posttrain.runs import RunDir
    from posttrain.tasks.registry import build_task
    from posttrain.trainers.rl import RLTrainer

    cfg = load_config(None, ["model.name=tiny-random", "model.lora={}", "trainer.lr=1e-2", "rollout.num_prompts=4",
                             "reward={type: format, pattern: '^[0-9]', match: search}",  # a dense signal
                             "rollout.num_completions=4", "rollout.max_new_tokens=4", "trainer.eval_problems=4",
                             "algorithm.kl.coef=0.1", "algorithm.advantage_estimator=gae", "algorithm.critic.lr=1e-3"]
                      + PRECISIONS[precision])
    model, tok = load(cfg.model.name)
    trainer = RLTrainer(cfg, model, tok, build_task(cfg.task), build_reward(cfg.reward, tokenizer=tok),
                        RunDir(Path(tempfile.mkdtemp(dir=tmp_path))))
    learner = trainer.learner
    frozen = {n: p.detach().clone() for n, p in learner.policy.named_parameters() if not p.requires_grad}
    critic = {n for n, p in learner.critic.named_parameters() if p.requires_grad}
    assert critic and all(".lora_" in n or n.startswith("head.") for n in critic)
    metrics = [trainer.train_step() for _ in range(2)]
    assert all(math.isfinite(m["loss/total"]) for m in metrics)
    assert any(p.abs().max() > 0 for n, p in learner.policy.named_parameters() if ".lora_B." in n)
    assert metrics[-1]["kl/mean"] != 0.0  # the reference (adapter disabled) differs from the moved policy
    for n, p in learner.policy.named_parameters():
        assert p.requires_grad or torch.equal(p, frozen[n]), n
    # The engine samples from the merged model, which the learner refreshed after the step.
    assert trainer.engine.model is learner.sampler_model()
    assert trainer.engine.model.model.layers[0].self_attn.q_proj.weight.data_ptr() != \
        learner.policy.get_decoder().layers[0].self_attn.q_proj.base_layer.weight.data_ptr()


def test_lora_ppo_with_a_critic_resumes_exactly(tmp_path):
    from posttrain.trainers.rl_run import train_rl

    overrides = ["model.name=tiny-random", "model.lora={}", "trainer.lr=1e-2", "rollout.num_prompts=4",
                 "reward={type: format, pattern: '^[0-9]', match: search}", "rollout.num_completions=4",
                 "rollout.max_new_tokens=4", "trainer.eval_problems=4", "algorithm.kl.coef=0.1",
                 "algorithm.advantage_estimator=gae", "algorithm.critic.lr=1e-3", "trainer.steps=3",
                 "trainer.checkpoint_every=1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_rl(load_config(None, overrides), output_dir=str(straight), quiet=True)
    train_rl(load_config(None, overrides), output_dir=str(split), quiet=True, stop_after=1)
    train_rl(load_config(split / "config.yaml"), output_dir=str(split), resume=True, quiet=True)
    for name in ("adapter_model.safetensors", "critic.safetensors"):
        a, b = (load_file(d / "checkpoints" / "step_3" / name) for d in (straight, split))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    critic = load_file(straight / "checkpoints" / "step_3" / "critic.safetensors")
    assert all(".lora_" in k or k.startswith("head.") for k in critic)  # its frozen base is not saved


FAST = ["model.name=tiny-random", "model.lora={}", "trainer.lr=3e-2", "data.batch_size=8", "trainer.eval_problems=4",
        "task.test_size=16", "trainer.threads=1", "rollout.max_new_tokens=4"]


def test_checkpoint_is_the_adapter_alone_resume_is_exact_and_merge_keeps_the_logprobs(tmp_path):
    overrides = FAST + ["trainer.steps=4", "trainer.checkpoint_every=1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    summary = train_sft(load_config(None, overrides, cls=SFTConfig), output_dir=str(straight), quiet=True)
    assert summary["lora"]["sampler"] == "merged" and summary["lora"]["trainable_params"] == 17408
    train_sft(load_config(None, overrides, cls=SFTConfig), output_dir=str(split), quiet=True, stop_after=2)
    train_sft(load_config(split / "config.yaml", cls=SFTConfig), output_dir=str(split), resume=True, quiet=True)
    rows = [[json.loads(line)["loss/nll"] for line in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (straight, split)]
    assert rows[0] == rows[1] and len(rows[0]) == 4
    step = straight / "checkpoints" / "step_4"
    files = {f.name for f in step.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "trainer_state.pt", "COMPLETE"} <= files
    assert not {"model.safetensors", "config.json"} & files
    wa, wb = load_file(step / "adapter_model.safetensors"), load_file(split / "checkpoints/step_4/adapter_model.safetensors")
    assert wa.keys() == wb.keys() and len(wa) == 2 * 7 * 2  # A and B of 7 modules in 2 layers
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and all(".lora_A." in k or ".lora_B." in k for k in wa)
    assert json.loads((step / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-random"

    # The adapter is in peft's format, and the merged model has the adapter model's log-probs.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, tok = load_model_and_tokenizer("tiny-random")
    adapter_model = PeftModel.from_pretrained(base, str(step))
    batch = collate(encode(tok, DEMOS, True, 512), DEMOS)
    want = _direct_logprobs(adapter_model, batch)
    out = merge_run(straight, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)
    got = _direct_logprobs(merged, batch)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    fresh, _ = load_model_and_tokenizer("tiny-random")
    assert (got - _direct_logprobs(fresh, batch)).abs().max() > 0.05  # the adapter moved it
    in_memory, _ = load_model_and_tokenizer(str(straight))  # a LoRA run as model.name: merged on load
    torch.testing.assert_close(_direct_logprobs(in_memory, batch), want, rtol=0, atol=1e-5)
    with pytest.raises(ModelLoadError, match="not empty"):
        merge_run(straight, out)

    # A run's LoRA settings are part of its state.
    with pytest.raises(ResumeError, match="model.lora"):
        train_sft(load_config(split / "config.yaml", ["model.lora.rank=4"], cls=SFTConfig), output_dir=str(split),
                  resume=True, quiet=True)


def test_one_step_sft_then_dpo_from_it_with_lora(tmp_path):
    from posttrain.trainers.dpo import train_dpo

    train_sft(load_config(None, FAST + ["trainer.steps=1"], cls=SFTConfig), output_dir=str(tmp_path / "sft"),
              quiet=True)
    cfg = load_config(None, FAST[2:] + [f"model.name={tmp_path / 'sft'}", "model.lora={rank: 4}", "trainer.steps=1",
                                        "data.synthetic_size=16", "rollout.max_new_tokens=2"], cls=DPOConfig)
    summary = train_dpo(cfg, output_dir=str(tmp_path / "dpo"), quiet=True)
    assert summary["steps"] == 1 and summary["lora"]["rank"] == 4
    first = json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    # The reference is the adapter-disabled base, the policy starts equal to it: the DPO loss is log 2.
    assert first["loss/preference"] == pytest.approx(math.log(2), abs=1e-6)
    assert (tmp_path / "dpo" / "checkpoints" / "step_1" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("overrides, pattern", [
    (["model.lora.rank=0"], "model.lora.rank must be >= 1"),
    (["model.lora={alpha: 0}"], "model.lora.alpha must be > 0"),
    (["model.lora={dropout: 1.0}"], r"model.lora.dropout must be in \[0, 1\)"),
    (["model.lora={target_modules: []}"], "must name at least one module"),
    (["model.lora={}", "distributed.learners=2", "distributed.strategy=fsdp2"], "model.lora does not work with .*fsdp2"),
    (["model.lora={}", "trainer.activation_checkpointing=true"], "activation_checkpointing=false"),
])
def test_config_errors(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_vllm_takes_merged_weights_and_unknown_targets_fail_clearly():
    cfg = load_config(None, ["model.lora={}", "rollout.engine=vllm"])  # no error: vLLM gets merged weights
    assert cfg.model.lora.rank == 8 and cfg.model.lora.target_modules == TARGETS
    with pytest.raises(ValueError, match="model.lora.target_modules=.*nope"):
        _learner(LoRAConfig(target_modules=["nope"]))


def test_online_dpo_and_the_merge_command_with_lora(tmp_path, capsys):
    from posttrain.cli import main
    from posttrain.trainers.dpo import train_dpo

    online = ["model.name=tiny-random", "model.lora={rank: 4}", "data.path=online", "task.max_operand=20",
              "reward={type: format, pattern: '^[0-9]', match: search}", "rollout.num_prompts=4",
              "rollout.num_completions=4", "rollout.max_new_tokens=4", "trainer.lr=1e-2", "trainer.eval_problems=4",
              "trainer.threads=1", "trainer.steps=2"]
    summary = train_dpo(load_config(None, online, cls=DPOConfig), output_dir=str(tmp_path / "run"), quiet=True)
    assert summary["steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss/preference"] == pytest.approx(math.log(2), abs=1e-6)  # reference = base = policy at start
    assert (tmp_path / "run" / "checkpoints" / "step_2" / "adapter_model.safetensors").exists()
    with pytest.raises(ConfigError, match="reference_update_every does not work with model.lora"):
        load_config(None, online + ["preference.reference_update_every=1"], cls=DPOConfig)
    assert main(["merge", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    assert "merged model written to" in capsys.readouterr().out and (tmp_path / "merged" / "config.json").exists()
