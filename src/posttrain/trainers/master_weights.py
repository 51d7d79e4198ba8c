"""AdamW on fp32 master weights stored as the bf16 compute weights plus 16 low bits.

Mixed-precision training (Micikevicius et al., "Mixed Precision Training", arXiv 1710.03740)
keeps an fp32 master copy of every weight (4 bytes) next to the bf16 copy that the forward and
backward use (2 bytes). The bf16 copy already holds the master's upper 16 bits, up to rounding,
so here the master is kept as that copy ``hi`` and an int16 ``lo``:

    bits(master) = bits(hi) * 2^16 + lo                                  (int32 bit patterns)
    hi = master rounded to bf16, to nearest with ties away from zero
    lo = bits(master) - bits(hi) * 2^16, in [-2^15, 2^15)

The master is rebuilt exactly, in chunks that stay in cache, for each optimizer step; the step
is torch's fused AdamW kernel on the rebuilt fp32 values, so the arithmetic is the fp32-master
arithmetic bit for bit. Memory: 2 bytes per weight instead of 4 (270 MB for a 135M model), and
the step writes the new bf16 weights in place (no copy into the sampler afterwards).

Ties go away from zero, not to even as a plain ``.to(torch.bfloat16)`` does: with ties to even,
an even bf16 value is the rounding of 2^16 + 1 fp32 values, one more than 16 bits can tell
apart. The two roundings differ only where the low 16 bits are exactly 0x8000 and round-to-even
goes down: rare in trained weights (2^-17 of them: about half of the 1,758 ties among SmolLM2's
135M weights after one step), common in weights dequantized from a quantized file (5.5M, 4%, of
SmolLM2's Q4_1 GGUF at load), which then start one bf16 ulp further from zero.

Gradients accumulate in fp32 here (``grads``), across micro-batches: each bf16 gradient the
backward leaves on a weight is added and released at once.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

CHUNK = 1 << 20  # elements per rebuilt block (4 MB of fp32, cache-resident), a multiple of every SIMD width


def split(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi bf16, lo int16) of an fp32 tensor, as in the module docstring."""
    hi = torch.empty(master.shape, dtype=torch.bfloat16, device=master.device)
    lo = torch.empty(master.shape, dtype=torch.int16, device=master.device)
    _split_into(master, hi, lo)
    return hi, lo


