"""SFT: the loss is the NLL of completion tokens only (checked against a direct forward pass),
micro-batching does not change the gradient, bad data fails before training, runs resume exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file

from posttrain.cli import main
from posttrain.config import TrainerConfig, load_config, ModelConfig, SFTConfig
from posttrain.models.loading import load_model_and_tokenizer
from posttrain.tasks.base import Problem
from posttrain.trainers.learner import Learner
from posttrain.trainers.sft import completion_nll, train_sft
from posttrain.trainers.sft_data import Demonstration, DemonstrationError, collate, encode, from_task, read_jsonl

DEMOS = [Demonstration(Problem("a", "What is 2+2?"), "4", "a"),
         Demonstration(Problem("b", [{"role": "user", "content": "Say hi"}]), "hi there, friend", "b"),
         Demonstration(Problem("c", "x"), "a much longer completion than the others", "c")]


def _learner(model, micro_batch_size=16):
    return Learner(model, TrainerConfig(micro_batch_size=micro_batch_size, autocast="none"), ModelConfig(),
                   temperature=1.0, device=torch.device("cpu"), sampler_dtype=torch.float32)


def test_loss_is_the_nll_of_completion_tokens_only():
    model, tok = load_model_and_tokenizer("tiny-random")
    encoded = encode(tok, DEMOS, chat_template=True, max_length=512)
    batch = collate(encoded, DEMOS)
    learner = _learner(model)
    logp = learner.logprobs(batch)
    loss = completion_nll(logp, batch.completion_mask, float(batch.completion_mask.sum()))
    # By hand: run each prompt + completion through the model, log-softmax, and average
    # -log p over the completion positions only (prompt tokens never enter the sum).
    nll, count = 0.0, 0
    with torch.no_grad():
        for prompt, completion in encoded:
            ids = torch.tensor([prompt + completion])
            logits = model(ids).logits.double().log_softmax(-1)[0]
            for j, token in enumerate(completion):
                nll -= float(logits[len(prompt) + j - 1, token])
                count += 1
    assert count == int(batch.completion_mask.sum())
    assert completion[-1] == tok.eos_token_id  # every completion is taught to end
    assert float(loss) == pytest.approx(nll / count, rel=1e-4)


def test_micro_batching_does_not_change_the_gradient():
    grads = []
    for mbs in (1, 16):
        model, tok = load_model_and_tokenizer("tiny-random")
        batch = collate(encode(tok, DEMOS, True, 512), DEMOS)
        learner = _learner(model, mbs)
        n = float(batch.completion_mask.sum())
        learner.forward_backward(batch, lambda micro, logp, _: completion_nll(logp, micro.completion_mask, n))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_jsonl_formats_and_errors(tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n\n" + json.dumps(
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}]}) + "\n")
    demos = read_jsonl(good)
    assert [d.completion for d in demos] == ["c", "a"]
    assert demos[1].problem.prompt == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    cases = {
        "not json": "d.jsonl:1: not JSON",
        json.dumps({"prompt": "p"}): "needs 'prompt' and 'completion', or 'messages'",
        json.dumps({"prompt": "p", "completion": " "}): "completion is empty",
        json.dumps({"messages": [{"role": "user", "content": "u"}]}): "must end with the assistant's turn",
    }
    for line, message in cases.items():
        bad = tmp_path / "d.jsonl"
        bad.write_text(line + "\n")
        with pytest.raises(DemonstrationError, match=message):
            read_jsonl(bad)
    with pytest.raises(DemonstrationError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(DemonstrationError, match="has no 'solution'"):
        from_task([Problem("p1", "q", answer="1")], "solution")
    _, tok = load_model_and_tokenizer("tiny-random")
    with pytest.raises(DemonstrationError, match="exceed data.max_length=8"):
        encode(tok, DEMOS, True, max_length=8)


FAST = ["model.name=tiny-random", "trainer.lr=3e-3", "data.batch_size=8", "trainer.eval_problems=8",
        "task.test_size=16", "trainer.threads=1", "rollout.max_new_tokens=4"]


def test_sft_lowers_the_held_out_nll_and_resumes_exactly(tmp_path):
    overrides = FAST + ["trainer.steps=6", "trainer.checkpoint_every=1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    summary = train_sft(load_config(None, overrides, cls=SFTConfig), output_dir=str(straight), quiet=True)
    assert summary["eval_after"]["held_out_nll"] < summary["eval_before"]["held_out_nll"] - 0.5
    train_sft(load_config(None, overrides, cls=SFTConfig), output_dir=str(split), quiet=True, stop_after=3)
    train_sft(load_config(split / "config.yaml", cls=SFTConfig), output_dir=str(split), resume=True, quiet=True)
    rows = [[json.loads(line)["loss/nll"] for line in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (straight, split)]
    assert rows[0] == rows[1] and len(rows[0]) == 6
    wa = load_file(straight / "checkpoints" / "step_6" / "model.safetensors")
    wb = load_file(split / "checkpoints" / "step_6" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sft_output_is_a_model_for_the_next_stage(tmp_path):
    train_sft(load_config(None, FAST + ["trainer.steps=1"], cls=SFTConfig), output_dir=str(tmp_path / "sft"),
              quiet=True)
    cfg = load_config(None, FAST[1:] + [f"model.name={tmp_path / 'sft'}", "trainer.steps=1"], cls=SFTConfig)
    assert train_sft(cfg, output_dir=str(tmp_path / "again"), quiet=True)["steps"] == 1


def test_cli_bad_data_is_an_input_error_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["sft", "examples/sft.yaml", "model.name=tiny-random", f"data.path={tmp_path / 'nope.jsonl'}",
                 "--output-dir", str(out)])
    assert code == 2 and "nope.jsonl does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_a_non_finite_step_is_skipped_and_too_many_in_a_row_stop_the_run():
    from posttrain.trainers.rl_update import NonFiniteLossError, step_or_skip

    class Stub:
        zeroed = stepped = 0

        def zero_grad(self):
            self.zeroed += 1

        def optim_step(self, lr_scale):
            self.stepped += 1
            return {"lr": lr_scale}

    tc, learner = TrainerConfig(max_nonfinite_steps=2, steps=10), Stub()
    assert step_or_skip(learner, 1.0, 0.5, 1, 0, tc) == ({"lr": 1.0}, 0)  # a finite step resets the streak
    assert step_or_skip(learner, float("nan"), 0.5, 0, 1, tc) == ({"nonfinite_skipped": 1.0}, 1)
    assert (learner.zeroed, learner.stepped) == (1, 1)  # the bad gradients were dropped, no step taken
    with pytest.raises(NonFiniteLossError, match="2 consecutive non-finite"):
        step_or_skip(learner, 1.0, float("inf"), 1, 2, tc)
