"""The lean decoder's elementwise kernels (models/fused.py): by hand, against autograd, and compiled
against eager."""

import math

import pytest
import torch

from posttrain.models import fused


@pytest.fixture
def compile_everything(monkeypatch):
    """Every call of a fused function outside autograd takes the compiled path."""
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 0)
    monkeypatch.setenv(fused.ENV, "1")
    fused.compiled_enabled.cache_clear()
    yield
    fused.compiled_enabled.cache_clear()


# ------------------------------------------------------------------------ by hand
def test_rope_and_its_backward_by_hand():
    # D = 4: pairs (t0, t2) at angle pi/2 (cos 0, sin 1) and (t1, t3) at angle 0 (cos 1, sin 0)
    t = torch.tensor([1.0, 2.0, 3.0, 4.0])
    cos, sin = torch.tensor([0.0, 1.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    # y = t cos + (-t2, -t3, t0, t1) sin = (-3, 2, 1, 4)
    assert torch.equal(fused.rope(t, cos, sin), torch.tensor([-3.0, 2.0, 1.0, 4.0]))
    # y0 = t0 cos0 - t2 sin0, so dy0/dt = (0, 0, -1, 0)
    grad = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert torch.equal(fused.rope_backward(grad, cos, sin), torch.tensor([0.0, 0.0, -1.0, 0.0]))


def test_silu_mul_backward_by_hand():
    g, u, da = torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0]), torch.tensor([1.0, 2.0])
    a, dg, du = fused.silu_mul_backward(da, g, u)
    s = 1 / (1 + math.exp(-1))  # sigmoid(1) = 0.731059
    # g = 0: silu 0, silu' 1/2;  g = 1: silu s, silu' s (1 + (1 - s)) = 0.927671
    assert torch.allclose(a, torch.tensor([0.0, 3 * s]))
    assert torch.allclose(du, torch.tensor([0.0, 2 * s]))
    assert torch.allclose(dg, torch.tensor([1 * 2 * 0.5, 2 * 3 * s * (2 - s)]))
    assert torch.allclose(fused.silu_mul(g, u), a)


def test_masked_softmax_and_its_backward_by_hand():
    # scale 2 on scores (0, ln(3) / 2): logits (0, ln 3), p = (1/4, 3/4); a masked key gets 0
    scores = torch.tensor([[0.0, math.log(3) / 2], [0.0, math.log(3) / 2]])
    mask = torch.tensor([[0.0, 0.0], [0.0, torch.finfo(torch.float32).min]])
    p = fused.masked_softmax(scores, mask, 2.0)
    assert torch.allclose(p, torch.tensor([[0.25, 0.75], [1.0, 0.0]]))
    # dp = (1, 0): sum(dp p) = 1/4, ds = 2 p (dp - 1/4) = (0.375, -0.375); the lone key gets 0
    ds = fused.masked_softmax_backward(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), p, 2.0)
    assert torch.allclose(ds, torch.tensor([[0.375, -0.375], [0.0, 0.0]]))


# ------------------------------------------------------------------------ backward = autograd
def test_every_backward_is_the_gradient_of_its_forward():
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731

    x, w, dy = rand(3, 5, 8).requires_grad_(), rand(8).requires_grad_(), rand(3, 5, 8)
    y = w * (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6))  # the formula, differentiable
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    with torch.no_grad():
        mine_y, rstd = fused.rms_norm(x, w, 1e-6)
    torch.testing.assert_close(mine_y, y.detach())
    mine = fused.rms_norm_backward(dy, x.detach(), w.detach(), rstd.detach())
    torch.testing.assert_close(mine, (dx, dw))

    gate, up, da = rand(4, 6).requires_grad_(), rand(4, 6).requires_grad_(), rand(4, 6)
    dg, du = torch.autograd.grad(fused.silu_mul(gate, up), (gate, up), da)
    a, my_dg, my_du = fused.silu_mul_backward(da, gate.detach(), up.detach())
    torch.testing.assert_close((my_dg, my_du), (dg, du))
    torch.testing.assert_close(a, fused.silu_mul(gate, up).detach())

    t, angle, dt = rand(2, 3, 4, 8).requires_grad_(), rand(3, 1, 4), rand(2, 3, 4, 8)
    cos, sin = angle.cos().repeat(1, 1, 2), angle.sin().repeat(1, 1, 2)
    (expected,) = torch.autograd.grad(fused.rope(t, cos, sin), t, dt)
    torch.testing.assert_close(fused.rope_backward(dt, cos, sin), expected)
    assert torch.autograd.gradcheck(fused.RopeFn.apply, (t, cos, sin))

    scores, dp = rand(2, 3, 4, 5).requires_grad_(), rand(2, 3, 4, 5)
    mask = torch.zeros(2, 1, 4, 5, dtype=torch.float64).masked_fill_(torch.rand(2, 1, 4, 5, generator=g) < 0.3, -1e9)
    p = fused.masked_softmax(scores, mask, 0.7)
    (expected,) = torch.autograd.grad(p, scores, dp)
    torch.testing.assert_close(fused.masked_softmax_backward(dp, p.detach(), 0.7), expected)


