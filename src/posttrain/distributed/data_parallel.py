"""Data parallelism for the Learner: M replicas, each on a shard of the mini-batch, one update.

Every learner process (rank r of M) holds a full replica (weights, fp32 masters, optimizer
state) and the whole rollout batch; per mini-batch B it trains on its rows ``shard_rows`` B_r:

    counts = global_counts({"num_tokens": loss_mask[B_r].sum(), "num_seqs": |B_r|})   # SUM over ranks
    learner.forward_backward(B_r, loss normalised by counts)    # as RLTrainer.update, counts global
    all_reduce_gradients(learner)                               # SUM of the fp32 gradients
    learner.clip_grad_norm(); learner.optim_step(lr_scale)      # identical inputs on every rank

Why SUM of globally normalised losses is the single-process loss. Every mode of
``posttrain.algorithms.aggregate`` is a sum over rows of a term that depends only on that row
and on the counts C = (num_tokens, num_seqs, norm_length) of the whole mini-batch:

    token-mean               l_i = sum_t m_it x_it / num_tokens
    seq-mean-token-mean      l_i = (sum_t m_it x_it / |o_i|) / num_seqs,   |o_i| = sum_t m_it (row i's own)
    seq-mean-token-sum       l_i = sum_t m_it x_it / num_seqs
    seq-mean-token-sum-norm  l_i = sum_t m_it x_it / (num_seqs * norm_length)
    token-sum                l_i = sum_t m_it x_it                          (no count)

so with C global, L = sum_{i in B} l_i(C) = sum_r sum_{i in B_r} l_i(C) = sum_r L_r, and by
linearity grad L = sum_r grad L_r: an all-reduce SUM, not a mean (a mean would scale the
gradient by 1/M: Adam is nearly scale-free, clipping against max_grad_norm is not). This is the
micro-batch argument of aggregation.py one level up. norm_length is ``rollout.max_new_tokens``,
a config constant, so it is already global; no count is ever the micro-batch's or the shard's.

The identity holds for all five modes above, since each per-sequence normaliser (|o_i|) is
that row's own and rows are never split across ranks. It does NOT hold, and would need more
than SUM, for (a) a normaliser taken over a subset, e.g. a Dr.GRPO constant set to the longest
completion of the (micro-)batch instead of max_new_tokens (all-reduce MAX it first), or a mean
over a micro-batch's sequences with the micro-batch's count (pass the global count instead);
(b) losses whose per-row term depends on other rows, unless the dependence is resolved over
the whole mini-batch first: ``kl_cov`` / ``clip_cov`` get their token selection from
``RLUpdate`` (``select_cov_tokens``, once per mini-batch, identical on every rank) through
``token_selection``, and the correction's (batch-normalised) IS weights are computed once per
batch in ``RLUpdate.prepare``, so the SUM identity holds for them. Batch statistics computed
before the update (group-normalised advantages, the 80/20 entropy mask, old/ref log-probs)
must be computed on the whole batch before sharding, as RLTrainer does. Metrics are per-rank partials: the loss is the SUM over ranks.

Why the replicas stay bit-identical. After the SUM every rank holds the same fp32 gradient
bits (gloo's ring reduces each chunk once and broadcasts the result; with two ranks a + b is
commutative anyway), and clipping and AdamW are deterministic functions of (weights, gradients,
state). That needs the same torch build and thread count on every rank (a multi-threaded norm
splits its sum by thread count); ``check_replicas_equal`` catches a drift cheaply.

Buckets. Tensors smaller than ``bucket_mb`` (default 1 MB) are coalesced, same dtype, into
flat buckets of up to that size, staged in one reused buffer; bigger ones are reduced in place.
Measured with two ranks on loopback gloo, 2 shared CPU cores (noisy, +-30%): a collective costs
~0.2-1 ms of latency, and the transfer runs at ~0.5-1 GB/s. Tiny model (20 tensors, 0.1M):
per-tensor 9-16 ms, one bucket 3-5 ms (three small layout checks included, ~0.2-1 ms each).
SmolLM2-135M shapes (272 tensors, 135M): per-tensor 0.90-1.13 s, 1 MB buckets (211 collectives)
0.80-0.88 s, 25 MB buckets (19 collectives) 1.22-1.33 s: at that size the bandwidth dominates,
and copying big tensors into a bucket and back only adds two memory passes.
"""

