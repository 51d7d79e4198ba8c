"""Rollout workers on Ray, behind the Sampler contract (rollout/sampler.py).

    pool = RayRolloutPool(cfg, tokenizer, learner_weights, dtype)  # starts or joins a cluster, N actors
    handle = pool.submit(problems, n, params, generator)           # returns at once: workers sample
    rollouts = pool.result(handle)                                 # in problem order, rewards scored
    pool.load_weights(weights, version)                            # one object-store put, every worker loads

Each worker is a Ray actor that loads the model itself (``model.name``), samples with its own
engine (``rollout.engine``: hf or vllm) in the rollout dtype, and scores its groups with the
configured reward where it runs (so a code sandbox runs on the worker's machine). A step's
problems are cut into contiguous chunks, one per worker, so every group stays on one worker.

Determinism. Each chunk samples from its own generator seeded from the trainer's generator, so
a run is reproducible for a seed and worker count; it differs from the single-process run,
whose one generator walks the whole batch (same distribution, other draws).

Faults. A worker whose process dies (``RayActorError``: kill -9, node loss) is replaced by a
new actor that loads the current weights, and its chunk is re-issued with the same seed: the
step gets the rollouts it would have had, nothing lost and nothing counted twice.

Ordering. A Ray actor runs its calls one at a time in submission order, so a weight push
queued behind an in-flight ``generate`` applies after it: with ``max_staleness`` k the trainer
keeps up to k batches in flight and every rollout records the version it was sampled with.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from posttrain.rollout.batch import Rollouts
from posttrain.rollout.sampler import SamplingParams
from posttrain.tasks.base import Problem


class RayUnavailableError(RuntimeError):
    """Ray is missing, the cluster does not answer, or it lacks the resources asked for."""


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailableError("distributed.rollout_workers and distributed.learners > 1 need Ray: "
                                  "pip install -e '.[ray]'") from exc
    return ray


def _check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail fast on a ``host:port`` nothing listens on (ray.init would retry for minutes)."""
    hostport = address.removeprefix("ray://")
    if address == "auto" or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as exc:
        raise RayUnavailableError(f"distributed.address={address!r}: nothing answers there ({exc}); start the head "
                                  f"with `ray start --head` or fix the address") from exc


def connect(address: Optional[str]):
    """Join the cluster at ``address`` (``auto``, ``host:port``, ``ray://host:port``) or start a
    local one from this machine's CPUs. Re-uses a connection this process already has."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address:
        _check_reachable(address)
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    return ray


def check_resources(ray, dc, learner_gpus: int = 0) -> None:
    """The cluster must hold every actor this config asks for, or the missing ones would wait
    for resources forever: rollout workers x cpus_per_worker, plus the learners beyond this
    process (rank 0) x cpus_per_learner CPUs and ``learner_gpus`` GPUs each."""
    have = ray.cluster_resources()
    workers, learners = dc.rollout_workers * dc.cpus_per_worker, (dc.learners - 1) * dc.cpus_per_learner
    if workers + learners > have.get("CPU", 0):
        raise RayUnavailableError(
            f"distributed.rollout_workers={dc.rollout_workers} x cpus_per_worker={dc.cpus_per_worker} + "
            f"(distributed.learners={dc.learners} - 1) x cpus_per_learner={dc.cpus_per_learner} = "
            f"{workers + learners} CPUs, but the Ray cluster has {have.get('CPU', 0):g}; lower them or add nodes")
    if learner_gpus and (dc.learners - 1) * learner_gpus > have.get("GPU", 0):
        raise RayUnavailableError(
            f"distributed.learners={dc.learners} on CUDA needs {dc.learners - 1} GPU(s) for the learner actors "
            f"(rank 0 uses this process's), but the Ray cluster has {have.get('GPU', 0):g}")


@dataclass
class _Chunk:
    """One worker's share of a submitted batch: enough to re-issue it identically."""

    worker: int
    problems: list
    n: int
    params: SamplingParams
    seed: int
    score: bool
    ref: Any = None
    actor: Any = None  # the actor it was issued to (a dead one is replaced once, not once per chunk)


class RolloutWorker:
    """The body of one rollout actor (wrapped by ``ray.remote`` in ``RayRolloutPool``)."""

    def __init__(self, model_name: str, rollout: dict, model_cfg: dict, reward: dict, on_reward_error: str,
                 dtype: str, threads: int, seed: int):
        torch.set_num_threads(max(1, threads))
        from posttrain.config import ModelConfig, RolloutConfig, from_dict
        from posttrain.models.loading import load_model_and_tokenizer
        from posttrain.rewards.registry import build_reward
        from posttrain.rollout.sampler import build_engine

        self.rollout_cfg = from_dict(RolloutConfig, rollout, "rollout")
        model, tokenizer = load_model_and_tokenizer(model_name)
        torch_dtype = getattr(torch, dtype)
        model = model.to(torch_dtype)  # sampling weights only: no fp32 copy kept on the worker
        self.engine = build_engine(self.rollout_cfg, from_dict(ModelConfig, model_cfg, "model"), model, tokenizer,
                                   torch_dtype, seed)
        self.reward = build_reward(reward, tokenizer=tokenizer)
        self.on_reward_error = on_reward_error

    def where(self) -> tuple[int, str]:
        """(process id, Ray node id): which process and machine this worker runs on."""
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()

    def generate(self, problems: list[Problem], n: int, params: SamplingParams, seed: int, score: bool):
        from posttrain.rewards.errors import score_rollouts

        t0 = time.perf_counter()
        rollouts = self.engine.generate(problems, n, params, torch.Generator().manual_seed(seed),
                                        share_prefill=self.rollout_cfg.share_prompt_prefill)
        errors = score_rollouts(rollouts, self.reward, self.on_reward_error) if score else []
        return rollouts, errors, dict(self.engine.last_stats, worker_wall_s=time.perf_counter() - t0)

    def load_weights(self, weights: Mapping[str, torch.Tensor], version: int) -> None:
        self.engine.load_weights(weights, version)

    def close(self) -> None:
        self.engine.close()


