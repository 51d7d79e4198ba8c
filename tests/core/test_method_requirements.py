"""Methods that need something (a reference model, token rewards) get it or fail in config,
never at step 1 (issue 19's defects)."""

import pytest

from posttrain.config import ConfigError, load_config
from posttrain.trainers.rl_run import train_rl

TINY = ["model.name=tiny-random", "rollout.num_prompts=2", "rollout.num_completions=2", "rollout.max_new_tokens=4",
        "trainer.eval_problems=4", "trainer.threads=1", "trainer.steps=1"]


def test_pure_without_process_rewards_is_a_config_error():
    with pytest.raises(ConfigError, match="pure needs per-step process rewards"):
        load_config(None, TINY + ["algorithm.advantage_estimator=pure"])


def test_kl_in_reward_with_a_zero_coefficient_is_a_config_error():
    with pytest.raises(ConfigError, match="algorithm.kl.in_reward needs algorithm.kl.coef > 0"):
        load_config(None, TINY + ["algorithm.advantage_estimator=reinforce_plus_plus", "algorithm.kl.in_reward=true"])


def test_ace_loads_the_reference_it_needs_and_trains(tmp_path):
    cfg = load_config(None, TINY + ["algorithm.advantage_estimator=ace"])
    assert cfg.algorithm.uses_reference and cfg.algorithm.kl.coef == 0
    summary = train_rl(cfg, output_dir=str(tmp_path / "run"), quiet=True)  # failed at step 1 before
    assert summary["steps"] == 1


def test_gdpo_without_a_composite_reward_or_components_is_a_config_error():
    with pytest.raises(ConfigError, match="gdpo needs a composite reward"):
        load_config(None, TINY + ["algorithm.advantage_estimator=gdpo", "reward={type: numeric}"])
    composite = "reward={type: composite, parts: [{type: numeric}, {type: format, pattern: '^[0-9]'}]}"
    assert load_config(None, TINY + ["algorithm.advantage_estimator=gdpo", composite])
