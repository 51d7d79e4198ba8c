"""Length bucketing for SFT (data.length_bucketing, sft.LengthBucketSampler): every demonstration
once an epoch, the same loss as unbucketed batches on the same tokens, prompt tokens still
masked, less padding, and an exact resume."""

import json
import random

import pytest
import torch

from posttrain.config import ModelConfig, SFTConfig, TrainerConfig, load_config
from posttrain.models.loading import load_model_and_tokenizer
from posttrain.tasks.base import Problem
from posttrain.trainers.learner import Learner
from posttrain.trainers.rl import EpochSampler
from posttrain.trainers.sft import LengthBucketSampler, train_sft
from posttrain.trainers.sft_data import Demonstration, collate, encode, padding_fraction


def _demos(n: int = 48, seed: int = 0) -> list[Demonstration]:
    """Prompts of 1..30 and completions of 1..40 characters (the tiny tokenizer: one token each)."""
    rng = random.Random(seed)
    return [Demonstration(Problem(f"p{i}", "q" * rng.randint(1, 30)), "a" * rng.randint(1, 40), f"d{i}")
            for i in range(n)]


def _items(tok, demos):
    return list(zip(encode(tok, demos, True, 512), demos))


def _epoch_batches(sampler, n: int, batch_size: int):
    return [sampler.next(batch_size) for _ in range(n // batch_size)]


def test_each_epoch_is_a_permutation_and_resumable():
    _, tok = load_model_and_tokenizer("tiny-random")
    items = _items(tok, _demos())
    lengths = [(len(p), len(c)) for (p, c), _ in items]
    sampler = LengthBucketSampler(items, lengths, batch_size=4, window=3, seed=5)
    for epoch in range(2):
        batches = _epoch_batches(sampler, len(items), 4)
        assert sorted(d.where for b in batches for _, d in b) == sorted(d.where for _, d in items)  # once each
    # the order depends on (seed, epoch) alone: a sampler at position k continues as the original did
    fresh, resumed = LengthBucketSampler(items, lengths, 4, 3, seed=5), LengthBucketSampler(items, lengths, 4, 3, 5)
    fresh.next(20)
    resumed.position = 20
    assert [d.where for _, d in fresh.next(60)] == [d.where for _, d in resumed.next(60)]
    with pytest.raises(ValueError, match="3 lengths for 48 items"):
        LengthBucketSampler(items, lengths[:3], 4, 3, 0)


def test_a_window_is_arranged_by_hand_computed_grids():
    # Batches of 2. Grid of a batch = 2 x (longest prompt + longest completion).
    def arranged(lengths):
        sampler = LengthBucketSampler(list(range(len(lengths))), lengths, batch_size=2, window=4, seed=0)
        order = sampler._arrange(list(range(len(lengths))))
        return sorted(sorted(order[b:b + 2]) for b in range(0, len(order), 2)), sampler._grid(order)

    # Prompts vary, completions do not: 10-token prompts together. As given (0,1),(2,3): 2 x 11 + 2 x 11 = 44;
    # grouped (0,2),(1,3): 2 x (10 + 1) + 2 x (1 + 1) = 26.
    assert arranged([(10, 1), (1, 1), (10, 1), (1, 1)]) == ([[0, 2], [1, 3]], 26)
    # Completions vary the same way: (0,2),(1,3) again, 26.
    assert arranged([(1, 10), (1, 1), (1, 10), (1, 1)]) == ([[0, 2], [1, 3]], 26)
    # Both vary, independently: long/long, long/short, short/long, short/short, twice. The best
    # grouping pairs equal rows: 2 x (9+9) + 2 x (9+1) + 2 x (1+9) + 2 x (1+1) = 36 + 20 + 20 + 4 = 80,
    # which two slabs (by prompt, then by completion within a slab) find; as given it is 2 x 4 x 18 = 144.
    rows = [(9, 9), (9, 1), (1, 9), (1, 1)] * 2
    assert arranged(rows) == ([[0, 4], [1, 5], [2, 6], [3, 7]], 80)
    # Equal lengths everywhere: nothing to gain, the shuffled order is kept.
    sampler = LengthBucketSampler(list(range(4)), [(3, 3)] * 4, batch_size=2, window=2, seed=0)
    assert sampler._arrange([2, 0, 3, 1]) == [2, 0, 3, 1]


def test_bucketing_cuts_padding_and_keeps_prompts_masked():
    _, tok = load_model_and_tokenizer("tiny-random")
    items = _items(tok, _demos())
    lengths = [(len(p), len(c)) for (p, c), _ in items]
    fractions = {}
    samplers = {"plain": EpochSampler(items, 5), "bucketed": LengthBucketSampler(items, lengths, 8, 6, 5)}
    for name, sampler in samplers.items():
        batches = [collate([e for e, _ in b], [d for _, d in b]) for b in _epoch_batches(sampler, len(items), 8)]
        for b, chunk in zip(batches, _epoch_batches(type(sampler)(*sampler_args(sampler)), len(items), 8)):
            # the loss mask covers exactly the completions (+ EOS); prompt tokens are never in it
            assert b.completion_mask.sum(1).tolist() == [float(len(c)) for (_, c), _ in chunk]
            assert b.prompt_mask.sum(1).tolist() == [len(p) for (p, _), _ in chunk]
        grid = sum(b.prompt_ids.numel() + b.completion_ids.numel() for b in batches)
        real = sum(float(b.prompt_mask.sum() + b.completion_mask.sum()) for b in batches)
        fractions[name] = 1 - real / grid
        assert sum(padding_fraction(b) * (b.prompt_ids.numel() + b.completion_ids.numel()) for b in batches) \
            == pytest.approx(grid - real)
    assert fractions["bucketed"] < 0.6 * fractions["plain"], fractions


def sampler_args(sampler):
    """Constructor arguments of a sampler equal to ``sampler`` (to replay its epoch)."""
    if isinstance(sampler, LengthBucketSampler):
        return sampler.problems, sampler.lengths, sampler.batch_size, sampler.window, sampler.seed
    return sampler.problems, sampler.seed


def test_bucketed_batches_give_the_loss_of_the_same_tokens_unbucketed():
    # Same demonstrations, same token weights (one epoch, token sum): the summed NLL over the
    # bucketed batches equals that over plain batches and that of each demonstration alone.
    model, tok = load_model_and_tokenizer("tiny-random")
    items = _items(tok, _demos(n=24))
    lengths = [(len(p), len(c)) for (p, c), _ in items]
    learner = Learner(model, TrainerConfig(autocast="none"), ModelConfig(), temperature=1.0,
                      device=torch.device("cpu"), sampler_dtype=torch.float32)

    def epoch_nll(sampler):
        total = 0.0
        for b in _epoch_batches(sampler, len(items), 8):
            batch = collate([e for e, _ in b], [d for _, d in b])
            total -= float((learner.logprobs(batch) * batch.completion_mask).sum())
        return total

    alone = -sum(float((learner.logprobs(collate([e], [d])) * collate([e], [d]).completion_mask).sum())
                 for e, d in items)
    assert epoch_nll(LengthBucketSampler(items, lengths, 8, 3, 1)) == pytest.approx(alone, rel=1e-5)
    assert epoch_nll(EpochSampler(items, 1)) == pytest.approx(alone, rel=1e-5)


def _write(path, demos):
    path.write_text("".join(json.dumps({"prompt": d.problem.prompt, "completion": d.completion}) + "\n"
                            for d in demos))


def test_run_with_bucketing_pads_less_and_resumes_exactly(tmp_path):
    data = tmp_path / "demos.jsonl"
    _write(data, _demos(n=64))
    base = ["model.name=tiny-random", f"data.path={data}", "data.batch_size=8", "trainer.eval_problems=2",
            "task.test_size=8", "trainer.threads=1", "rollout.max_new_tokens=2", "trainer.steps=4",
            "trainer.checkpoint_every=1", "trainer.lr=3e-3", "data.bucket_window=8"]
    runs = {}
    for name, extra in (("plain", []), ("bucketed", ["data.length_bucketing=true"])):
        train_sft(load_config(None, base + extra, cls=SFTConfig), output_dir=str(tmp_path / name), quiet=True)
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    mean = {k: sum(r["data/padding_frac"] for r in v) / len(v) for k, v in runs.items()}
    assert mean["bucketed"] < 0.6 * mean["plain"], mean
    split = tmp_path / "split"
    overrides = base + ["data.length_bucketing=true"]
    train_sft(load_config(None, overrides, cls=SFTConfig), output_dir=str(split), quiet=True, stop_after=2)
    train_sft(load_config(split / "config.yaml", cls=SFTConfig), output_dir=str(split), resume=True, quiet=True)
    resumed = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss/nll"] for r in resumed] == [r["loss/nll"] for r in runs["bucketed"]]
    assert [r["data/padding_frac"] for r in resumed] == [r["data/padding_frac"] for r in runs["bucketed"]]