from __future__ import annotations

import time
import zlib
from typing import Callable, Optional

import torch
import torch.distributed as dist

BUCKET_MB = 1.0  # see Buckets in the module docstring


class ReplicaDriftError(RuntimeError):
    """Data-parallel replicas no longer hold the same weights or optimizer state."""


def _world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group("
                           "'gloo', rank=..., world_size=...) in every learner process before data-parallel calls")
    return dist.get_rank(group), dist.get_world_size(group)


def shard_rows(n: int, rank: int, world: int) -> list[int]:
    """The rows of an n-row mini-batch that rank ``rank`` of ``world`` trains on.

    Contiguous blocks whose sizes differ by at most one: with q, e = divmod(n, world), rank r
    gets the q + (r < e) rows from r*q + min(r, e). Contiguous because the engine writes a
    prompt's completions next to each other, so a group mostly stays on one rank and the
    shared prompt pass (trainers.learner) still runs each prompt once there; the price is
    that ranks may get unequal token counts when lengths differ by group.
    The shards partition range(n), which the SUM identity in the module docstring needs.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world} ranks (need 0 <= rank < world, world >= 1)")
    if n < world:
        raise ValueError(f"a mini-batch of {n} rows cannot give each of {world} data-parallel ranks a row; make "
                         f"rollout.num_prompts x rollout.num_completions / trainer.mini_batches >= {world}")
    q, extra = divmod(n, world)
    start = rank * q + min(rank, extra)
    return list(range(start, start + q + (1 if rank < extra else 0)))


def _check_same(header: list[int], what: str, group) -> None:
    """All-gather a fixed-size header and raise unless every rank sent the same one.

    Gloo reduces tensors of different sizes into garbage on one rank and a timeout on another,
    so every variable-size collective here is preceded by this check of its layout.
    """
    _, world = _world(group)
    mine = torch.tensor(header, dtype=torch.int64)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        rows = "; ".join(f"rank {r}: {g.tolist()}" for r, g in enumerate(gathered))
        raise ValueError(f"data-parallel ranks disagree on {what} ({rows}); every rank must run the same model "
                         f"and configuration and call the same data-parallel functions in the same order")


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def global_counts(local_counts: dict[str, float], group=None) -> dict[str, float]:
    """The SUM over ranks of each count (num_tokens, num_seqs, ...), in float64.

    float64 holds integers exactly up to 2^53, so token counts add without rounding and every
    rank gets the same values, hence the same normaliser bits. Every rank must pass the same keys.
    """
    _world(group)
    keys = list(local_counts)
    _check_same([len(keys), _crc("\0".join(keys))], f"the count names {keys}", group)
    values = torch.tensor([float(local_counts[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return dict(zip(keys, values.tolist()))


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive same-dtype tensors, grouped up to ``bucket_bytes`` (a bigger one alone)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if out and out[-1][0].dtype == t.dtype and size + nbytes <= bucket_bytes:
            out[-1].append(t)
            size += nbytes
        else:
            out.append([t])
            size = nbytes
    return out


def all_reduce_gradients(learner, group=None, bucket_mb: float = BUCKET_MB, meta_group=None) -> int:
    """SUM the learner's optimizer gradients (``learner.fp32_grads()``) over ranks, in place.

    A weight with a gradient on some rank but none here gets a zero one first (same layout
    everywhere); one with none on any rank stays None, so AdamW still skips it. Returns the
    number of gradient collectives (buckets) issued. ``meta_group`` (default ``group``) carries
    the small CPU tensors of the layout checks: a gloo group when ``group`` is nccl, which
    reduces CUDA tensors only.
    """
    _world(group)
    meta = meta_group if meta_group is not None else group
    grads = learner.fp32_grads()
    _check_same([len(grads)], "the number of trainable weights", meta)
    present = torch.tensor([g is not None for g in grads], dtype=torch.int64)
    dist.all_reduce(present, op=dist.ReduceOp.SUM, group=meta)
    grads = learner.fp32_grads(zeros_for=[i for i, c in enumerate(present.tolist()) if c > 0])
    tensors = [g for g in grads if g is not None]
    shapes = ";".join(f"{tuple(g.shape)}{g.dtype}" for g in tensors)
    _check_same([len(tensors), _crc(shapes)], "the gradient shapes and dtypes", meta)
    buckets = _buckets(tensors, int(bucket_mb * 2**20))
    staging: dict[torch.dtype, torch.Tensor] = {}  # one buffer per dtype, reused by its buckets
    for bucket in buckets:
        if len(bucket) == 1 and bucket[0].is_contiguous():  # nothing to coalesce: no copy
            dist.all_reduce(bucket[0], op=dist.ReduceOp.SUM, group=group)
            continue
        numel = sum(t.numel() for t in bucket)
        dtype, device = bucket[0].dtype, bucket[0].device
        buf = staging.get(dtype)
        if buf is None or buf.numel() < numel:
            capacity = max(numel, int(bucket_mb * 2**20) // bucket[0].element_size())
            buf = staging[dtype] = torch.empty(capacity, dtype=dtype, device=device)
        flat = buf[:numel]
        torch.cat([t.reshape(-1) for t in bucket], out=flat)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view(t.shape))
            offset += t.numel()
    return len(buckets)


def _bits_checksum(t: torch.Tensor) -> int:
    """Sum of the tensor's bytes read as int64 words (wrapping): any single changed word changes
    it, and integer addition is exact and order-free, so it does not depend on thread count.
    A memory pass (~2 ms per 10M fp32 values), far cheaper than gathering the weights."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    whole = raw.numel() // 8 * 8
    try:
        words = raw[:whole].view(torch.int64)
    except RuntimeError:  # storage not 8-byte aligned: an aligned copy
        words = raw[:whole].clone().view(torch.int64)
    total = int(words.sum()) + int(raw[whole:].to(torch.int64).sum())
    return (total + 2**63) % 2**64 - 2**63  # back into int64's range


