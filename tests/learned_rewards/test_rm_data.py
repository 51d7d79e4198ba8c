"""Preference data and RMConfig errors: each names the file and line or the config key."""

import json

import pytest

from posttrain.config import ConfigError, load_config
from posttrain.trainers.reward_model import PreferenceDataError, RMConfig, load_preferences

GOOD = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})


def _write(tmp_path, lines):
    p = tmp_path / "prefs.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ('{"prompt": "q", "chosen": "a"', "not valid JSON"),
        ('["q", "a", "b"]', "expected a JSON object"),
        ('{"prompt": "q", "chosen": "a"}', "missing key(s) ['rejected']"),
        ('{"prompt": "q", "chosen": 3, "rejected": "b"}', "'chosen' must be a string"),
        ('{"prompt": 5, "chosen": "a", "rejected": "b"}', "'prompt' must be a string or"),
        ('{"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}', "'prompt' must be a string or"),
        ('{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}', "'margin' must be a finite number"),
    ],
)
def test_bad_line_is_named(tmp_path, bad, fragment):
    path = _write(tmp_path, [GOOD, "", bad, GOOD])  # the blank line still counts: bad is line 3
    with pytest.raises(PreferenceDataError) as exc:
        load_preferences(path)
    assert f"{path}:3:" in str(exc.value)
    assert fragment in str(exc.value)


def test_good_file_with_messages_and_margin(tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    path = _write(tmp_path, [GOOD, json.dumps({"prompt": msgs, "chosen": "4", "rejected": "5", "margin": 2})])
    pairs = load_preferences(path)
    assert [p.margin for p in pairs] == [None, 2.0]
    assert pairs[1].prompt == msgs and pairs[1].source == f"{path}:2"


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(PreferenceDataError, match="does not exist"):
        load_preferences(tmp_path / "nope.jsonl")
    empty = _write(tmp_path, [""])
    with pytest.raises(PreferenceDataError, match="holds no pairs"):
        load_preferences(empty)


def test_rm_config_from_yaml_and_overrides(tmp_path):
    cfg_path = tmp_path / "rm.yaml"
    cfg_path.write_text("model: tiny-random\ndata: prefs.jsonl\nlr: 3e-5\nepochs: 2\n")
    cfg = load_config(cfg_path, ["batch_size=4", "center_rewards_coefficient=0.01"], cls=RMConfig)
    assert isinstance(cfg, RMConfig)
    assert cfg.lr == 3e-5 and cfg.epochs == 2 and cfg.batch_size == 4 and cfg.center_rewards_coefficient == 0.01


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["data=p.jsonl", "eval_fraction=1.5"], "eval_fraction must be in [0, 1)"),
        (["data=p.jsonl", "bogus=1"], "unknown config key 'bogus'"),
        (["data=p.jsonl", "epochs=zero"], "epochs must be int"),
        ([], "data must name a JSONL preference file"),
        (["data=synthetic:nope"], "synthetic data must be one of"),
    ],
)
def test_rm_config_errors(overrides, fragment):
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides, cls=RMConfig)
    assert fragment in str(exc.value)
