"""The lean decoder's elementwise work, each piece one compiled CPU kernel on large tensors.

In eager PyTorch every elementwise op is its own pass over memory, and on a CPU the mixed
bf16/fp32 ops of a layer (RMSNorm in fp32, the SiLU gate, RoPE, the masked softmax) write
fp32 intermediates between passes: at 16k tokens x 576 an RMSNorm forward and backward took
12.5 + 36 ms eager on this project's 2-core host, and 1.4 + 4.5 ms as one inductor kernel each
(``torch.compile``, which emits a single vectorised C++ loop per function). The learner's
matmuls stay with oneDNN; only the glue between them is compiled.

Each function here is written once, in eager PyTorch, and ``fused`` decides per call:

- tensors under ``MIN_ELEMENTS`` run eager (a compiled call costs ~20-50 us of guard checks,
  more than the work on small tensors: the sampler's per-token decode and tiny test models);
- larger CPU tensors run the compiled kernel, built once per dtype and rank (shapes dynamic)
  and cached on disk by inductor across runs; the first build on a machine adds up to ~20 s.

The eager bodies update their own intermediates in place, never an input (a compiled function
would have to write a mutated input back), so the eager path (CUDA, small tensors, no compiler)
holds two temporaries more than the code before this module did (the scaled scores, and da u in
the SwiGLU backward), each freed within its function.

Compiled kernels compute in fp32 without rounding intermediates to bf16 where eager rounds
them, so results can differ from eager by an ulp of the output; against an fp32 forward of
SmolLM2-135M, the bf16 log-prob and gradient errors of the two paths measured within 10% of each other.
``POSTTRAIN_FUSED_KERNELS=0`` turns compilation off (every call eager); the default ``auto``
compiles when a C++ compiler is on the PATH (inductor needs one on a CPU).
"""

from __future__ import annotations

import functools
import os
import shutil
from typing import Callable

import torch
import torch.nn.functional as F

MIN_ELEMENTS = 1 << 18
ENV = "POSTTRAIN_FUSED_KERNELS"


@functools.cache
def compiled_enabled() -> bool:
    """Whether large CPU tensors go through compiled kernels (``POSTTRAIN_FUSED_KERNELS``)."""
    value = os.environ.get(ENV, "auto").strip().lower()
    if value in ("0", "false", "off", "no"):
        return False
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")
    if value in ("1", "true", "on", "yes"):
        if compiler is None:
            raise RuntimeError(f"{ENV}=1 asks for compiled kernels, but no C++ compiler (g++, c++, clang++ or $CXX) "
                               f"is on the PATH: install one, or set {ENV}=0 to run the elementwise work eager")
        return True
    if value != "auto":
        raise ValueError(f"{ENV}={value!r}: use auto, 1 or 0")
    return compiler is not None


class fused:
    """``fn`` compiled for large CPU inputs (the first argument's size) outside autograd, eager
    otherwise (``.eager`` is ``fn``; ``.compiled`` is None until the first compiled call).

    The callers are autograd functions' forwards and backwards and the sampler's no-grad decoder,
    so the compiled graphs carry no autograd; tensors go in detached, which spares guards (and
    recompiles) on requires_grad and on view bases.
    """

    def __init__(self, fn: Callable):
        self.eager = fn
        self.compiled = None
        functools.update_wrapper(self, fn)

    def __call__(self, *args):
        first = args[0]
        if (first.numel() < MIN_ELEMENTS or first.device.type != "cpu" or torch.is_grad_enabled()
                or not compiled_enabled()):
            return self.eager(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.eager, dynamic=True, fullgraph=True)
        return self.compiled(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))


# ------------------------------------------------------------------------ RMSNorm
@fused
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(w * round(x r), r) with r = 1 / sqrt(mean(x^2) + eps) in fp32."""
    wide = torch.promote_types(x.dtype, torch.float32)
    ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=wide).square_().div_(x.shape[-1])
    rstd = ms.add_(eps).rsqrt_()
    return weight * (x * rstd).to(x.dtype), rstd


@fused
def rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw) of ``rms_norm``: with x_hat = x r and g' = g w (in the input dtype),
    dx = r (g' - x_hat mean(g' x_hat)), dw = sum over rows of g x_hat; the rest in fp32."""
    x_hat = x * rstd  # fp32 (promoted)
    grad_w = (grad * x_hat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    gw = grad * weight
    dot = (gw * x_hat).mean(-1, keepdim=True)
    return torch.sub(gw, x_hat.mul_(dot)).mul_(rstd).to(x.dtype), grad_w


# ------------------------------------------------------------------------ SwiGLU
@fused
def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """a = silu(g) u."""
    return F.silu(g) * u


@fused
def silu_mul_backward(da: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(a, dg, du) for a = silu(g) u: du = da silu(g), dg = da u silu'(g),
    silu'(g) = s (1 + g (1 - s)), s = sigmoid(g); a again, for the down projection's gradient."""
    silu = F.silu(g)
    return silu * u, torch.ops.aten.silu_backward(da * u, g), da * silu


# ------------------------------------------------------------------------ RoPE
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's pairing of the two halves of a head: (x1, x2) -> (-x2, x1)."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


@fused
def rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """t cos + rotate_half(t) sin (Su et al. 2021, RoFormer)."""
    return t * cos + rotate_half(t) * sin


@fused
def rope_backward(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """dt = g cos - rotate_half(g sin): rotate_half's transpose is its negation."""
    return grad * cos - rotate_half(grad * sin)


class RopeFn(torch.autograd.Function):
    """``rope`` with its backward ``rope_backward`` (no tensor saved but cos and sin)."""

    @staticmethod
    def forward(ctx, t, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rope(t, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rope_backward(grad, cos, sin), None, None


# ------------------------------------------------------------------------ attention probabilities
@fused
def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """p = softmax(scores * scale + mask) over the last dim, in fp32, returned in the scores' dtype
    (as transformers' eager attention: scaled scores and mask added in the scores' dtype).

    scores [n, KV, G, Lq, Lk], additive mask [n, 1, 1, Lq, Lk]."""
    logits = (scores * scale).add_(mask.to(scores.dtype))
    return torch.softmax(logits, -1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(scores.dtype)


@fused
def masked_softmax_backward(dp: torch.Tensor, p: torch.Tensor, scale: float) -> torch.Tensor:
    """ds = scale p (dp - sum(dp p)), the gradient on the scores."""
    return torch.ops.aten._softmax_backward_data(dp, p, -1, p.dtype).mul_(scale)
