"""The fused output-projection + log-softmax autograd function against plain autograd on full logits."""

import math

import pytest
import torch

import posttrain.models.logprobs as logprobs_module
from posttrain.models.logprobs import TokenLogProbs


def reference(hidden, weight, bias, targets, temperature):
    logits = torch.nn.functional.linear(hidden, weight, bias) / temperature
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def inputs(seed, M=37, H=12, V=50, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(M, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, V, (M,), generator=g)
    return hidden, weight, b, targets


def _gradient_probe(hidden, weight, b, with_entropy):
    """run(fn) -> (log-probs, entropies, grads wrt hidden, weight[, bias]) of the loss
    sum(lp * g_logp) + sum(ent * g_ent) (the entropy term only ``with_entropy``), fixed random
    cotangents, so two implementations are compared on the same loss."""
    g = torch.Generator().manual_seed(1)
    g_logp = torch.randn(hidden.shape[0], generator=g, dtype=torch.float64)
    g_ent = torch.randn(hidden.shape[0], generator=g, dtype=torch.float64)
    leaves = [hidden, weight] + ([b] if b is not None else [])

    def run(fn):
        xs = [x.clone().requires_grad_() for x in leaves]
        lp, ent = fn(xs[0], xs[1], xs[2] if b is not None else None)
        loss = (lp * g_logp).sum() + ((ent * g_ent).sum() if with_entropy else 0.0)
        return lp.detach(), ent.detach(), torch.autograd.grad(loss, xs)

    return run


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("chunk", [1, 8, 1000])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("save_logits", [True, False])
def test_values_and_gradients_match_full_logits(temperature, with_entropy, chunk, bias, save_logits, monkeypatch):
    if not save_logits:  # the backward recomputes the logits instead of reading saved ones
        monkeypatch.setattr("posttrain.models.logprobs.SAVED_LOGITS_MAX_BYTES", 0)
    monkeypatch.setattr("posttrain.models.logprobs.ELEMENTWISE_ROWS", 5)  # softmax blocks inside each chunk
    hidden, weight, b, targets = inputs(0, bias=bias)
    run = _gradient_probe(hidden, weight, b, with_entropy)

    lp, ent, grads = run(lambda h, w, bb: TokenLogProbs.apply(h, w, bb, targets, temperature, chunk, with_entropy))
    ref_lp, ref_ent, ref_grads = run(lambda h, w, bb: reference(h, w, bb, targets, temperature))
    # the fused function keeps fp32 logits, so compare at fp32 precision
    assert torch.allclose(lp.double(), ref_lp, atol=1e-5)
    if with_entropy:
        assert torch.allclose(ent.double(), ref_ent, atol=1e-5)
    else:
        assert torch.count_nonzero(ent) == 0
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got.double(), want, atol=1e-5), (got - want).abs().max()


