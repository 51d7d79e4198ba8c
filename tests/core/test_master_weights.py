"""fp32 master weights kept as bf16 + 16 low bits: exact split, exact AdamW, state, checkpoints."""

import pytest
import torch

from posttrain.trainers.master_weights import SplitMasterAdamW, merge, split


def _bits(x: float) -> int:
    return int(torch.tensor([x], dtype=torch.float32).view(torch.int32))


def test_split_by_hand():
    # bf16 keeps 7 mantissa bits: near 1.0 its ulp is 2^-7 and half an ulp is 2^-8 (low half 0x8000)
    x = torch.tensor([1 + 2**-8, 1 + 2**-9, 1 + 2**-8 + 2**-23, -(1 + 2**-8), 0.0, -0.0, 3.0])
    hi, lo = split(x)
    # 1 + 2^-8 is a tie: away from zero -> 1 + 2^-7, and lo = 0x3F808000 - 0x3F810000 = -0x8000
    assert hi.float().tolist() == [1 + 2**-7, 1.0, 1 + 2**-7, -(1 + 2**-7), 0.0, -0.0, 3.0]
    assert lo.tolist() == [-32768, 16384, -32767, -32768, 0, 0, 0]
    assert torch.signbit(hi[5].float())  # -0.0 stays negative
    assert _bits(1 + 2**-9) == (int(hi[1].view(torch.int16)) << 16) + int(lo[1])
    assert torch.equal(merge(hi, lo).view(torch.int32), x.view(torch.int32))


def test_split_is_exact_and_rounds_to_nearest():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_003, generator=g) * 0.05
    ties = ((x.view(torch.int32) & ~0xFFFF) | 0x8000).view(torch.float32)  # every low half exactly 0x8000
    for v in (x, -x, ties, x * 1e-30, x * 1e30):
        hi, lo = split(v)
        assert torch.equal(merge(hi, lo).view(torch.int32), v.view(torch.int32))
        err = (v - hi.float()).abs()
        ulp = (hi.float().abs() * 2.0**-7).clamp_min(torch.finfo(torch.float32).tiny)
        assert bool((err <= ulp / 2).all())  # nearest
    # only ties can differ from torch's round-to-nearest-even cast
    hi, _ = split(x)
    differs = hi.view(torch.int16) != x.to(torch.bfloat16).view(torch.int16)
    assert bool(((x.view(torch.int32) & 0xFFFF)[differs] == 0x8000).all())
    assert int(differs.sum()) <= int(((x.view(torch.int32) & 0xFFFF) == 0x8000).sum())


def _pair(shapes, seed=0, **adam):
    g = torch.Generator().manual_seed(seed)
    reference = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.05) for s in shapes]
    split_params = [torch.nn.Parameter(p.detach().clone()) for p in reference]
    return reference, split_params, torch.optim.AdamW(reference, fused=True, **adam), SplitMasterAdamW(split_params, **adam)


def test_step_equals_fused_adamw_on_fp32_bit_for_bit():
    # a tensor larger than one rebuilt block (2^20), odd sizes, a scalar-sized one
    shapes = [(1100, 1000), (3,), (7, 577), (1,)]
    adam = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    reference, params, torch_adam, ours = _pair(shapes, **adam)
    assert all(p.dtype == torch.bfloat16 for p in params)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for r, gr in zip(reference, grads):
            r.grad = gr.clone()
        ours.grads = [gr.clone() for gr in grads]
        norm = torch.nn.utils.clip_grad_norm_(reference, 30.0)
        assert torch.equal(ours.clip_grad_norm_(30.0), norm) and float(norm) > 30  # clipped
        torch_adam.step()
        ours.step()
        for i, r in enumerate(reference):
            assert torch.equal(ours.master(i).view(torch.int32), r.detach().view(torch.int32)), (step, i)
            assert torch.equal(params[i].detach(), split(r.detach())[0])
        assert ours.grads == [None] * len(shapes)  # freed by the step
    for a, b in zip(ours.state_dict()["state"].values(), torch_adam.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_gradients_accumulate_in_fp32_and_leave_the_bf16_weights():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, -3.0]))
    opt = SplitMasterAdamW([p], lr=0.1)
    for scale in (1.0, 1 / 3):  # two micro-batches
        (p * torch.tensor([scale, 2 * scale, 3 * scale], dtype=torch.bfloat16)).sum().backward()
        assert p.grad is None
    third = torch.tensor([1 / 3, 2 / 3, 1.0], dtype=torch.bfloat16).float()
    assert torch.equal(opt.grads[0], torch.tensor([1.0, 2.0, 3.0]) + third)  # fp32 sum of bf16 grads
    opt.zero_grad()
    assert opt.grads == [None]