def merge(hi: torch.Tensor, lo: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 tensor whose ``split`` is (hi, lo); written into ``out`` (fp32) when given."""
    bits = torch.empty(hi.shape, dtype=torch.int32, device=hi.device) if out is None else out.view(torch.int32)
    bits.copy_(hi.view(torch.int16))
    return torch.add(lo, bits, alpha=1 << 16, out=bits).view(torch.float32)


def _split_into(master: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, scratch: torch.Tensor | None = None) -> None:
    """Write ``split(master)`` into ``hi`` and ``lo``; ``scratch``: an int32 buffer of master's size.

    lo is the low half of the bits read as a signed int16 (the int32 -> int16 copy keeps it):
    when it is negative (low half >= 0x8000) hi rounded up, and bits - hi * 2^16 is exactly it.
    """
    bits = master.contiguous().view(torch.int32)
    lo.copy_(bits)  # wraps to the low half on every CPU kernel seen; _check_roundtrip makes sure
    torch.bitwise_right_shift(torch.add(bits, 0x8000, out=scratch), 16, out=hi.view(torch.int16))  # ties away


def accumulate_grad(acc: torch.Tensor | None, grad: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """acc += grad, with acc in ``dtype`` (a new copy of grad in ``dtype`` when acc is None).

    The add runs in CHUNK blocks: a whole-tensor mixed-dtype add_ first casts grad into a
    temporary the size of acc (113 MB for SmolLM2's embedding); in blocks the cast stays in cache.
    """
    if acc is None:
        return grad.to(dtype)
    a, b = acc.view(-1), grad.reshape(-1)
    for start in range(0, a.numel(), CHUNK):
        a[start:start + CHUNK].add_(b[start:start + CHUNK])
    return acc


def _check_roundtrip() -> None:
    """Refuse to run where split/merge are not exact (e.g. a kernel that saturates int32 -> int16)."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (4099,), generator=g, dtype=torch.int64)
    bits = bits[(bits & 0x7F800000) != 0x7F800000].to(torch.int32)  # no inf/NaN patterns
    bits[:4] = torch.tensor([0x3F808000, 0x3F807FFF, -0x407F8000, 0], dtype=torch.int32)  # ties, near-ties, -1.0039
    values = bits.view(torch.float32)
    hi, lo = split(values)
    rounded = torch.tensor([1.0078125, 1.0])  # the tie rounds away from zero, the near-tie down
    if not torch.equal(merge(hi, lo).view(torch.int32), bits) or not torch.equal(hi[:2].float(), rounded):
        raise RuntimeError("this PyTorch build does not split fp32 weights into bf16 + int16 exactly; "
                           "set trainer.split_master_weights=false")


class SplitMasterAdamW:
    """AdamW (decoupled weight decay) over ``params`` whose fp32 values are kept split.

    ``params`` arrive in fp32; they become bf16 in place (``p.data``), so every module holding
    them computes in bf16 from then on. Frozen ones (``requires_grad=False``) are split too, so
    every weight keeps its exact fp32 value, but get no gradients and no steps. Interface as far
    as the RL trainer needs it:
    ``param_groups[0]["lr"]``, ``zero_grad``, ``clip_grad_norm_``, ``step``, ``state_dict``,
    ``load_state_dict`` (the layout of ``torch.optim.AdamW``'s), and ``materialized`` for
    reading or writing the fp32 weights (checkpoints).
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        self.params = list(params)
        for p in self.params:
            if p.dtype != torch.float32:
                raise ValueError(f"SplitMasterAdamW needs fp32 parameters to split, got {p.dtype}")
        _check_roundtrip()
        self.param_groups = [dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)]
        self.lo: list[torch.Tensor] = []
        for p in self.params:
            hi, lo = split(p.detach())
            p.data = hi.view(p.shape)
            self.lo.append(lo.view(p.shape))
        self.grads: list[torch.Tensor | None] = [None] * len(self.params)
        self.state: list[dict[str, torch.Tensor]] = [{} for _ in self.params]
        for i, p in enumerate(self.params):
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._accumulate_hook(i))

    # ------------------------------------------------------------------ gradients
    def _accumulate_hook(self, i: int):
        def accumulate(p: torch.Tensor) -> None:
            self.grads[i] = accumulate_grad(self.grads[i], p.grad)
            p.grad = None

        return accumulate

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.grads = [None] * len(self.params)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """As ``torch.nn.utils.clip_grad_norm_`` on the fp32 gradients (L2 norm); returns the norm."""
        grads = [g for g in self.grads if g is not None]
        if not grads:
            return torch.tensor(0.0)
        total = torch.nn.utils.get_total_norm(grads, 2.0)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # clip_grads_with_norm_'s, on tensors
        torch._foreach_mul_(grads, coef)
        return total

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        block, scratch = torch.empty(CHUNK, dtype=torch.float32), torch.empty(CHUNK, dtype=torch.int32)
        for i, p in enumerate(self.params):
            grad = self.grads[i]
            if grad is None:
                continue
            state = self.state[i]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(grad)
                state["exp_avg_sq"] = torch.zeros_like(grad)
            state["step"] += 1
            hi, lo = p.data.view(-1), self.lo[i].view(-1)
            flat = [grad.view(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)]
            for start in range(0, hi.numel(), CHUNK):
                end = min(start + CHUNK, hi.numel())
                master = merge(hi[start:end], lo[start:end], out=block[:end - start])
                g, m, v = (t[start:end] for t in flat)
                torch._fused_adamw_([master], [g], [m], [v], [], [state["step"]], amsgrad=False, lr=group["lr"],
                                    beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                                    maximize=False, grad_scale=None, found_inf=None)
                _split_into(master, hi[start:end], lo[start:end], scratch[:end - start])
        self.grads = [None] * len(self.params)  # nothing reads them after the step; free them now

    # ------------------------------------------------------------------ fp32 views and state
    def master(self, i: int) -> torch.Tensor:
        """The fp32 master value of parameter ``i`` (a new tensor)."""
        return merge(self.params[i].detach(), self.lo[i])

    @contextlib.contextmanager
    def materialized(self) -> Iterator[None]:
        """Inside: the parameters hold their fp32 master values (read them, or load new ones).

        On exit whatever they then hold is split back in place, so loading a checkpoint inside
        sets the master weights exactly.
        """
        low = [p.data for p in self.params]
        for i, p in enumerate(self.params):
            p.data = self.master(i)
        try:
            yield
        finally:
            for p, hi, lo in zip(self.params, low, self.lo):
                _split_into(p.data.to(torch.float32), hi, lo)
                p.data = hi

    def state_dict(self) -> dict:
        group = dict(self.param_groups[0], params=list(range(len(self.params))), amsgrad=False, maximize=False,
                     foreach=None, capturable=False, differentiable=False, fused=True, decoupled_weight_decay=True)
        return {"state": {i: dict(s) for i, s in enumerate(self.state) if s}, "param_groups": [group]}

    def load_state_dict(self, state: dict) -> None:
        """Accepts this class's state dict or ``torch.optim.AdamW``'s over the same parameters."""
        groups = state["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(f"optimizer state for {sum(len(g['params']) for g in groups)} parameters in "
                             f"{len(groups)} groups; this optimizer has {len(self.params)} in one group")
        for key in ("lr", "betas", "eps", "weight_decay"):
            self.param_groups[0][key] = groups[0][key]
        ids = groups[0]["params"]
        self.state = [{} for _ in self.params]
        for pos, pid in enumerate(ids):
            saved = state["state"].get(pid)
            if saved:
                self.state[pos] = {k: torch.as_tensor(v, dtype=torch.float32).clone() if k == "step"
                                   else v.to(torch.float32).clone() for k, v in saved.items()}

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.params)
        return f"SplitMasterAdamW({len(self.params)} tensors, {n / 1e6:.1f}M weights, lr={self.param_groups[0]['lr']})"

