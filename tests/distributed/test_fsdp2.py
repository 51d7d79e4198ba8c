"""``distributed.strategy=fsdp2``. First two spawned gloo ranks driving sharded Learners directly,
on shards of unequal size so that their micro-batch counts differ (the lockstep passes); then the
RL loop on a real local Ray cluster: rank 0 is the driver, rank 1 a Ray actor, both sharding the
tiny model with ``fully_shard``. Two sharded learners must train like one learner; each must hold
about half the optimizer state; a learner killed with SIGKILL must stop the run, and --resume
(which loads whole, then shards) must finish it bit-identically to an uninterrupted fsdp2 run."""

import datetime
import json
import os
import signal
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from posttrain.config import ConfigError, load_config

ray = pytest.importorskip("ray")

from posttrain.distributed.fsdp import local_numel  # noqa: E402
from posttrain.trainers import rl  # noqa: E402
from posttrain.trainers.learner_group import LearnerCrashError  # noqa: E402
from posttrain.trainers.rl_run import train_rl  # noqa: E402

# As test_learner_group's FP32: fp32 so that one and two learners differ only by summation order,
# two mini-batches (old log-probs recomputed: a sharded pass in lockstep) and a KL reference.
FP32 = ["model.name=tiny-random", "task.max_operand=20", "reward={type: format, pattern: '^[0-9]', match: search}",
        "rollout.num_prompts=8", "rollout.num_completions=4", "rollout.max_new_tokens=4", "trainer.lr=3e-3",
        "trainer.eval_problems=16", "trainer.micro_batch_size=4", "trainer.mini_batches=2",
        "algorithm.kl.coef=0.05", "trainer.autocast=none", "rollout.dtype=float32", "distributed.cpus_per_learner=1"]
FSDP2 = ["distributed.learners=2", "distributed.strategy=fsdp2"]


@pytest.fixture(scope="module")
def local_cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


# ---------------------------------------------------------------------------- spawned ranks
SPLIT = 11  # rank 0 trains on rows [0, 11), rank 1 on [11, 16): 4 vs 2 micro-batches of <= 3 rows


def _learner(shard: bool):
    from posttrain.models.tiny import tiny_model_and_tokenizer
    from posttrain.trainers.learner import Learner

    cfg = load_config(None, ["trainer.micro_batch_size=3", "trainer.lr=1e-3", "rollout.max_new_tokens=16",
                             "trainer.autocast=none", "rollout.dtype=float32"])
    model, _ = tiny_model_and_tokenizer(seed=1)
    return Learner(model, cfg.trainer, cfg.model, temperature=1.0, device=torch.device("cpu"),
                   sampler_dtype=torch.float32, reference=True, shard=shard), cfg


def _two_steps(learner, cfg, batch, counts) -> list[float]:
    from test_data_parallel import _loss_fn

    norms = []
    for _ in range(2):
        learner.zero_grad()
        learner.forward_backward(batch, _loss_fn(cfg, "token-mean", counts))
        norms.append(learner.clip_grad_norm())
        learner.optim_step(1.0)
    return norms