class RayRolloutPool:
    """N Ray rollout actors as one Sampler. ``generate`` = ``result(submit(...))``. It has no
    ``encode``: the trainer checks every prompt against the context before the pool starts."""

    def __init__(self, cfg, tokenizer, weights: Mapping[str, torch.Tensor], dtype: torch.dtype):
        dc = cfg.distributed
        self.ray = connect(dc.address)
        check_resources(self.ray, dc)
        self.tokenizer = tokenizer
        self.wait_for_weights = dc.max_staleness == 0  # asynchronous: pushes overlap sampling
        self._actor = self.ray.remote(num_cpus=dc.cpus_per_worker, max_restarts=0)(RolloutWorker)
        self._args = (cfg.model.name, asdict(cfg.rollout), asdict(cfg.model), cfg.reward, cfg.trainer.on_reward_error,
                      str(dtype).removeprefix("torch."), int(dc.cpus_per_worker), cfg.trainer.seed)
        self.workers = [self._actor.remote(*self._args) for _ in range(dc.rollout_workers)]
        self.policy_version = 0
        self.restarts = 0
        self.last_stats: dict[str, float] = {}
        self.last_reward_errors: list[dict] = []
        self._weights_ref = None
        self.load_weights(weights, 0)  # the learner's weights, whatever the workers loaded

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: Mapping[str, torch.Tensor], version: int) -> None:
        """One put into the object store; each worker loads it after the calls queued before it.
        Asynchronous training (max_staleness >= 1) returns at once: the load overlaps sampling."""
        t0 = time.perf_counter()
        self._weights_ref = self.ray.put({k: v.detach().cpu() for k, v in weights.items()})
        self.policy_version = version
        pending = [w.load_weights.remote(self._weights_ref, version) for w in self.workers]
        if self.wait_for_weights or version == 0:
            for i, ref in enumerate(pending):
                try:
                    self.ray.get(ref)
                except self.ray.exceptions.RayActorError:
                    self._replace(i)  # the new actor starts from the current weights
        self.last_stats["sync_s"] = time.perf_counter() - t0

    def _replace(self, i: int) -> None:
        self.workers[i] = self._actor.remote(*self._args)
        self.restarts += 1
        self.ray.get(self.workers[i].load_weights.remote(self._weights_ref, self.policy_version))

    # ------------------------------------------------------------------ sampling
    def submit(self, problems: Sequence[Problem], n: int, params: SamplingParams,
               generator: Optional[torch.Generator] = None, score: bool = True) -> list[_Chunk]:
        """Start sampling; returns a handle for ``result``. Chunks are contiguous by problem."""
        k = len(self.workers)
        bounds = [round(i * len(problems) / k) for i in range(k + 1)]
        device = generator.device if generator is not None else "cpu"
        handle = []
        for i in range(k):
            if bounds[i] == bounds[i + 1]:
                continue
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
            chunk = _Chunk(i, list(problems[bounds[i]:bounds[i + 1]]), n, params, seed, score)
            self._issue(chunk)
            handle.append(chunk)
        return handle

    def _issue(self, c: _Chunk) -> None:
        c.actor = self.workers[c.worker]
        c.ref = c.actor.generate.remote(c.problems, c.n, c.params, c.seed, c.score)

    def result(self, handle: list[_Chunk]) -> Rollouts:
        """Wait for a submitted batch; a dead worker is replaced and its chunk re-issued."""
        t0 = time.perf_counter()
        parts, errors, walls = [], [], []
        for c in handle:
            while True:
                try:
                    rollouts, errs, stats = self.ray.get(c.ref)
                    break
                except self.ray.exceptions.RayActorError:
                    if self.workers[c.worker] is c.actor:  # not yet replaced for an earlier chunk
                        self._replace(c.worker)
                    self._issue(c)
            parts.append(rollouts)
            errors += errs
            walls.append(stats["worker_wall_s"])
        out = Rollouts.concat(parts)
        tokens, wall = float(out.completion_mask.sum()), max(walls)
        self.last_reward_errors = errors
        self.last_stats.update(gen_wall_s=wall, gen_tokens=tokens, gen_tok_per_s=tokens / max(wall, 1e-9),
                               wait_s=time.perf_counter() - t0, restarts=float(self.restarts))
        return out

    def generate(self, problems: Sequence[Problem], n: int, params: SamplingParams,
                 generator: Optional[torch.Generator] = None, share_prefill: bool = True) -> Rollouts:
        return self.result(self.submit(problems, n, params, generator))

    def release_memory(self) -> None:
        """Nothing to free in the trainer's process: each worker's engine lives in its own, and
        asynchronous workers go on sampling while the learner learns."""

    def where(self) -> list[tuple[int, str]]:
        """(pid, node id) of every worker."""
        return self.ray.get([w.where.remote() for w in self.workers])

    def close(self) -> None:
        for w in self.workers:
            self.ray.kill(w)
        self.workers = []
