"""One prompt pass per mini-batch shared by its micro-batches gives the gradients of separate passes."""

import pytest
import torch

from posttrain.models.logprobs import SharedPromptPass, completion_logprobs
from posttrain.models.tiny import tiny_model_and_tokenizer
from posttrain.rollout.engine import HFRolloutEngine, SamplingParams
from posttrain.tasks.base import Problem


@pytest.mark.parametrize("checkpoint_layers", [True, False])
def test_shared_pass_across_micro_batches_equals_per_row_computation(checkpoint_layers):
    model, tok = tiny_model_and_tokenizer()
    problems = [Problem(id=f"p{i}", prompt=f"What is {i} + {i * 7}? " + "x" * i, answer="0") for i in range(3)]
    r = HFRolloutEngine(model, tok, dtype=torch.float32).generate(
        problems, 4, SamplingParams(max_new_tokens=7), torch.Generator().manual_seed(0))
    weights = torch.randn(r.completion_ids.shape, generator=torch.Generator().manual_seed(1))

    def grads():
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    # reference: every row separately through the whole decoder
    model.zero_grad()
    lp, _ = completion_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask,
                                share_prompts=False)
    (lp * weights).sum().backward()
    ref_lp, ref_grads = lp.detach(), grads()

    # shared prompt pass, micro-batches that split every prompt group
    model.zero_grad()
    shared = SharedPromptPass(model, r.prompt_ids, r.prompt_mask, "auto",
                              checkpoint_layers=checkpoint_layers)
    got = torch.zeros_like(ref_lp)
    for rows in (torch.tensor([0, 5, 9, 10]), torch.tensor([1, 2, 3, 4, 6]), torch.tensor([7, 8, 11])):
        T = int(r.completion_mask[rows].sum(-1).max())
        lp, _ = completion_logprobs(model, r.prompt_ids[rows], r.prompt_mask[rows], r.completion_ids[rows, :T],
                                    r.completion_mask[rows, :T], prompt_states=shared.rows(rows))
        (lp * weights[rows, :T]).sum().backward()
        got[rows, :T] = lp.detach()
    shared.backward()
    assert torch.allclose(got, ref_lp, atol=1e-5)
    assert torch.allclose(grads(), ref_grads, atol=1e-5)
    # the prompt pass reached the embedding: without shared.backward() the gradient would differ
    assert ref_grads.abs().sum() > 0


@pytest.mark.parametrize("micro_batch_size, checkpointed", [(64, False), (3, True)])
def test_learner_recomputes_the_prompt_pass_only_across_several_micro_batches(monkeypatch, micro_batch_size,
                                                                              checkpointed):
    import posttrain.trainers.learner as learner_module
    from posttrain.config import load_config

    cfg = load_config(None, [f"trainer.micro_batch_size={micro_batch_size}", "trainer.autocast=none"])
    model, tok = tiny_model_and_tokenizer()
    problems = [Problem(id=f"p{i}", prompt=f"What is {i} + {i * 7}?", answer="0") for i in range(2)]
    batch = HFRolloutEngine(model, tok, dtype=torch.float32).generate(
        problems, 4, SamplingParams(max_new_tokens=5), torch.Generator().manual_seed(0))
    learner = learner_module.Learner(model, cfg.trainer, cfg.model, temperature=1.0, device=torch.device("cpu"),
                                     sampler_dtype=torch.float32)
    seen = []

    class Recording(SharedPromptPass):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs["checkpoint_layers"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(learner_module, "SharedPromptPass", Recording)
    learner.forward_backward(batch, lambda micro, logp, _: logp.sum())
    assert seen == [checkpointed]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.policy.parameters())