def _rank_main(rank: int, world: int, port: int, batch, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        from test_data_parallel import _local_counts

        from posttrain.distributed.data_parallel import global_counts

        mine = batch.select(torch.arange(SPLIT) if rank == 0 else torch.arange(SPLIT, len(batch)))
        counts = global_counts(_local_counts(mine))
        learner, cfg = _learner(shard=True)
        learner.shard()
        logp = learner.logprobs(mine)
        norms = _two_steps(learner, cfg, mine, counts)
        weights = learner.export_weights()  # a collective on both ranks
        optimizer = learner.state_dict()["optimizer"]  # whole, gathered on both ranks
        if rank == 0:
            torch.save({"logp": logp, "norms": norms, "weights": weights, "optimizer": optimizer,
                        "numel": local_numel(learner.optimizer)}, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def test_sharded_learners_with_unequal_micro_batch_counts_match_one_learner(tmp_path, monkeypatch):
    from test_data_parallel import _batch, _local_counts

    from posttrain.trainers.learner import length_buckets

    batch = _batch()
    counts = [len(length_buckets(b, 3, 0)) for b in (batch.select(torch.arange(SPLIT)),
                                                      batch.select(torch.arange(SPLIT, len(batch))))]
    assert counts[0] != counts[1]  # rank 1 must run zero-weight passes to stay in lockstep
    monkeypatch.syspath_prepend(os.path.dirname(__file__))  # the spawned ranks import test_data_parallel
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank_main, args=(2, _free_port(), batch, str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=False)
    learner, cfg = _learner(shard=False)
    logp = learner.logprobs(batch.select(torch.arange(SPLIT)))
    assert torch.allclose(got["logp"], logp, rtol=1e-5, atol=1e-6)
    norms = _two_steps(learner, cfg, batch, _local_counts(batch))
    assert got["norms"] == pytest.approx(norms, rel=1e-5)
    for name, w in learner.policy.named_parameters():
        w = w.detach()
        assert float((got["weights"][name] - w).norm() / w.norm()) < 1e-5, name
    whole = learner.optimizer.state_dict()["state"]
    for i, state in whole.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(got["optimizer"]["state"][i][key], state[key], rtol=1e-4, atol=1e-9), (i, key)
    mine, full = got["numel"]
    assert full == 2 * sum(p.numel() for p in learner.policy.parameters()) and mine < 0.6 * full


# ---------------------------------------------------------------------------- the RL loop with Ray actors
def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run, step):
    from safetensors.torch import load_file

    return load_file(run / "checkpoints" / f"step_{step}" / "model.safetensors")


@pytest.mark.parametrize("overrides, match", [
    (["distributed.strategy=fsdp2"], r"distributed\.strategy fsdp2 .*needs distributed\.learners >= 2.*strategy=ddp"),
    (FSDP2 + ["algorithm.advantage_estimator=gae"], r"distributed\.strategy fsdp2 does not shard a critic.*gae"),
    (["distributed.strategy=zero3"], r"distributed\.strategy must be ddp or fsdp2"),
])
def test_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_default_strategy_is_ddp():
    assert load_config(None, []).distributed.strategy == "ddp"


def test_fsdp2_learners_make_the_one_learner_update_with_half_the_optimizer_state(local_cluster, tmp_path,
                                                                                  monkeypatch):
    numels = []
    original = rl.RLTrainer.save_checkpoint

    def recording_save(self):
        if self.learner_group is not None:  # after step 2: rank 0's and rank 1's optimizer shards
            numels.append(local_numel(self.learner.optimizer))
            actor = self.learner_group.actors[0]
            numels.append(ray.get(actor.__ray_call__.remote(lambda a: local_numel(a.learner.optimizer))))
        return original(self)

    monkeypatch.setattr(rl.RLTrainer, "save_checkpoint", recording_save)
    one, two = tmp_path / "one", tmp_path / "two"
    train_rl(load_config(None, FP32 + ["trainer.steps=2", "distributed.learners=1"]), output_dir=str(one), quiet=True)
    train_rl(load_config(None, FP32 + ["trainer.steps=2"] + FSDP2), output_dir=str(two), quiet=True)
    a, b = _rows(one), _rows(two)
    assert a[0]["reward/mean"] == b[0]["reward/mean"]  # the same rollouts at step 1
    for key in ("loss/total", "grad_norm", "kl/mean"):
        assert b[0][key] == pytest.approx(a[0][key], rel=1e-5, abs=1e-7), key
    assert b[1]["reward/mean"] == a[1]["reward/mean"]  # step 2 sampled from the gathered weights
    wa, wb = _weights(one, 2), _weights(two, 2)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    rel = max(float((wa[k] - wb[k]).norm() / wa[k].norm()) for k in wa)
    assert worst < 1e-5 and rel < 1e-5, (worst, rel)
    # Each rank holds its chunk of exp_avg and exp_avg_sq: about half of the whole.
    assert len(numels) == 2
    full = sum(p.numel() for p in wa.values()) * 2  # two state tensors per weight
    for mine, whole in numels:
        assert whole == full and mine < 0.6 * full, (mine, whole, full)
    assert numels[0][0] + numels[1][0] >= full  # the chunks cover everything (dim-0 padding aside)


def test_a_killed_fsdp2_learner_stops_the_run_and_resume_finishes_it_identically(local_cluster, tmp_path,
                                                                                   monkeypatch):
    overrides = FP32 + FSDP2 + ["trainer.steps=4", "trainer.checkpoint_every=1"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train_rl(load_config(None, overrides), output_dir=str(straight), quiet=True)

    original = rl.RLTrainer.train_step

    def killing_step(self):
        if self.step == 2:  # at the start of step 3: SIGKILL rank 1's process
            os.kill(self.learner_group.where()[0][0], signal.SIGKILL)
        return original(self)

    monkeypatch.setattr(rl.RLTrainer, "train_step", killing_step)
    with pytest.raises(LearnerCrashError, match=r"learner rank 1 died during step 3.*--resume.*step_2"):
        train_rl(load_config(None, overrides), output_dir=str(crashed), quiet=True)
    assert [r["step"] for r in _rows(crashed)] == [1, 2]
    monkeypatch.setattr(rl.RLTrainer, "train_step", original)
    # The resumed ranks load step 2 whole, sync, and shard before step 3.
    train_rl(load_config(crashed / "config.yaml"), output_dir=str(crashed), resume=True, quiet=True)
    assert [r["step"] for r in _rows(crashed)] == [1, 2, 3, 4]
    a, b = _weights(straight, 4), _weights(crashed, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss/total"] for r in _rows(crashed)] == [r["loss/total"] for r in _rows(straight)]
    sa = torch.load(straight / "checkpoints" / "step_4" / "trainer_state.pt", weights_only=False)["optimizer"]
    sb = torch.load(crashed / "checkpoints" / "step_4" / "trainer_state.pt", weights_only=False)["optimizer"]
    for i, state in sa["state"].items():  # whole optimizer state, saved by rank 0, the same bits
        assert all(torch.equal(v, sb["state"][i][k]) for k, v in state.items())