def test_state_dict_round_trips_with_torch_adamw():
    shapes = [(40, 30), (30,)]
    adam = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    reference, params, torch_adam, ours = _pair(shapes, **adam)
    g = torch.Generator().manual_seed(2)
    for r in reference:
        r.grad = torch.randn(r.shape, generator=g)
    torch_adam.step()
    # a fresh split optimizer over the stepped weights, continuing from torch's state
    resumed = [torch.nn.Parameter(r.detach().clone()) for r in reference]
    cont = SplitMasterAdamW(resumed, lr=0.5)
    cont.load_state_dict(torch_adam.state_dict())
    assert cont.param_groups[0]["lr"] == 1e-2 and cont.param_groups[0]["betas"] == (0.9, 0.95)
    for r in reference:
        r.grad = torch.randn(r.shape, generator=g)
    cont.grads = [r.grad.clone() for r in reference]
    torch_adam.step()
    cont.step()
    for i, r in enumerate(reference):
        assert torch.equal(cont.master(i), r.detach())
    with pytest.raises(ValueError, match="optimizer state for 2 parameters.*has 1"):
        SplitMasterAdamW([torch.nn.Parameter(torch.zeros(3))], lr=0.1).load_state_dict(torch_adam.state_dict())


def test_materialized_reads_and_sets_exact_masters():
    p = torch.nn.Parameter(torch.tensor([1 + 2**-9, -2.5, 1 + 2**-8]))
    opt = SplitMasterAdamW([p], lr=0.1)
    storage = p.data_ptr()
    with opt.materialized():
        assert p.dtype == torch.float32 and p.tolist() == [1 + 2**-9, -2.5, 1 + 2**-8]
        p.data.copy_(torch.tensor([0.1, 0.2, 0.3]))  # e.g. a checkpoint loaded inside
    assert p.dtype == torch.bfloat16 and p.data_ptr() == storage  # the bf16 weights stay where they were
    assert torch.equal(opt.master(0), torch.tensor([0.1, 0.2, 0.3]))


def test_refuses_non_fp32_parameters():
    with pytest.raises(ValueError, match="needs fp32 parameters"):
        SplitMasterAdamW([torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))], lr=0.1)


def test_frozen_weights_keep_their_fp32_value_and_do_not_move():
    frozen = torch.nn.Parameter(torch.tensor([1 + 2**-9, 0.3]), requires_grad=False)
    trained = torch.nn.Parameter(torch.tensor([0.5, -0.25]))
    opt = SplitMasterAdamW([frozen, trained], lr=0.1, weight_decay=0.0)
    assert frozen.dtype == torch.bfloat16 and trained.dtype == torch.bfloat16  # one compute dtype
    (frozen.float() * trained).sum().backward()
    assert opt.grads[0] is None and opt.grads[1] is not None
    opt.step()
    assert torch.equal(opt.master(0), torch.tensor([1 + 2**-9, 0.3]))
    # Adam's first step moves each weight by lr against the gradient's sign: 0.5 - 0.1, -0.25 - 0.1
    assert torch.allclose(opt.master(1), torch.tensor([0.4, -0.35]), atol=1e-6)
