"""The f-divergence SFT losses (algorithms/sft_losses.py, catalog 004-48): values and gradients
against numbers worked by hand, the nll option unchanged, the start-of-run gradients (u = 1),
config errors, and a run that trains on one of them and resumes exactly."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from posttrain.algorithms.sft_losses import SFT_LOSSES, needs_reference, token_losses
from posttrain.cli import main
from posttrain.config import ConfigError, EIConfig, ModelConfig, SFTConfig, TrainerConfig, load_config
from posttrain.models.loading import load_model_and_tokenizer
from posttrain.tasks.base import Problem
from posttrain.trainers.learner import Learner
from posttrain.trainers.sft import completion_loss, completion_nll, train_sft
from posttrain.trainers.sft_data import Demonstration, collate, encode

# Two tokens: pi_theta = 0.5 where pi_ref = 0.25 (u = 2), and pi_theta = 0.2 where pi_ref = 0.4 (u = 1/2).
LOGP = torch.tensor([math.log(0.5), math.log(0.2)], dtype=torch.float64)
REF = torch.tensor([math.log(0.25), math.log(0.4)], dtype=torch.float64)
# l_t and dl_t / dlog pi_theta, by hand from the formulas in the module docstring:
#   nll        -log p                 : 0.693147, 1.609438          ; grad -1, -1
#   forward_kl 1/u                    : 1/2, 2                      ; grad -1/u = -1/2, -2
#   js         -log(2u/(1+u))         : -log(4/3), -log(2/3)        ; grad -1/(1+u) = -1/3, -2/3
#   alpha 0.5  (u^-0.5 - 1)/0.5       : 2(0.707107-1), 2(1.414214-1); grad -u^-0.5 = -0.707107, -1.414214
BY_HAND = {
    "nll": ([0.6931471806, 1.6094379124], [-1.0, -1.0]),
    "forward_kl": ([0.5, 2.0], [-0.5, -2.0]),
    "js": ([-0.2876820725, 0.4054651081], [-1 / 3, -2 / 3]),
    "alpha": ([-0.5857864376, 0.8284271247], [-0.7071067812, -1.4142135624]),
}


@pytest.mark.parametrize("name", sorted(BY_HAND))
def test_token_losses_and_gradients_match_hand_values(name):
    logp = LOGP.clone().requires_grad_(True)
    loss = token_losses(name, logp, REF, alpha=0.5)
    loss.sum().backward()
    values, grads = BY_HAND[name]
    assert loss.detach().tolist() == pytest.approx(values, abs=1e-9)
    assert logp.grad.tolist() == pytest.approx(grads, abs=1e-9)


def test_registry_and_reference_needs():
    assert SFT_LOSSES.names() == ["alpha", "forward_kl", "js", "nll"]
    assert not needs_reference("nll") and all(needs_reference(n) for n in ("forward_kl", "js", "alpha"))
    with pytest.raises(ValueError, match="needs the reference model's token log-probs"):
        token_losses("js", LOGP, None)
    with pytest.raises(ValueError, match="0 < alpha < 1"):
        token_losses("alpha", LOGP, REF, alpha=1.0)
    # alpha -> 0 is the NLL's gradient, alpha -> 1 forward_kl's (the loss up to a constant)
    for a, target in ((1e-6, "nll"), (1 - 1e-6, "forward_kl")):
        logp = LOGP.clone().requires_grad_(True)
        token_losses("alpha", logp, REF, alpha=a).sum().backward()
        assert logp.grad.tolist() == pytest.approx(BY_HAND[target][1], rel=1e-5)


def test_masked_token_mean_by_hand_and_nll_unchanged():
    # [2, 3] with the last token of row 1 masked; a padded position holds a huge log-ratio (its
    # exp is inf), which must not turn the masked sum into NaN.
    logp = torch.tensor([[math.log(0.5), math.log(0.2), math.log(0.1)], [math.log(0.5), 0.0, -200.0]])
    ref = torch.tensor([[math.log(0.25), math.log(0.4), math.log(0.1)], [math.log(0.5), 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # forward_kl: 1/u per token = 0.5, 2, 1, 1, 1 (u = 1 where p = ref) -> 5.5 / 5
    assert float(completion_loss("forward_kl", logp, mask, 5.0, ref)) == pytest.approx(5.5 / 5, rel=1e-6)
    # nll: (0.693147 + 1.609438 + 2.302585 + 0.693147 + 0) / 5, the same as completion_nll
    expected = (math.log(2) + math.log(5) + math.log(10) + math.log(2)) / 5
    assert float(completion_loss("nll", logp, mask, 5.0)) == pytest.approx(expected, rel=1e-6)
    assert torch.equal(completion_loss("nll", logp, mask, 5.0), completion_nll(logp, mask, 5.0))


DEMOS = [Demonstration(Problem("a", "What is 2+2?"), "4", "a"),
         Demonstration(Problem("b", [{"role": "user", "content": "Say hi"}]), "hi there, friend", "b"),
         Demonstration(Problem("c", "x"), "a much longer completion than the others", "c")]


def _grad(name: str, micro_batch_size: int = 16) -> torch.Tensor:
    model, tok = load_model_and_tokenizer("tiny-random")
    batch = collate(encode(tok, DEMOS, True, 512), DEMOS)
    learner = Learner(model, TrainerConfig(micro_batch_size=micro_batch_size, autocast="none"), ModelConfig(),
                      temperature=1.0, device=torch.device("cpu"), sampler_dtype=torch.float32, reference=True)
    batch.ref_logprobs = learner.logprobs(batch, "ref")
    n = float(batch.completion_mask.sum())
    learner.forward_backward(batch, lambda micro, logp, _: completion_loss(name, logp, micro.completion_mask, n,
                                                                           micro.ref_logprobs, 0.5))
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_at_the_start_the_gradient_is_the_nll_one_scaled():
    # u = 1 at the starting policy: dl/dlogp is -1 for nll, forward_kl and alpha, -1/2 for js
    nll = _grad("nll")
    assert torch.allclose(_grad("forward_kl"), nll, rtol=1e-4, atol=1e-7)
    assert torch.allclose(_grad("alpha", micro_batch_size=1), nll, rtol=1e-4, atol=1e-7)
    assert torch.allclose(_grad("js"), nll / 2, rtol=1e-4, atol=1e-7)


def test_config_errors_name_the_choices(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"sft.loss must be one of \['alpha', 'forward_kl', 'js', 'nll'\]"):
        load_config(None, ["sft.loss=kl"], cls=SFTConfig)
    with pytest.raises(ConfigError, match=r"sft.alpha must be in \(0, 1\)"):
        load_config(None, ["sft.alpha=1.5"], cls=SFTConfig)
    with pytest.raises(ConfigError, match="data.length_bucketing is not supported by posttrain ei"):
        load_config(None, ["data.length_bucketing=true"], cls=EIConfig)
    out = tmp_path / "run"
    assert main(["sft", "examples/sft.yaml", "model.name=tiny-random", "sft.loss=chi2", "--output-dir", str(out)]) == 2
    assert "sft.loss must be one of" in capsys.readouterr().err and not out.exists()


FAST = ["model.name=tiny-random", "trainer.lr=3e-3", "data.batch_size=8", "trainer.eval_problems=4",
        "task.test_size=16", "trainer.threads=1", "rollout.max_new_tokens=4"]


def test_js_run_trains_logs_both_losses_and_resumes_exactly(tmp_path):
    overrides = FAST + ["sft.loss=js", "trainer.steps=4", "trainer.checkpoint_every=1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    summary = train_sft(load_config(None, overrides, cls=SFTConfig), output_dir=str(straight), quiet=True)
    assert summary["eval_after"]["held_out_nll"] < summary["eval_before"]["held_out_nll"] - 0.3
    train_sft(load_config(None, overrides, cls=SFTConfig), output_dir=str(split), quiet=True, stop_after=2)
    train_sft(load_config(split / "config.yaml", cls=SFTConfig), output_dir=str(split), resume=True, quiet=True)
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (straight, split)]
    # step 1: the policy is its own reference (u = 1), so js's loss -log(2u/(1+u)) is 0
    assert rows[0][0]["loss/sft"] == pytest.approx(0.0, abs=1e-5) and rows[0][0]["loss/nll"] > 1.0
    assert rows[0][-1]["loss/sft"] < -0.05  # the policy moved above the reference on its demonstrations
    assert [r["loss/sft"] for r in rows[0]] == [r["loss/sft"] for r in rows[1]] and len(rows[0]) == 4
    wa = load_file(straight / "checkpoints" / "step_4" / "model.safetensors")
    wb = load_file(split / "checkpoints" / "step_4" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
