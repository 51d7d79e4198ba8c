"""Data-parallel learners: this process is rank 0, ``distributed.learners - 1`` Ray actors the rest.

    group = LearnerGroup(cfg, learner)          # actors start, join one torch.distributed group, copy rank 0
    metrics = group.learn(rollouts, orders, step, baseline, local=rank0_learn)
    group.check_replicas_equal()                # before rank 0 writes a checkpoint for all
    group.sync(learner, rl_state)               # after a resume: every rank from rank 0's state

Every rank holds a full replica (weights, fp32 masters, optimizer, reference, critic) and runs
``RLUpdate.learn`` on the whole batch: log-prob passes on its rows, all-gathered; its rows of
each mini-batch through forward/backward; gradients SUMmed (gloo on CPU, nccl on CUDA); the same
clip and optimizer step (posttrain.distributed.data_parallel says why that is the one-process
update). The driver keeps sampling, rewards, evaluation and checkpoints: it is rank 0 rather
than a client of M actors, so a one-learner run is the same code with no group, and the
weights the rollout workers get come from where they already are.

Where the actors start from. Each loads ``model.name`` itself (so a reference model is built
locally, as on rank 0), then receives rank 0's exact state through Ray's object store (fp32
masters, optimizer, critic; once at start and after every resume), and a checksum comparison
of every replica tensor proves they agree. On another machine the model source must resolve to
the same weights there (a path on shared storage, or the cached GGUF conversion).

Under ``distributed.strategy=fsdp2`` (posttrain.distributed.fsdp) the ranks start and resume
whole, as above, and shard their state at the start of their first ``learn``. From then on every
full-weight gather is a collective the group runs on every rank at the same point: after each
``learn`` (rank 0 keeps the weights for its rollout engine) and in ``before_checkpoint`` (rank 0
keeps the whole fp32 weights and optimizer state it saves). A sharded group cannot ``sync``:
there is no replica to copy, which is why a resume happens before sharding.

Threads. Replicas stay bit-identical only if every rank computes with the same thread count, so
each rank, this one included, runs ``distributed.cpus_per_learner`` torch threads.

Faults. A learner actor that dies (kill -9, node loss) breaks the collective it was part of: rank
0's gloo call fails at once (the peer's sockets close) or after ``COLLECTIVE_TIMEOUT``. The step
then raises ``LearnerCrashError``: the run stops, its checkpoints stay, and ``posttrain rl
--resume`` restarts every rank from the last one. Restarting one rank mid-step cannot give the
same result, since the others have already moved; there is no in-place recovery.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Callable, Optional

import torch
import torch.distributed as dist

from posttrain.distributed.data_parallel import DataParallel
from posttrain.distributed.ray_pool import check_resources, connect

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)  # a rank that hangs (not one that dies) is detected after this


class LearnerCrashError(RuntimeError):
    """A data-parallel learner rank died or failed; the run must be resumed from a checkpoint."""


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


class LearnerActor:
    """The body of learner rank r >= 1 (wrapped by ``ray.remote`` in ``LearnerGroup``)."""

    def __init__(self, cfg: dict, rank: int, world: int):
        from posttrain.config import RLConfig, from_dict
        from posttrain.models.loading import load_model_and_tokenizer
        from posttrain.rollout.engine import resolve_dtype
        from posttrain.trainers.learner import Learner, resolve_device

        self.cfg = from_dict(RLConfig, cfg)
        self.rank, self.world = rank, world
        tc, alg = self.cfg.trainer, self.cfg.algorithm
        torch.set_num_threads(self.cfg.distributed.cpus_per_learner)
        torch.manual_seed(tc.seed)
        self.device = resolve_device(tc.device)
        model, self.tokenizer = load_model_and_tokenizer(self.cfg.model.name)  # PEAR encodes its closing tag
        self.learner = Learner(model, tc, self.cfg.model, temperature=self.cfg.rollout.temperature,
                               device=self.device, sampler_dtype=resolve_dtype(self.cfg.rollout.dtype, self.device),
                               reference=alg.uses_reference, critic_lr=alg.critic.lr if alg.uses_critic else None,
                               shard=self.cfg.distributed.strategy == "fsdp2")
        self.rl_update = None

    def join(self, address: str, port: int) -> None:
        from posttrain.trainers.rl_update import RLUpdate

        dist.init_process_group(_backend(self.device), init_method=f"tcp://{address}:{port}", rank=self.rank,
                                world_size=self.world, timeout=COLLECTIVE_TIMEOUT)
        self.rl_update = RLUpdate(self.cfg, self.learner, DataParallel.from_process_group(),
                                  tokenizer=self.tokenizer)

    def where(self) -> tuple[int, str]:
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()

    def sync(self, payload: dict, rl_state: Optional[dict]) -> None:
        self.learner.load_replica_state(payload)
        if rl_state is not None:
            self.rl_update.load_state(rl_state)

    def check_replicas_equal(self) -> None:
        self.rl_update.dp.check_replicas_equal(self.learner)

    def gather_full_state(self) -> None:
        self.learner.state_dict()  # fsdp2: this rank's part of the gathers; rank 0 keeps the result

    def learn(self, rollouts, orders, step: int, baseline) -> None:
        try:
            if self.learner.will_shard and self.learner.fsdp is None:
                self.learner.shard()
            self.rl_update.learn(rollouts, orders, step, baseline)
            if self.learner.fsdp is not None:
                self.learner.export_weights()  # the gather rank 0 runs for its rollout engine
        except BaseException:
            # Closing this rank's sockets makes the other ranks' pending collectives fail now
            # rather than at the timeout; the error itself still reaches the driver.
            dist.destroy_process_group()
            raise

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class LearnerGroup:
    """Ranks 1..M-1 as Ray actors; this process is rank 0 (its learner is ``learner``)."""

    def __init__(self, cfg, learner):
        from posttrain.config import to_dict

        dc = cfg.distributed
        self.ray = connect(dc.address)
        check_resources(self.ray, dc, learner_gpus=1 if learner.device.type == "cuda" else 0)
        torch.set_num_threads(dc.cpus_per_learner)  # equal thread counts on every rank: equal bits
        self.world, self.learner = dc.learners, learner
        actor = self.ray.remote(num_cpus=dc.cpus_per_learner, num_gpus=1 if learner.device.type == "cuda" else 0,
                                max_restarts=0)(LearnerActor)
        self.actors = [actor.remote(to_dict(cfg), rank, self.world) for rank in range(1, self.world)]
        address, port = self.ray.util.get_node_ip_address(), _free_port()
        joined = [a.join.remote(address, port) for a in self.actors]
        dist.init_process_group(_backend(learner.device), init_method=f"tcp://{address}:{port}", rank=0,
                                world_size=self.world, timeout=COLLECTIVE_TIMEOUT)
        self._get(joined, "while joining the process group")
        self.dp = DataParallel.from_process_group()
        self.sync(learner, None)

    def _get(self, refs: list, when: str) -> None:
        """Wait for one call per actor (rank = position + 1); a failed one is a ``LearnerCrashError``."""
        for rank, ref in enumerate(refs, 1):
            try:
                self.ray.get(ref)
            except self.ray.exceptions.RayError as exc:
                raise _crash(self.ray, rank, when, exc) from exc

    def sync(self, learner, rl_state: Optional[dict]) -> None:
        """Every actor := rank 0's learner (and RLUpdate) state, then prove it bit for bit."""
        if learner.fsdp is not None:
            raise RuntimeError("a sharded (fsdp2) learner group cannot sync replicas: resume before the first step")
        payload = self.ray.put(learner.replica_state())
        self._get([a.sync.remote(payload, rl_state) for a in self.actors], "while copying rank 0's state")
        self.check_replicas_equal(learner)

    def before_checkpoint(self) -> None:
        """What rank 0 needs before it saves for all: under ddp proof that the replicas agree;
        under fsdp2 (sharded) the whole weights and optimizer state, gathered on every rank."""
        if self.learner.fsdp is None:
            self.check_replicas_equal()
            return
        refs = [a.gather_full_state.remote() for a in self.actors]
        try:
            self.learner.state_dict()  # gathers, and caches what the checkpoint writes
        except Exception:
            self._get(refs, "while gathering the sharded state for a checkpoint")
            raise
        self._get(refs, "while gathering the sharded state for a checkpoint")

    def check_replicas_equal(self, learner=None) -> None:
        refs = [a.check_replicas_equal.remote() for a in self.actors]
        self.dp.check_replicas_equal(learner or self.learner)
        self._get(refs, "while comparing replicas")

    def learn(self, rollouts, orders, step: int, baseline, local: Callable[[], dict]) -> dict:
        """Ranks 1..M-1 learn on ``rollouts`` while ``local()`` (rank 0's RLUpdate.learn) runs here."""
        batch = self.ray.put(rollouts)  # serialised once, before rank 0's pass mutates it
        refs = [a.learn.remote(batch, orders, step, baseline) for a in self.actors]
        try:
            if self.learner.will_shard and self.learner.fsdp is None:  # fsdp2: every rank shards now
                self.learner.shard()
            metrics = local()
            if self.learner.fsdp is not None:
                self.learner.export_weights()  # a gather every rank runs; cached for the rollout engine
        except Exception as local_error:
            # A rank that died or failed explains rank 0's broken collective better than gloo does.
            ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=30)
            for rank, ref in enumerate(refs, 1):
                if ref in ready:
                    try:
                        self.ray.get(ref)
                    except self.ray.exceptions.RayError as remote_error:
                        raise _crash(self.ray, rank, f"during step {step + 1}", remote_error) from local_error
            raise
        self._get(refs, f"during step {step + 1}")
        return metrics

    def where(self) -> list[tuple[int, str]]:
        return self.ray.get([a.where.remote() for a in self.actors])

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
        if dist.is_initialized():
            dist.destroy_process_group()


def _crash(ray, rank: int, when: str, exc: BaseException) -> LearnerCrashError:
    if isinstance(exc, ray.exceptions.RayActorError):  # the process is gone (kill -9, node loss)
        return LearnerCrashError(f"data-parallel learner rank {rank} died {when} ({type(exc).__name__}); the run "
                                 f"stopped. Continue from its last checkpoint with `posttrain rl --resume RUN_DIR`")
    return LearnerCrashError(f"data-parallel learner rank {rank} failed {when}: {exc}")
