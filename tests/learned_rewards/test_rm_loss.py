"""Bradley-Terry loss and pairwise accuracy, by hand."""

import math

import torch

from posttrain.trainers.reward_model import bradley_terry_loss, pairwise_accuracy


def test_bt_loss_by_hand():
    loss = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]))
    assert math.isclose(float(loss), math.log(1 + math.exp(-1)), rel_tol=1e-6)
    # equal rewards: log 2; batch mean of two pairs
    loss = bradley_terry_loss(torch.tensor([0.0, 2.0]), torch.tensor([0.0, 0.0]))
    assert math.isclose(float(loss), (math.log(2) + math.log(1 + math.exp(-2))) / 2, rel_tol=1e-6)


def test_bt_loss_margin_and_centering():
    rc, rr = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.5])
    # margin: -log sigma(r_c - r_r - m), per pair (Llama 2) or one float
    per_pair = bradley_terry_loss(rc, rr, margin=torch.tensor([0.5, 1.0]))
    expect = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(-1.5))) / 2
    assert math.isclose(float(per_pair), expect, rel_tol=1e-6)
    assert math.isclose(float(bradley_terry_loss(rc, rr, margin=0.5)),
                        (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(-2.0))) / 2, rel_tol=1e-6)
    # centring: + c * mean((r_c + r_r)^2) = 0.1 * (1 + 12.25) / 2
    base = float(bradley_terry_loss(rc, rr))
    centred = float(bradley_terry_loss(rc, rr, center_coef=0.1))
    assert math.isclose(centred - base, 0.1 * (1.0 + 3.5 ** 2) / 2, rel_tol=1e-6)


def test_bt_gradient_sign():
    rc = torch.tensor([0.3], requires_grad=True)
    rr = torch.tensor([0.1], requires_grad=True)
    bradley_terry_loss(rc, rr).backward()
    # descending the loss raises the chosen reward and lowers the rejected one
    assert rc.grad.item() < 0 < rr.grad.item()
    # d/d r_c = -(1 - sigma(r_c - r_r))
    assert math.isclose(rc.grad.item(), -(1 - torch.sigmoid(torch.tensor(0.2)).item()), rel_tol=1e-5)
    assert math.isclose(rr.grad.item(), -rc.grad.item(), rel_tol=1e-6)


def test_centering_gradient_pulls_sum_to_zero():
    rc = torch.tensor([5.0], requires_grad=True)
    rr = torch.tensor([4.0], requires_grad=True)
    (bradley_terry_loss(rc, rr, center_coef=1.0) - bradley_terry_loss(rc, rr).detach()).backward()
    assert rc.grad.item() > 0 and rr.grad.item() > 0  # both pushed down toward r_c + r_r = 0


def test_pairwise_accuracy_ties_count_half():
    assert pairwise_accuracy([1.0, 0.0, 2.0, 1.0], [0.0, 1.0, 2.0, 0.5]) == (1 + 0 + 0.5 + 1) / 4
    assert math.isnan(pairwise_accuracy([], []))
