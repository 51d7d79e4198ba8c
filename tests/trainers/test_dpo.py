"""DPO: the loss and its gradient equal direct forward passes of the policy and the reference
whatever the micro-batching, reference log-probs are computed once per pair and cached, a short
run learns its pairs, runs resume exactly, bad input fails before any model loads, SimPO loads no
reference, Pre-DPO guides with another model."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import posttrain.trainers.dpo as dpo
from posttrain.algorithms.preference import PreferenceConfig
from posttrain.cli import main
from posttrain.config import DPOConfig, ModelConfig, TrainerConfig, load_config
from posttrain.models.loading import load_model_and_tokenizer
from posttrain.tasks.arithmetic import ArithmeticTask
from posttrain.trainers.learner import Learner
from posttrain.trainers.preference_data import PreferencePair, synthetic_arithmetic_pairs
from posttrain.trainers.rl_run import ResumeError

PAIRS = [PreferencePair("What is 2+2?", "4", "5", None, "a"),
         PreferencePair([{"role": "user", "content": "Say hi"}], "hi there, friend", "go away", None, "b"),
         PreferencePair("x", "a much longer chosen completion than the rest", "no", None, "c")]

FAST = ["model.name=tiny-random", "trainer.eval_problems=4", "task.test_size=16", "trainer.threads=1",
        "rollout.max_new_tokens=2", "trainer.lr=3e-3"]


def _write(path, pairs):
    path.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in pairs))
    return path


@pytest.fixture
def trainers(monkeypatch):
    """The DPOTrainer of every train_dpo call of the test, in order."""
    made = []

    class Recording(dpo.DPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(dpo, "DPOTrainer", Recording)
    return made


def _sequence_logp(model, prompt, completion):
    """sum of log p(completion token | prefix) from one plain forward pass of prompt + completion."""
    logits = model(torch.tensor([prompt + completion])).logits.double().log_softmax(-1)[0]
    return sum(logits[len(prompt) + j - 1, t] for j, t in enumerate(completion))


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("micro_batch_size", [1, 16])
def test_loss_and_gradient_equal_direct_forward_passes(micro_batch_size):
    model, tok = load_model_and_tokenizer("tiny-random")
    learner = Learner(model, TrainerConfig(micro_batch_size=micro_batch_size, autocast="none"), ModelConfig(),
                      temperature=1.0, device=torch.device("cpu"), sampler_dtype=torch.float32, reference=True)
    torch.manual_seed(1)
    with torch.no_grad():  # move the policy off the reference, so the loss is not just log 2
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    encoded = dpo.encode_pairs(tok, PAIRS, chat_template=True, max_length=512)
    batch = dpo.collate_pairs(encoded, PAIRS)
    ref = dpo.pair_logps(learner.logprobs(batch, "ref"), batch)[0]
    beta = 0.5
    loss, out, _ = dpo.preference_backward(learner, batch, "dpo", PreferenceConfig(beta=beta), ref)
    trainer_grad = _grads(model).clone()
    # By hand: each side of each pair through the model on its own; only completion tokens
    # (the EOS that ends them included) count.
    model.zero_grad()
    hand, correct = [], 0
    for (chosen, rejected), pair in zip(encoded, PAIRS):
        assert chosen[0] == rejected[0] and chosen[1][-1] == rejected[1][-1] == tok.eos_token_id
        assert tok.decode(chosen[1][:-1]) == pair.chosen and tok.decode(rejected[1][:-1]) == pair.rejected
        with torch.no_grad():
            ref_c, ref_r = (_sequence_logp(learner.ref, *chosen), _sequence_logp(learner.ref, *rejected))
        pol_c, pol_r = _sequence_logp(model, *chosen), _sequence_logp(model, *rejected)
        h = (pol_c - ref_c) - (pol_r - ref_r)
        hand.append(-F.logsigmoid(beta * h))
        correct += int(h > 0)
    hand_loss = torch.stack(hand).mean()
    hand_loss.backward()
    assert loss == pytest.approx(float(hand_loss.detach()), rel=1e-5)
    assert abs(loss - math.log(2)) > 1e-3
    assert float(out.metrics["reward_accuracy"]) == pytest.approx(correct / len(PAIRS))
    # The two-pass gradient is the gradient of the pairwise loss, even with one row per micro-batch.
    assert torch.allclose(trainer_grad, _grads(model), rtol=1e-4, atol=1e-5)  # fp32 rounding: |g| up to 3


def test_reference_is_computed_once_per_pair_and_cached(tmp_path, monkeypatch, trainers):
    task_pairs = synthetic_arithmetic_pairs(8, 0, ArithmeticTask(test_size=16).problems("train"))
    train = _write(tmp_path / "train.jsonl", task_pairs[:6])
    valid = _write(tmp_path / "valid.jsonl", task_pairs[6:])
    ref_rows = []
    logprobs = Learner.logprobs

    def counting(self, batch, which="current"):
        if which == "ref":
            ref_rows.extend(batch.texts)
        return logprobs(self, batch, which)

    monkeypatch.setattr(Learner, "logprobs", counting)
    # 6 pairs, 3 per step: 4 steps are 2 epochs; the held-out pairs are evaluated at steps 0, 2, 4.
    cfg = load_config(None, FAST + [f"data.path={train}", f"data.validation_path={valid}", "data.batch_size=3",
                                    "trainer.steps=4", "trainer.eval_every=2", "trainer.autocast=none"], cls=DPOConfig)
    dpo.train_dpo(cfg, output_dir=str(tmp_path / "run"), quiet=True)
    assert len(ref_rows) == 2 * 8  # each side of each pair once
    assert sorted(ref_rows) == sorted([p.chosen for p in task_pairs] + [p.rejected for p in task_pairs])
    trainer = trainers[0]
    for split, pairs in (("train", task_pairs[:6]), ("held_out", task_pairs[6:])):
        batch = trainer._batch(trainer.splits[split])
        fresh = dpo.pair_logps(logprobs(trainer.learner, batch, "ref"), batch)[0].double()
        assert torch.allclose(trainer.ref_logps[split], fresh, rtol=1e-5, atol=1e-5)


def test_a_short_run_learns_its_pairs(tmp_path):
    # synthetic:arithmetic: the preference loss over the training pairs falls well below log 2.
    # (Its held-out half needs arithmetic, which the 2-layer random model cannot learn in seconds.)
    fit = synthetic_arithmetic_pairs(32, 0, ArithmeticTask(test_size=16).problems("train"))
    cfg = load_config(None, FAST + ["data.synthetic_size=32", "data.validation_fraction=0",
                                    f"data.validation_path={_write(tmp_path / 'fit.jsonl', fit)}",
                                    "data.batch_size=16", "preference.beta=1.0", "trainer.steps=20"], cls=DPOConfig)
    s = dpo.train_dpo(cfg, output_dir=str(tmp_path / "fit"), quiet=True)
    assert s["eval_before"]["held_out_pref_loss"] == pytest.approx(math.log(2))
    assert s["eval_after"]["held_out_pref_loss"] < math.log(2) - 0.15
    assert s["eval_after"]["held_out_pref_accuracy"] >= 0.75
    # A preference that generalises (the answer over a non-answer) is learnt on prompts never trained on.
    pairs = [PreferencePair(p.prompt, p.chosen, "I am not sure.", None, p.source)
             for p in synthetic_arithmetic_pairs(300, 0, ArithmeticTask(test_size=16).problems("train"))]
    cfg = load_config(None, FAST + [f"data.path={_write(tmp_path / 'answer.jsonl', pairs)}", "data.batch_size=16",
                                    "data.validation_fraction=0.2", "trainer.steps=6"], cls=DPOConfig)
    s = dpo.train_dpo(cfg, output_dir=str(tmp_path / "answer"), quiet=True)
    assert s["eval_before"]["held_out_pref_accuracy"] == 0.0  # policy = reference: every reward is 0
    assert s["eval_after"]["held_out_pref_accuracy"] >= 0.9
    assert s["eval_after"]["held_out_pref_loss"] < 0.4


def test_resumes_exactly(tmp_path):
    overrides = FAST + ["data.batch_size=8", "trainer.steps=6", "trainer.checkpoint_every=1", "trainer.eval_every=2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    dpo.train_dpo(load_config(None, overrides, cls=DPOConfig), output_dir=str(straight), quiet=True)
    dpo.train_dpo(load_config(None, overrides, cls=DPOConfig), output_dir=str(split), quiet=True, stop_after=3)
    dpo.train_dpo(load_config(split / "config.yaml", cls=DPOConfig), output_dir=str(split), resume=True, quiet=True)

    def rows(d, name):
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "perf/"))}
                for line in (d / name).read_text().splitlines()]

    assert rows(straight, "metrics.jsonl") == rows(split, "metrics.jsonl") and len(rows(split, "metrics.jsonl")) == 6
    assert rows(straight, "eval.jsonl") == rows(split, "eval.jsonl")
    assert rows(straight, "metrics.jsonl")[0]["loss/preference"] == pytest.approx(math.log(2))  # policy = reference
    wa = load_file(straight / "checkpoints" / "step_6" / "model.safetensors")
    wb = load_file(split / "checkpoints" / "step_6" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # Another reference would not match the cached reference log-probs: refused, the run left as it was.
    config = (split / "config.yaml").read_text()
    with pytest.raises(ResumeError, match="caches reference log-probs"):
        dpo.train_dpo(load_config(split / "config.yaml", ["trainer.steps=7", f"preference.reference_model={straight}"],
                                  cls=DPOConfig), output_dir=str(split), resume=True, quiet=True)
    assert (split / "config.yaml").read_text() == config


@pytest.mark.parametrize("override, message", [
    ("data.path={tmp}/nope.jsonl", "nope.jsonl does not exist"),
    ("data.path={tmp}/bad.jsonl", "bad.jsonl:2: not valid JSON"),
    ("preference.loss=nope", "preference.loss must be one of"),
    ("preference.beta=0", "preference.beta must be > 0"),
    ("preference.reference_model={tmp}/missing", "does not exist"),
    ("data.path={tmp}/margin.jsonl preference.loss=ipo", "margin.jsonl:1: the pair has a 'margin'"),
])
def test_bad_input_is_an_input_error_before_any_model_loads(tmp_path, capsys, monkeypatch, override, message):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n{oops\n")
    (tmp_path / "margin.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b",
                                                       "margin": 1.0}) + "\n")

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("posttrain.models.loading.load_model_and_tokenizer", no_loading)
    out = tmp_path / "run"
    code = main(["dpo", "examples/dpo.yaml", "model.name=tiny-random", *override.format(tmp=tmp_path).split(),
                 "--output-dir", str(out)])
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_simpo_loads_no_reference(tmp_path, monkeypatch, trainers):
    def no_reference(self, batch, which="current"):
        assert which == "current"
        return logprobs(self, batch, which)

    logprobs = Learner.logprobs
    monkeypatch.setattr(Learner, "logprobs", no_reference)
    cfg = load_config(None, FAST + ["preference.loss=simpo", "data.batch_size=8", "trainer.steps=2"], cls=DPOConfig)
    s = dpo.train_dpo(cfg, output_dir=str(tmp_path / "simpo"), quiet=True)
    assert trainers[0].learner.ref is None
    assert 0.0 <= s["eval_after"]["held_out_pref_accuracy"] <= 1.0
    assert math.isfinite(s["eval_after"]["held_out_pref_loss"])
    rows = [json.loads(line) for line in (tmp_path / "simpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss/preference"]) and r["grad_norm"] > 0 for r in rows)


def test_pre_dpo_guides_with_another_model(tmp_path, trainers):
    first = tmp_path / "first"
    dpo.train_dpo(load_config(None, FAST + ["data.batch_size=8", "trainer.steps=2"], cls=DPOConfig),
                  output_dir=str(first), quiet=True)
    cfg = load_config(None, FAST + ["data.batch_size=8", "trainer.steps=1", f"preference.reference_model={first}"],
                      cls=DPOConfig)
    dpo.train_dpo(cfg, output_dir=str(tmp_path / "pre"), quiet=True)
    ref, policy = trainers[1].learner.ref, load_model_and_tokenizer("tiny-random")[0]
    guide = load_file(first / "checkpoints" / "step_2" / "model.safetensors")
    dtype = next(ref.parameters()).dtype
    shared = [k for k in ref.state_dict() if k in guide]
    assert len(shared) > 10 and all(torch.equal(ref.state_dict()[k], guide[k].to(dtype)) for k in shared)
    assert not all(torch.equal(p, policy.state_dict()[k].to(dtype)) for k, p in ref.state_dict().items())
    step1 = json.loads((tmp_path / "pre" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(step1["loss/preference"] - math.log(2)) > 1e-4  # the reference is not the initial policy


def test_example_config_loads_and_runs_a_step(tmp_path):
    cfg = load_config("examples/dpo.yaml", cls=DPOConfig)
    assert cfg.model.name == "smollm2-135m-instruct" and cfg.data.path == "synthetic:arithmetic"
    cfg = load_config("examples/dpo.yaml", ["model.name=tiny-random", "trainer.steps=1", "trainer.eval_problems=4",
                                            "rollout.max_new_tokens=2", "trainer.threads=1"], cls=DPOConfig)
    s = dpo.train_dpo(cfg, output_dir=str(tmp_path / "example"), quiet=True)
    assert s["steps"] == 1 and s["eval_after"]["held_out_pref_accuracy"] >= 0.0
