import pytest
import yaml

from posttrain.config import ConfigError, RLConfig, dump_config, load_config


def write(tmp_path, data):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_overrides(tmp_path):
    path = write(tmp_path, {"trainer": {"lr": 1e-5}, "rollout": {"num_completions": 4}})
    cfg = load_config(path, ["trainer.lr=3e-5", 'rollout.stop=["\\n"]', "algorithm.kl.coef=0.01"])
    assert isinstance(cfg, RLConfig)
    assert cfg.trainer.lr == 3e-5
    assert cfg.rollout.num_completions == 4
    assert cfg.rollout.stop == ["\n"]
    assert cfg.algorithm.kl.coef == 0.01
    assert cfg.algorithm.uses_reference


def test_int_accepted_for_float_but_not_bool_for_int(tmp_path):
    cfg = load_config(None, ["trainer.lr=1"])
    assert cfg.trainer.lr == 1.0 and isinstance(cfg.trainer.lr, float)
    with pytest.raises(ConfigError, match="trainer.steps must be int"):
        load_config(None, ["trainer.steps=true"])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("trainer.lrr=1e-5", r"unknown config key 'trainer.lrr'.*allowed keys here: .*lr"),
        ("trainer.lr=fast", r"trainer.lr must be float, got 'fast'"),
        ("trainer.lr=-1", r"trainer.lr must be > 0"),
        ("rollout.temperature=0", r"rollout.temperature must be > 0"),
        ("rollout.top_p=1.5", r"rollout.top_p must be in \(0, 1\]"),
        ("algorithm.advantage_estimator=nope", r"algorithm.advantage_estimator must be one of .*grpo"),
        ("algorithm.aggregation=mean", r"algorithm.aggregation must be one of"),
        ("algorithm.loss.clip_low=-0.1", r"algorithm.loss.clip_low"),
        ("algorithm.kl.estimator=k9", r"algorithm.kl.estimator"),
        ("trainer.lr_schedule=step", r"trainer.lr_schedule must be one of 'constant', 'linear', 'cosine'"),
        ("trainer.mini_batches=3", r"trainer.mini_batches must divide the batch of 64"),
        ("model=tiny", r"model must be ModelConfig"),
        ("nonsense", r"must look like key.path=value"),
    ],
)
def test_bad_values_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_unknown_top_level_key_in_file(tmp_path):
    path = write(tmp_path, {"trainr": {"lr": 1e-5}})
    with pytest.raises(ConfigError, match="unknown config key 'trainr'"):
        load_config(path)


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(lst)


def test_dump_round_trip(tmp_path):
    cfg = load_config(None, ["trainer.steps=7", "rollout.stop=['###']", "algorithm.correction.name=tis_token"])
    dump_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg


@pytest.mark.parametrize(
    "override",
    ["trainer.lr=.inf", "trainer.lr=-.inf", "trainer.lr=.nan", "trainer.lr=1e999", "trainer.lr=" + "9" * 400,
     "algorithm.loss.dual_clip=.inf", "trainer.adam_betas=[.nan, 0.9]", "algorithm.kl.target=.nan"],
)
def test_non_finite_floats_are_rejected(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}(\[0\])? must be a finite number"):
        load_config(None, [override])


def test_finite_float_spellings_still_accepted():
    cfg = load_config(None, ["trainer.lr=3e-5", "trainer.weight_decay=1", "algorithm.loss.dual_clip=3"])
    assert cfg.trainer.lr == 3e-5 and cfg.trainer.weight_decay == 1.0 and cfg.algorithm.loss.dual_clip == 3.0


def test_regularizer_configs_reject_non_finite_values():
    from posttrain.algorithms.regularizers import EntropyConfig, KLConfig

    for kwargs in ({"coef": float("nan")}, {"coef": float("inf")}, {"target": float("inf")}):
        with pytest.raises(ValueError, match="algorithm.kl.* must be a finite number"):
            KLConfig(**kwargs)
    for name in ("coef", "target", "delta", "coef_min", "coef_max", "top_quantile"):
        with pytest.raises(ValueError, match=f"algorithm.entropy.{name} must be a finite number"):
            EntropyConfig(**{name: float("nan")})
    assert KLConfig(coef=0.1, target=6.0).target == 6.0


def test_yaml_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["trainer.adam_betas=[0.9"])
    assert "\n" not in str(info.value) and "trainer.adam_betas" in str(info.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "\n" not in str(info.value) and "bad.yaml" in str(info.value)


def test_unreadable_config_files_are_named(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("model:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8"):
        load_config(latin1)
    deep = tmp_path / "deep.yaml"
    deep.write_text("task: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n")
    with pytest.raises(ConfigError, match=r"deep.yaml is nested too deeply"):
        load_config(deep)


def test_long_override_is_shortened_in_the_message():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["trainer.lr=" + "[" * 5000])
    assert "trainer.lr=[[[" in str(info.value) and len(str(info.value)) < 200


def test_free_form_sections_reject_cycles_and_keep_shared_aliases(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("reward:\n  type: numeric\n  opts: &o {a: 1, again: *o}\n")
    with pytest.raises(ConfigError, match=r"reward\.opts\.again refers to itself"):
        load_config(path)
    path.write_text("task:\n  name: arithmetic\n  x: &x {a: [1]}\n  y: *x\n")
    cfg = load_config(path)
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
