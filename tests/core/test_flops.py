"""The learner's FLOP accounting (posttrain.bench.learner_flops) against torch's flop counter."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from posttrain.bench import learner_flops, model_dims
from posttrain.config import ModelConfig, TrainerConfig
from posttrain.models.loading import load_model_and_tokenizer
from posttrain.tasks.base import Problem
from posttrain.trainers.learner import Learner
from posttrain.trainers.sft_data import Demonstration, collate


def test_learner_matmul_flops_match_the_flop_counter_and_attention_is_the_rest():
    model, _ = load_model_and_tokenizer("tiny-random")
    N, P, T = 3, 8, 6
    g = torch.Generator().manual_seed(0)
    encoded = [(torch.randint(3, 100, (P,), generator=g).tolist(), torch.randint(3, 100, (T,), generator=g).tolist())
               for _ in range(N)]
    batch = collate(encoded, [Demonstration(Problem(str(i), "x"), "y", str(i)) for i in range(N)])
    learner = Learner(model, TrainerConfig(autocast="none", share_prompt_pass=False), ModelConfig(attention="eager"),
                      temperature=1.0, device=torch.device("cpu"), sampler_dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        learner.forward_backward(batch, lambda micro, logp, _: logp.sum())
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    nonembed, hidden, vocab = model_dims(model)
    cfg = model.config
    # by hand: q, k, v, o (4 H^2 with as many KV heads as heads) + gate, up, down (3 H I) per layer
    assert nonembed == cfg.num_hidden_layers * (4 * cfg.hidden_size ** 2 + 3 * cfg.hidden_size * cfg.intermediate_size)
    assert counts["aten.mm"] == learner_flops(nonembed, hidden, vocab, N * P, N * T, rows=N)
    L = P + T - 1  # input positions per row
    assert counts["aten.bmm"] == 12 * L * L * hidden * cfg.num_hidden_layers * N  # attention, excluded above
