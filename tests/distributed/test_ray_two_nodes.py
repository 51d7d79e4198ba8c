"""Rollout workers spread over a simulated two-node Ray cluster (ray.cluster_utils.Cluster)."""

import json

import pytest

ray = pytest.importorskip("ray")

from posttrain.config import load_config  # noqa: E402
from posttrain.distributed import ray_pool  # noqa: E402
from posttrain.trainers.rl_run import train_rl  # noqa: E402


@pytest.mark.slow
def test_workers_on_two_nodes_train(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        pools = []
        original = ray_pool.RayRolloutPool.close

        def remember(self):
            pools.append(self.where())
            original(self)

        monkeypatch.setattr(ray_pool.RayRolloutPool, "close", remember)
        cfg = load_config(None, ["model.name=tiny-random", "rollout.num_prompts=4", "rollout.num_completions=4",
                                 "rollout.max_new_tokens=4", "trainer.steps=2", "trainer.eval_problems=8",
                                 "trainer.threads=1", "distributed.rollout_workers=2",
                                 f"distributed.address={cluster.address}"])
        train_rl(cfg, output_dir=str(tmp_path / "run"), quiet=True)
        rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        nodes = {node for _, node in pools[0]}
        assert len(nodes) == 2  # one 1-CPU worker per node
    finally:
        ray.shutdown()
        cluster.shutdown()