def test_two_token_example_by_hand():
    # V = 2, H = 1, W = [[1], [-1]], h = 0.5, target 0: z = (0.5, -0.5), p0 = 1/(1+e^-1)
    hidden = torch.tensor([[0.5]], dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([[1.0], [-1.0]], dtype=torch.float64, requires_grad=True)
    lp, _ = TokenLogProbs.apply(hidden, weight, None, torch.tensor([0]), 1.0, 4, False)
    p0 = 1 / (1 + torch.exp(torch.tensor(-1.0, dtype=torch.float64)))
    assert torch.allclose(lp.double(), torch.log(p0)[None], atol=1e-6)
    lp.sum().backward()
    # d logp0 / dz = (1 - p0, -p1);  dz/dh = W  ->  dh = (1 - p0) * 1 + (-(1 - p0)) * (-1) = 2 (1 - p0)
    assert torch.allclose(hidden.grad, 2 * (1 - p0).reshape(1, 1), atol=1e-6)
    # dW_j = dz_j * h
    assert torch.allclose(weight.grad, torch.stack([(1 - p0) * 0.5, -(1 - p0) * 0.5]).reshape(2, 1), atol=1e-6)


def test_bf16_autocast_stays_close_to_fp32():
    hidden, weight, _, targets = inputs(3, M=64, H=32, V=300)
    hidden, weight = hidden.float(), weight.float()
    w32 = weight.clone().requires_grad_()
    lp32, _ = TokenLogProbs.apply(hidden, w32, None, targets, 1.0, 16, False)
    lp32.sum().backward()
    w16 = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp16, _ = TokenLogProbs.apply(hidden, w16, None, targets, 1.0, 16, False)
    lp16.sum().backward()
    assert lp16.dtype == torch.float32 and w16.grad.dtype == torch.float32
    assert (lp16 - lp32).abs().max() < 0.1
    assert torch.nn.functional.cosine_similarity(w16.grad.flatten(), w32.grad.flatten(), dim=0) > 0.99


def test_empty_batch():
    hidden = torch.zeros(0, 4, requires_grad=True)
    weight = torch.randn(10, 4, requires_grad=True)
    lp, ent = TokenLogProbs.apply(hidden, weight, None, torch.zeros(0, dtype=torch.long), 1.0, 8, True)
    assert lp.shape == (0,) and ent.shape == (0,)
    lp.sum().backward()
    assert torch.count_nonzero(weight.grad) == 0



def test_logits_are_saved_only_when_a_gradient_is_needed_and_they_fit(monkeypatch):
    hidden, weight, _, targets = inputs(5, M=6, H=4, V=10)
    w = weight.clone().requires_grad_()
    lp, _ = TokenLogProbs.apply(hidden, w, None, targets, 1.0, 4, False)
    assert lp.grad_fn.saved_tensors[-1].shape == (6, 10)
    lp, _ = TokenLogProbs.apply(hidden, weight, None, targets, 1.0, 4, False)  # no gradient wanted
    assert lp.grad_fn is None
    monkeypatch.setattr(logprobs_module, "SAVED_LOGITS_MAX_BYTES", 6 * 10 * 8 - 1)
    lp, _ = TokenLogProbs.apply(hidden, w, None, targets, 1.0, 4, False)
    assert lp.grad_fn.saved_tensors[-1] is None


def test_the_saved_logits_buffer_takes_the_logit_gradient_so_a_second_backward_refuses():
    hidden, weight, _, targets = inputs(6, M=6, H=4, V=10)
    w = weight.clone().requires_grad_()
    lp, _ = TokenLogProbs.apply(hidden, w, None, targets, 1.0, 4, False)
    lp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        lp.sum().backward()


# ---------------------------------------------------------------- SIREN's nucleus (top-p) entropy
def nucleus_reference(hidden, weight, bias, temperature, top_p):
    """H^S on materialised float64 logits by plain autograd: S = the most likely tokens whose
    cumulative probability stays < p (the crossing token left out), the mask held fixed."""
    logits = torch.nn.functional.linear(hidden, weight, bias) / temperature
    probs = torch.softmax(logits.detach(), -1)
    ordered, order = probs.sort(-1, descending=True)
    cum = ordered.cumsum(-1)
    mask = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, cum < top_p)
    empty = ~mask.any(-1, keepdim=True)
    mask_or_all = mask | empty  # an empty row is computed on all tokens, then zeroed
    lse = torch.logsumexp(logits.masked_fill(~mask_or_all, float("-inf")), -1, keepdim=True)
    q = torch.exp(logits - lse) * mask_or_all
    entropy = (lse - (q * logits).sum(-1, keepdim=True)) * (~empty)
    return entropy.squeeze(-1), cum, empty.squeeze(-1), mask.sum(-1)


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.8, 0.95])
@pytest.mark.parametrize("candidates", [4, 256])  # 4: most rows' nuclei are wider, sorted whole
@pytest.mark.parametrize("chunk, bias, save_logits, temperature", [
    (1000, False, True, 1.0), (8, True, False, 0.6), (1, False, False, 1.0)])