# ------------------------------------------------------------------------ compiled = eager
@torch.no_grad()  # as inside an autograd function; with grad mode on, calls stay eager
def test_compiled_kernels_agree_with_eager_in_bf16(compile_everything):
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(torch.bfloat16)  # noqa: E731
    x, w, dy = rand(64, 96), rand(96), rand(64, 96)
    rstd = fused.rms_norm.eager(x, w, 1e-5)[1]
    gate, up = rand(64, 160), rand(64, 160)
    angle = torch.randn(64, 1, 8, generator=g)
    cos, sin = angle.cos().repeat(1, 1, 2), angle.sin().repeat(1, 1, 2)
    scores = rand(2, 3, 2, 8, 16)
    mask = torch.zeros(2, 1, 1, 8, 16, dtype=torch.bfloat16)
    mask[..., 12:] = torch.finfo(torch.bfloat16).min
    cases = [(fused.rms_norm, (x, w, 1e-5)), (fused.rms_norm_backward, (dy, x, w, rstd)),
             (fused.silu_mul, (gate, up)), (fused.silu_mul_backward, (up, gate, up)),
             (fused.rope, (rand(64, 4, 16), cos, sin)), (fused.rope_backward, (rand(64, 4, 16), cos, sin)),
             (fused.masked_softmax, (scores, mask, 0.25)),
             (fused.masked_softmax_backward, (scores, fused.masked_softmax.eager(scores, mask, 0.25), 0.25))]
    for fn, args in cases:
        compiled, eager = fn(*args), fn.eager(*args)
        assert fn.compiled is not None, fn.__name__
        for c, e in zip(*(o if isinstance(o, tuple) else (o,) for o in (compiled, eager))):
            assert c.dtype == e.dtype and c.shape == e.shape, fn.__name__
            # compiled kernels keep fp32 where eager rounds intermediates to bf16: within a few bf16 ulps
            torch.testing.assert_close(c.float(), e.float(), rtol=2 ** -6, atol=2 ** -6 * e.float().abs().max().item(),
                                       msg=lambda m: f"{fn.__name__}: {m}")


def test_the_lean_decoder_learns_the_same_with_compiled_kernels(compile_everything, monkeypatch):
    from tests.core.test_fast_decoder import _gqa_model
    from posttrain.models.logprobs import completion_logprobs, uses_fast_decoder

    def logprobs_and_grads(model):
        g = torch.Generator().manual_seed(3)
        prompt, completion = torch.randint(0, 64, (4, 6), generator=g), torch.randint(0, 64, (4, 9), generator=g)
        prompt_mask, completion_mask = torch.ones_like(prompt), torch.ones_like(completion)
        prompt_mask[1, :2] = 0
        completion_mask[2, 5:] = 0
        model.zero_grad()
        lp, _ = completion_logprobs(model, prompt, prompt_mask, completion, completion_mask, decoder_mode="auto")
        (lp * completion_mask).sum().backward()
        return lp.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    model = _gqa_model(torch.float32)
    assert uses_fast_decoder(model.get_decoder(), "auto")
    lp_compiled, grads_compiled = logprobs_and_grads(model)
    for fn in (fused.rms_norm, fused.rms_norm_backward, fused.silu_mul, fused.silu_mul_backward, fused.rope,
               fused.rope_backward, fused.masked_softmax, fused.masked_softmax_backward):
        assert fn.compiled is not None, fn.__name__
    monkeypatch.setenv(fused.ENV, "0")
    fused.compiled_enabled.cache_clear()
    lp_eager, grads_eager = logprobs_and_grads(model)
    torch.testing.assert_close(lp_compiled, lp_eager, rtol=1e-5, atol=1e-5)
    assert grads_compiled.keys() == grads_eager.keys() and len(grads_eager) > 10
    for name in grads_eager:
        torch.testing.assert_close(grads_compiled[name], grads_eager[name], rtol=1e-4, atol=1e-5, msg=name)


# ------------------------------------------------------------------------ the switch
def test_the_switch_reads_the_environment(monkeypatch):
    fused.compiled_enabled.cache_clear()
    try:
        monkeypatch.setenv(fused.ENV, "0")
        assert not fused.compiled_enabled()
        fused.compiled_enabled.cache_clear()
        monkeypatch.setenv(fused.ENV, "sometimes")
        with pytest.raises(ValueError, match="use auto, 1 or 0"):
            fused.compiled_enabled()
        fused.compiled_enabled.cache_clear()
        monkeypatch.setenv(fused.ENV, "1")
        monkeypatch.setenv("PATH", "")
        monkeypatch.delenv("CXX", raising=False)
        with pytest.raises(RuntimeError, match=f"{fused.ENV}=0"):
            fused.compiled_enabled()
        fused.compiled_enabled.cache_clear()
        monkeypatch.setenv(fused.ENV, "auto")
        assert not fused.compiled_enabled()  # no compiler: eager, as documented
    finally:
        fused.compiled_enabled.cache_clear()


def test_small_tensors_and_autograd_stay_eager(monkeypatch):
    monkeypatch.setenv(fused.ENV, "1")
    fused.compiled_enabled.cache_clear()
    calls = []
    probe = fused.fused(lambda x: calls.append(x) or x * 2)
    try:
        assert torch.equal(probe(torch.ones(3)), torch.full((3,), 2.0))  # under MIN_ELEMENTS
        big = torch.ones(fused.MIN_ELEMENTS, requires_grad=True)
        assert probe(big).requires_grad  # grad mode on: eager, so autograd sees the ops
        assert probe.compiled is None and len(calls) == 2
    finally:
        fused.compiled_enabled.cache_clear()