def replica_tensors(learner) -> list[tuple[str, torch.Tensor]]:
    """Everything that must match across replicas: weights (with the low 16 master bits under
    split masters), the policy optimizer's state, the critic's weights and state, and the frozen
    reference (each replica builds its own)."""
    out: list[tuple[str, torch.Tensor]] = []
    named = list(learner.policy.named_parameters())
    out += [(f"policy.{n}", p) for n, p in named]
    opt = learner.optimizer
    if learner.split_master:
        out += [(f"master_lo.{n}", lo) for (n, _), lo in zip(named, opt.lo, strict=True)]
        states = [(n, opt.state[i]) for i, (n, _) in enumerate(named)]
    else:
        states = [(n, opt.state.get(p, {})) for n, p in named]
    if learner.critic is not None:
        critic = list(learner.critic.named_parameters())
        out += [(f"critic.{n}", p) for n, p in critic]
        states += [(f"critic.{n}", learner.critic_optimizer.state.get(p, {})) for n, p in critic]
    if learner.ref is not None:
        out += [(f"ref.{n}", p) for n, p in learner.ref.named_parameters()]
    for n, state in states:
        out += [(f"optimizer.{n}.{k}", v) for k, v in sorted(state.items()) if isinstance(v, torch.Tensor)]
    return out


def check_replicas_equal(learner, group=None) -> int:
    """Raise ``ReplicaDriftError`` unless every rank holds bit-identical replica tensors.

    One int64 checksum per tensor (``_bits_checksum``), all-gathered: a few KB on the wire
    instead of the weights. Returns the number of tensors checked.
    """
    rank, world = _world(group)
    named = replica_tensors(learner)
    _check_same([len(named), _crc(";".join(n for n, _ in named))], "the replica's tensor names", group)
    mine = torch.tensor([_bits_checksum(t) for _, t in named], dtype=torch.int64)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered)  # [world, tensors]
    differ = (table != table[0]).any(0).nonzero().squeeze(-1).tolist()
    if differ:
        names = ", ".join(named[i][0] for i in differ[:5]) + (f" and {len(differ) - 5} more" if len(differ) > 5 else "")
        ranks = sorted({r for r in range(world) for i in differ if table[r, i] != table[0, i]})
        raise ReplicaDriftError(
            f"data-parallel replicas drifted (seen on rank {rank}): {names} differ between rank 0 and rank(s) "
            f"{ranks}. Gradients must be all-reduced (all_reduce_gradients) before every clip/step, and all ranks "
            f"must run the same torch build with the same torch.set_num_threads; restart from a checkpoint.")
    return len(named)



