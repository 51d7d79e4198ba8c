"""``distributed.strategy=fsdp2``: the data-parallel learners shard their state instead of replicating it.

What is sharded. ``torch.distributed.fsdp.fully_shard`` runs once per decoder layer, then on the
whole model (the root: embeddings, final norm, output head). Every parameter becomes a DTensor
of which each of the M ranks keeps one dim-0 chunk, in fp32 (the master weights); the gradients
and the AdamW state (``exp_avg``, ``exp_avg_sq``) are chunked the same way, so a rank's optimizer
memory is ~1/M of a replica's. A layer's full weights exist only while it runs: FSDP all-gathers
them (in ``MixedPrecisionPolicy.param_dtype``, the learner's compute dtype: bf16 compute on fp32
masters, which replaces the Learner's split masters and low-precision copy) before its forward
and again before its backward, and frees them after. What stays whole on every rank: the frozen
reference (a local copy in the compute dtype; its passes are not collectives) and rank 0's
in-process sampling model (a full copy the rollout engine owns, refreshed from the gathered
weights after every step: FSDP's own modules must never run a forward that only one rank runs).

The reduction is a SUM. Each rank's loss is normalised by the whole mini-batch's counts
(posttrain.distributed.data_parallel explains why the SUM of the ranks' gradients is then the
one-process gradient). FSDP's default divides the reduce-scatter by M; here every FSDP module
gets ``set_gradient_divide_factor(1.0)`` and ``set_force_sum_reduction_for_comms(True)`` (gloo has
no PREMUL_SUM), and gradients are reduced in fp32 (``reduce_dtype``).

Lockstep. Every forward and every backward of the sharded model is a sequence of collectives
(one all-gather per layer and the root, plus a reduce-scatter per layer after a backward), so all
ranks must run the same number of passes in the same order. Ranks cut their shard of a batch into
length-bucketed micro-batches independently, so the counts can differ: ``FSDPShards.lockstep``
all-reduces the MAX, and a rank with fewer runs the remainder on a one-row slice of its own rows,
its output discarded (no-grad passes) or its loss multiplied by zero (updates): the collectives
line up and nothing is added. For the same reason, under fsdp2 a micro-batch runs its prompt and
completion through the decoder in one pass (``share_prompts=False``) and the mini-batch-wide
shared prompt pass is off: whether they pay depends on a rank's rows. Gathering full weights (for
the rollout engine after each step, for a checkpoint) is a collective too, which the
LearnerGroup runs on every rank at the same points (trainers.learner_group).

Resume and start. A learner is built whole; it loads a checkpoint (rank 0) and is synced to the
other ranks whole, exactly as under ddp; only then, before its first update, every rank shards
it (``shard_learner``): a full optimizer state is cut into chunks locally, no communication.

Not supported under fsdp2 (config errors): one learner (nothing to shard over; use ddp), a critic
(PPO's value model is a second model to shard). Activation checkpointing composes (FSDP re-gathers
a layer for the recomputation; checked by hand on 2 ranks, not in the test suite). The
``POSTTRAIN_TEST_KILL_AT=optimizer_step`` crash hook patches the optimizer that sharding replaces.

Measured (tests/distributed/test_fsdp2.py, fp32, tiny model, 2 gloo ranks): gradient norms equal
to the one-process ones, weights after two AdamW steps within ~1e-6 relative (FSDP's per-tensor
AdamW vs the fused one, and the summation order), each rank holding 88,768 of the 177,408
optimizer-state elements. Speed and memory: benchmarks/fsdp2_compare.py (one run each on 2
shared CPU cores, noisy): on the tiny model 1 learner 0.57 s/step, 2 ddp learners 0.32, 2 fsdp2
learners 0.41; optimizer state per rank 0.85 MB (ddp: fp32 moments plus split-master low bits)
against 0.34 MB (fsdp2: half the moments; the fp32 master half lives in the parameters).
SmolLM2-135M (examples/arithmetic.yaml, 4 steps, the machine loaded by other jobs, load ~5-6):
1 learner 50.6 s/step, 2 ddp learners 20.8 s/step with 1283 MB of optimizer state per rank; the
fsdp2 run trained and checkpointed its 4 steps but was cut by the benchmark's time limit before
its row was printed (by construction its moments are ~1/2 per rank, as measured above).
FSDP's cost on CPU: every layer is all-gathered twice per micro-batch (forward and backward),
the gradients reduce-scattered after every backward, and the prompt-sharing passes are off.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

COMPUTE_CALL = "posttrain_call"  # the root method every sharded pass runs through


def _fsdp():
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    return FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class FSDPShards:
    """A learner's sharding: its process group, the lockstep counter and the gathered-weights cache."""

    def __init__(self, group=None):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.steps = 0  # optimizer steps since sharding: what the caches are valid for
        self._weights: Optional[tuple[int, torch.dtype, dict]] = None
        self._state: Optional[tuple[int, dict]] = None

    def lockstep(self, count: int) -> int:
        """The MAX over ranks of ``count`` (passes this rank is about to run)."""
        t = torch.tensor([count], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t)

    def full_weights(self, model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Every parameter whole, in ``dtype`` (cast on the shard, then all-gathered: a
        collective every rank runs). Cached until the next optimizer step."""
        if self._weights is None or self._weights[:2] != (self.steps, dtype):
            with torch.no_grad():
                weights = {n: _full(p.detach().to(dtype)) for n, p in model.named_parameters()}
            self._weights = (self.steps, dtype, weights)
        return self._weights[2]

    def full_state(self, learner) -> dict:
        """fp32 weights and the optimizer's state_dict, whole (collectives); cached per step."""
        if self._state is None or self._state[0] != self.steps:
            weights = self.full_weights(learner.policy, torch.float32)
            osd = learner.optimizer.state_dict()
            with torch.no_grad():
                state = {i: {k: _full(v) if isinstance(v, torch.Tensor) else v for k, v in sorted(s.items())}
                         for i, s in sorted(osd["state"].items())}
            self._state = (self.steps, {"weights": weights, "optimizer": {**osd, "state": state}})
        return self._state[1]


def _sum_reduction(model) -> None:
    FSDPModule = _fsdp()[0]
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def shard_model(model, compute_dtype: torch.dtype, mesh=None) -> None:
    """fully_shard each decoder layer, then the root, with SUM reduction; register the lean
    decoder's per-layer call and the root's ``posttrain_call`` as FSDP forwards."""
    from posttrain.models.fast_decoder import hookable_layer_calls

    _, MixedPrecisionPolicy, fully_shard, register = _fsdp()
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    decoder = model.get_decoder()
    hookable_layer_calls(decoder)
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
        register(layer, "lean_forward")
    model.posttrain_call = lambda fn, *args, **kwargs: fn(*args, **kwargs)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    register(model, COMPUTE_CALL)
    _sum_reduction(model)


def shard_learner(learner, group=None) -> FSDPShards:
    """Shard a whole learner in place (every rank at once, same state): the model, then a new
    AdamW on the DTensor parameters that takes the old one's state, cut into this rank's chunks."""
    from torch.distributed.tensor import distribute_tensor

    if learner.critic is not None:
        raise ValueError("distributed.strategy=fsdp2 does not shard a critic; use distributed.strategy=ddp")
    old = learner.optimizer
    full = old.state_dict()
    shard_model(learner.policy, learner.dtype)
    params = list(learner.policy.parameters())
    hyper = {k: v for k, v in full["param_groups"][0].items() if k in ("lr", "betas", "eps", "weight_decay")}
    optimizer = torch.optim.AdamW(params, foreach=False, **hyper)
    for i, s in full["state"].items():  # a whole tensor shaped like its weight -> this rank's chunk of it
        p = params[i]
        optimizer.state[p] = {k: distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
                              if isinstance(v, torch.Tensor) and v.shape == p.shape else v for k, v in s.items()}
    learner.optimizer = optimizer
    learner.model = learner.policy
    shards = FSDPShards(group)
    learner.fsdp = shards
    return shards


class WholeWeights:
    """A sharded model seen with whole weights, for ``RunDir.save_checkpoint``'s ``save_pretrained``."""

    def __init__(self, model, weights: dict[str, torch.Tensor]):
        self.model, self.weights = model, weights

    def save_pretrained(self, path, **kwargs) -> None:
        self.model.save_pretrained(path, state_dict=self.weights, **kwargs)


def local_numel(optimizer) -> tuple[int, int]:
    """(elements of this rank's optimizer-state tensors, elements of the full ones)."""
    mine = whole = 0
    for s in optimizer.state.values():
        for v in s.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                mine += _local(v).numel()
                whole += v.numel()
    return mine, whole

