"""Self-certainty = mean over positions of KL(U || p)."""

import math

import pytest
import torch

from posttrain.rewards.self_certainty import masked_self_certainty, self_certainty, token_self_certainty


def test_uniform_distribution_has_zero_self_certainty():
    logits = torch.zeros(2, 3, 5)
    assert torch.allclose(self_certainty(logits), torch.zeros(2), atol=1e-6)


def test_matches_the_definition_by_hand():
    # p = [0.5, 0.25, 0.25]: KL(U||p) = -log 3 - (log .5 + 2 log .25)/3
    p = torch.tensor([0.5, 0.25, 0.25])
    logits = torch.log(p) + 3.0  # shift-invariance
    expected = -math.log(3) - (math.log(0.5) + 2 * math.log(0.25)) / 3
    assert token_self_certainty(logits).item() == pytest.approx(expected, abs=1e-6)
    # against torch's KL: kl_div(input=log p, target=u) = sum u (log u - log p)
    u = torch.full((3,), 1 / 3)
    ref = torch.nn.functional.kl_div(torch.log(p), u, reduction="sum")
    assert token_self_certainty(logits).item() == pytest.approx(ref.item(), abs=1e-6)


def test_sequence_mean_masking_and_chunking():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11, dtype=torch.bfloat16)
    per_tok = token_self_certainty(logits)
    assert per_tok.shape == (3, 7) and per_tok.dtype == torch.float32
    assert torch.all(per_tok >= -1e-5)  # a KL divergence
    assert torch.allclose(self_certainty(logits), per_tok.mean(-1))
    assert torch.allclose(token_self_certainty(logits, chunk_size=2), per_tok)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0, 0], [1] * 7, [0] * 7])
    got = masked_self_certainty(logits, mask)
    assert got[0] == pytest.approx(per_tok[0, :2].mean().item(), abs=1e-6)
    assert got[1] == pytest.approx(per_tok[1].mean().item(), abs=1e-6)
    assert got[2] == 0.0
    assert torch.allclose(masked_self_certainty(logits, None), self_certainty(logits))
    with pytest.raises(ValueError):
        masked_self_certainty(logits, mask[:, :3])


def test_peaked_is_more_certain_than_flat():
    flat = torch.zeros(1, 4, 10)
    peaked = flat.clone()
    peaked[..., 0] = 10.0
    assert self_certainty(peaked).item() > self_certainty(flat).item()