class DataParallel:
    """This process's place in a data-parallel learner group, and the collectives a training
    loop needs, each timed into ``comm_s``. ``DataParallel.single()`` (world 1) makes every one
    a no-op, so a loop written against it runs unchanged in one process.

        rows = dp.rows(n)                       # this rank's contiguous shard of an n-row batch
        logp = dp.gather_rows(batch, fn)        # fn on my shard, the [n, T] result on every rank
        dp.all_reduce_gradients(learner)        # SUM, before clipping
        total = dp.sum(local_loss)              # a scalar summed over ranks
        means = dp.mean_metrics(sums, counts)   # sums and counts pooled over ranks
    """

    def __init__(self, rank: int = 0, world: int = 1, group=None, cpu_group=None):
        self.rank, self.world, self.group = rank, world, group
        # Everything but the gradients is a small CPU tensor; nccl reduces CUDA tensors only.
        self.cpu_group = cpu_group if cpu_group is not None else group
        self.comm_s = 0.0  # seconds spent in collectives (including waiting for slower ranks)

    @classmethod
    def single(cls) -> "DataParallel":
        return cls()

    @classmethod
    def from_process_group(cls, group=None) -> "DataParallel":
        rank, world = _world(group)
        nccl = dist.get_backend(group) == "nccl"
        return cls(rank, world, group, dist.new_group(backend="gloo") if nccl else None)  # every rank calls this

    def _timed(self, fn: Callable, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.comm_s += time.perf_counter() - t0

    def rows(self, n: int) -> list[int]:
        return shard_rows(n, self.rank, self.world) if self.world > 1 else list(range(n))

    def gather_rows(self, batch, fn: Callable) -> torch.Tensor:
        """``fn(batch.select(my rows))`` -> [n_r, T] on each rank, concatenated in rank order into
        the [n, T] of the whole batch, identical on every rank (all-gather; shards padded to equal size)."""
        if self.world == 1:
            return fn(batch)
        mine = fn(batch.select(torch.tensor(self.rows(len(batch))))).float().contiguous()
        sizes = [len(shard_rows(len(batch), r, self.world)) for r in range(self.world)]
        width = mine.shape[1:]
        padded = torch.zeros((max(sizes), *width))
        padded[: mine.shape[0]] = mine
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        self._timed(dist.all_gather, parts, padded, self.cpu_group)
        return torch.cat([p[:k] for p, k in zip(parts, sizes)])

    def all_reduce_gradients(self, learner) -> int:
        return self._timed(all_reduce_gradients, learner, self.group, BUCKET_MB, self.cpu_group) if self.world > 1 else 0

    def sum(self, value: float) -> float:
        """SUM of a float over ranks (float64; NaN/inf propagate, so every rank sees them)."""
        if self.world == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64)
        self._timed(dist.all_reduce, t, dist.ReduceOp.SUM, self.cpu_group)
        return float(t)

    def mean_metrics(self, sums: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
        """Per-key mean over every record of every rank: sum of sums / sum of counts."""
        keys = sorted(sums)
        if self.world > 1:
            _check_same([len(keys), _crc("\0".join(keys))], f"the metric names {keys}", self.cpu_group)
            t = torch.tensor([[sums[k] for k in keys], [counts[k] for k in keys]], dtype=torch.float64)
            self._timed(dist.all_reduce, t, dist.ReduceOp.SUM, self.cpu_group)
            sums, counts = dict(zip(keys, t[0].tolist())), dict(zip(keys, t[1].tolist()))
        return {k: sums[k] / counts[k] for k in keys}

    def check_replicas_equal(self, learner) -> Optional[int]:
        return self._timed(check_replicas_equal, learner, self.cpu_group) if self.world > 1 else None