def test_nucleus_entropy_values_and_gradients_match_autograd(top_p, candidates, chunk, bias, save_logits,
                                                             temperature, monkeypatch):
    if not save_logits:
        monkeypatch.setattr("posttrain.models.logprobs.SAVED_LOGITS_MAX_BYTES", 0)
    monkeypatch.setattr("posttrain.models.logprobs.ELEMENTWISE_ROWS", 5)
    monkeypatch.setattr("posttrain.models.logprobs.NUCLEUS_CANDIDATES", candidates)
    hidden, weight, b, targets = inputs(0, M=60, bias=bias)
    weight = weight * 1.5  # peaked enough that some rows' top token alone reaches p
    run = _gradient_probe(hidden, weight, b, with_entropy=True)

    lp, ent, grads = run(lambda h, w, bb: TokenLogProbs.apply(h, w, bb, targets, temperature, chunk, True, False,
                                                              top_p))
    ref_ent, cum, empty, size = nucleus_reference(hidden, weight, b, temperature, top_p)
    # the kernel's fp32 cumulative sums must not sit on the cut, or fp32 and fp64 could pick differently
    assert (cum - top_p).abs().min() > 1e-5  # fp32 error of a 50-term sum: ~3e-6
    ref_lp, _, ref_grads = run(lambda h, w, bb: (reference(h, w, bb, targets, temperature)[0],
                                                 nucleus_reference(h, w, bb, temperature, top_p)[0]))
    assert torch.allclose(lp.double(), ref_lp, atol=1e-5)
    assert torch.allclose(ent.double(), ref_ent, atol=1e-5), (ent.double() - ref_ent).abs().max()
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got.double(), want, atol=1e-5), (got - want).abs().max()
    assert torch.all(ent[empty] == 0)
    full = reference(hidden, weight, b, targets, temperature)[1]
    assert torch.all(ent.double() < full)  # a renormalised nucleus is narrower than the full vocabulary
    if top_p >= 0.5:  # both kinds of row are there: an empty nucleus (top token >= p) and a wide one
        assert empty.any() and (size >= 2).any()
    if candidates == 4 and top_p > 0.5:  # and rows whose nucleus is past the candidates (sorted whole)
        assert (size > candidates).any()


def test_nucleus_entropy_on_four_tokens_by_hand():
    """p = (0.5, 0.3, 0.15, 0.05): cumulative 0.5, 0.8, 0.95, 1. W = I, so dL/dh = dL/dz."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64)

    def nucleus(top_p):
        h = probs.log()[None].clone().requires_grad_()
        lp, ent = TokenLogProbs.apply(h, eye, None, torch.tensor([2]), 1.0, 4, True, False, top_p)
        ent.sum().backward()
        return ent.item(), h.grad[0]

    # p = 0.9: {0.5, 0.3} (0.95 crosses 0.9 and is left out), q = (5/8, 3/8)
    h_s, grad = nucleus(0.9)
    q0, q1 = 5 / 8, 3 / 8
    want_h = -(q0 * math.log(q0) + q1 * math.log(q1))  # 0.661563
    assert h_s == pytest.approx(want_h, abs=1e-6)
    want = [-q0 * (math.log(q0) + want_h), -q1 * (math.log(q1) + want_h), 0.0, 0.0]  # -0.119724, +0.119724
    assert torch.allclose(grad, torch.tensor(want, dtype=torch.float64), atol=1e-6)
    # p = 0.97: {0.5, 0.3, 0.15}, q = (10, 6, 3) / 19
    h_s, grad = nucleus(0.97)
    q = [10 / 19, 6 / 19, 3 / 19]
    want_h = -sum(x * math.log(x) for x in q)
    assert h_s == pytest.approx(want_h, abs=1e-6)
    assert torch.allclose(grad, torch.tensor([-x * (math.log(x) + want_h) for x in q] + [0.0], dtype=torch.float64),
                          atol=1e-6)
    # p = 0.6: the official code's cut keeps only 0.5 (0.8 crosses): one token, entropy 0 and no
    # gradient; a sampling nucleus would have kept {0.5, 0.3}
    h_s, grad = nucleus(0.6)
    assert h_s == 0.0 and torch.count_nonzero(grad) == 0
    # p = 0.4: the top token alone reaches p, an empty nucleus: 0, no gradient
    h_s, grad = nucleus(0.4)
    assert h_s == 0.0 and torch.count_nonzero(grad) == 0


def test_nucleus_keeps_no_vocabulary_sized_state():
    hidden, weight, _, targets = inputs(7, M=6, H=4, V=10)
    w = weight.clone().requires_grad_()
    lp, ent = TokenLogProbs.apply(hidden, w, None, targets, 1.0, 4, True, False, 0.8)
    saved = lp.grad_fn.saved_tensors
    assert [t.shape for t in saved[6:9]] == [(6,), (6,), (6,)]  # max logit, cut-off, log-normaliser
    assert saved[-1].shape == (6, 10)  # only the low-precision logits, as without top-p


@pytest.mark.parametrize("top_p, with_entropy", [(1.0, True), (0.0, True), (float("nan"), True), (0.8, False)])
def test_nucleus_bad_top_p_is_refused(top_p, with_entropy):
    hidden, weight, _, targets = inputs(8, M=3, H=4, V=10)
    with pytest.raises(ValueError, match="entropy_top_p"):
        TokenLogProbs.apply(hidden, weight, None, targets, 1.0, 4, with_entropy, False, top_p)
