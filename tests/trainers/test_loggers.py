"""trainer.report_to (tensorboard, wandb, trackio) and the sampled-completions table
(trainer.log_completions_every), through real 2-3 step RL runs on the tiny model (issue 18).

Every logger is read back with its own reader and must hold metrics.jsonl's values. Nothing may
reach the network: wandb runs offline (posttrain's default without WANDB_MODE or a key), trackio
writes its local SQLite database under a temporary TRACKIO_DIR, and Python-side connections to
anything but this machine fail the test.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import re
import socket
import struct
import sys

import pytest

from posttrain.config import ConfigError, SFTConfig, load_config
from posttrain.loggers import wandb_mode
from posttrain.trainers.rl_run import train_rl

RL_BASE = ("model.name=tiny-random", "task.test_size=4", "rollout.num_prompts=2", "rollout.num_completions=4",
           "rollout.max_new_tokens=4", "trainer.lr=1e-3", "trainer.eval_problems=1", "trainer.threads=1",
           "trainer.seed=0")
DIGIT = "reward={type: format, pattern: '[0-9]', match: search}"  # reward 1 iff the completion has a digit
ALL = "trainer.report_to=[tensorboard,wandb,trackio]"
PROJECT = "posttrain-test"
needs_loggers = pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None or importlib.util.find_spec("trackio") is None,
    reason="wandb and trackio are not installed (pip install -e '.[loggers]'; the test extra has them)")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """wandb and trackio confined to tmp_path and to this machine."""
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL",
                "TRACKIO_BUCKET_ID", "TRACKIO_DATASET_ID"):
        monkeypatch.delenv(key, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # no ~/.netrc key: wandb runs offline
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(key, str(tmp_path / key.lower()))
    monkeypatch.setenv("TRACKIO_PROJECT", PROJECT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    trackio_dir = tmp_path / "trackio"
    monkeypatch.setenv("TRACKIO_DIR", str(trackio_dir))
    # trackio reads TRACKIO_DIR once, on import: an earlier import in this process is redirected too
    for name, module in list(sys.modules.items()):
        if name.startswith("trackio") and module is not None and hasattr(module, "TRACKIO_DIR"):
            monkeypatch.setattr(module, "TRACKIO_DIR", trackio_dir)
            if hasattr(module, "MEDIA_DIR"):
                monkeypatch.setattr(module, "MEDIA_DIR", trackio_dir / "media")
    connect = socket.socket.connect

    def local_only(self, address):
        host = address[0] if isinstance(address, tuple) else None
        assert host is None or host in ("127.0.0.1", "localhost", "::1"), f"a logger connected to {address}"
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    assert wandb_mode() == "offline"
    return trackio_dir


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _numbers(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _wandb_records(path):
    """The records of a wandb offline transaction log (LevelDB log format: 32 KiB blocks of
    [crc32 u32, length u16, type u8] chunks after a 7-byte ':W&B' header) as wandb protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, buf, records = open(path, "rb").read(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += block - pos % block
            continue
        buf = (b"" if kind in (1, 2) else buf) + data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            records.append(record)
    return records


def _wandb_files(run_dir) -> list[str]:
    """The offline runs' transaction logs, oldest first."""
    return sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb")), key=os.path.getmtime)


def _wandb_history(path) -> dict[int, dict]:
    out = {}
    for record in _wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            out[int(row["_step"])] = row
    return out


@needs_loggers
def test_report_to_all_three_hold_the_metrics_and_the_completions_table(tmp_path, offline, capsys):
    run = tmp_path / "run"
    cfg = load_config(None, [*RL_BASE, DIGIT, "trainer.steps=3", ALL, "trainer.log_completions_every=2",
                             "trainer.log_completions=3"])
    train_rl(cfg, output_dir=str(run), quiet=False)
    metrics = {r["step"]: _numbers(r) for r in _jsonl(run / "metrics.jsonl")}
    assert sorted(metrics) == [1, 2, 3] and "reward/mean" in metrics[1]

    # completions: step 2 only (every 2 of 3 steps), 3 rows, each a real scored sample
    rows = _jsonl(run / "completions.jsonl")
    assert [r["step"] for r in rows] == [2, 2, 2]
    for r in rows:
        assert r["reward"] == (1.0 if re.search("[0-9]", r["completion"]) else 0.0)
        assert r["prompt"].startswith("What is") and r["answer"] is not None and r["correct"] is None
    out = capsys.readouterr().out
    assert out.count("sampled completions") == 1 and "step 2: sampled completions" in out

    # TensorBoard: every scalar of every step, and the table as text at step 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for step, row in metrics.items():
        for key, value in row.items():
            (event,) = [e for e in events.Scalars(key) if e.step == step]
            assert math.isclose(event.value, value, rel_tol=1e-6, abs_tol=1e-6), (key, step)
    (text,) = events.Tensors("completions/text_summary")
    assert text.step == 2 and rows[0]["answer"] in text.tensor_proto.string_val[0].decode()

    # wandb: the offline run's history, value for value; the table as a 3-row wandb.Table
    (wandb_file,) = _wandb_files(run)
    history = _wandb_history(wandb_file)
    assert sorted(history) == [1, 2, 3]
    for step, row in metrics.items():
        assert {k: history[step][k] for k in row} == row
    table = history[2]
    assert table["completions/_type"] == "table-file" and table["completions/nrows"] == 3
    (table_file,) = glob.glob(str(run / "wandb" / "offline-run-*" / "files" / table["completions/path"]))
    saved = json.loads(open(table_file).read())
    assert saved["columns"] == ["step", "prompt", "completion", "reward", "answer", "correct"]
    assert [dict(zip(saved["columns"], d)) for d in saved["data"]] == rows

    # trackio: its local database under TRACKIO_DIR, the run named after the run directory
    from trackio.sqlite_storage import SQLiteStorage

    assert json.loads((run / "loggers.json").read_text())["trackio"] == {"project": PROJECT, "name": "run"}
    assert (offline / f"{PROJECT}.db").exists()
    logs = SQLiteStorage.get_logs(PROJECT, "run")
    scalars = {log["step"]: log for log in logs if "reward/mean" in log}
    assert sorted(scalars) == [1, 2, 3]
    for step, row in metrics.items():
        assert {k: scalars[step][k] for k in row} == row
    (tables,) = [log["completions"] for log in logs if "completions" in log]
    assert tables["_type"] == "trackio.table" and [r["completion"] for r in tables["_value"]] == \
        [r["completion"] for r in rows]


def test_quiet_run_without_loggers_still_writes_completions(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = load_config(None, [*RL_BASE, "trainer.steps=2", "trainer.report_to=[]", "trainer.log_completions_every=1",
                             "trainer.log_completions=2"])
    train_rl(cfg, output_dir=str(run), quiet=True)
    rows = _jsonl(run / "completions.jsonl")
    assert [r["step"] for r in rows] == [1, 1, 2, 2]
    assert all(r["correct"] == r["reward"] for r in rows)  # the numeric reward's `correct` component is its reward
    assert "sampled completions" not in capsys.readouterr().out
    assert not (run / "tb").exists() and not (run / "loggers.json").exists()


def test_online_dpo_logs_its_sampled_completions(tmp_path):
    from posttrain.config import DPOConfig
    from posttrain.trainers.dpo import train_dpo

    run = tmp_path / "run"
    cfg = load_config(None, ["model.name=tiny-random", "data.path=online", "task.test_size=4", "rollout.num_prompts=2",
                             "rollout.num_completions=4", "rollout.max_new_tokens=4", "trainer.steps=2",
                             "trainer.eval_problems=1", "trainer.threads=1", "trainer.autocast=none",
                             "trainer.log_completions_every=2", "trainer.log_completions=5"], cls=DPOConfig)
    train_dpo(cfg, output_dir=str(run), quiet=True)
    rows = _jsonl(run / "completions.jsonl")
    assert [r["step"] for r in rows] == [2] * 5 and len({(r["prompt"], r["completion"]) for r in rows}) >= 2


@needs_loggers
def test_resume_continues_each_logger(tmp_path, offline):
    run = tmp_path / "run"
    overrides = [*RL_BASE, DIGIT, "trainer.steps=4", "trainer.checkpoint_every=2", ALL,
                 "trainer.log_completions_every=1", "trainer.log_completions=1"]
    train_rl(load_config(None, overrides), output_dir=str(run), quiet=True, stop_after=3)  # a crash after step 3
    state = json.loads((run / "loggers.json").read_text())
    train_rl(load_config(None, overrides), output_dir=str(run), quiet=True, resume=True)  # redoes 3, then 4
    assert json.loads((run / "loggers.json").read_text()) == state  # the same wandb id and trackio run
    assert [r["step"] for r in _jsonl(run / "completions.jsonl")] == [1, 2, 3, 4]  # step 3's first rows dropped
    metrics = {r["step"]: r["reward/mean"] for r in _jsonl(run / "metrics.jsonl")}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()  # purge_step: the first process's step 3 is gone, the redone one stays
    assert [(e.step, e.value) for e in events.Scalars("reward/mean")] == \
        [(s, pytest.approx(v, rel=1e-6)) for s, v in sorted(metrics.items())]
    files = _wandb_files(run)  # two offline files of one wandb run: steps 1-3, then 3 again and 4
    assert [os.path.basename(f) for f in files] == [f"run-{state['wandb']['id']}.wandb"] * 2
    assert [sorted(_wandb_history(f)) for f in files] == [[1, 2, 3], [3, 4]]
    from trackio.sqlite_storage import SQLiteStorage

    assert SQLiteStorage.get_runs(PROJECT) == ["run"]
    assert {log["step"] for log in SQLiteStorage.get_logs(PROJECT, "run") if "reward/mean" in log} == {1, 2, 3, 4}


def test_bad_report_to_is_a_config_error_naming_the_fix(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"unknown logger 'wandbb'; choose from tensorboard, wandb, trackio"):
        load_config(None, ["trainer.report_to=[tensorboard,wandbb]"])
    with pytest.raises(ConfigError, match="trainer.report_to must be a list"):
        load_config(None, ["trainer.report_to=wandb"])
    for name in ("wandb", "trackio"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: find_spec and import fail
        with pytest.raises(ConfigError, match=rf"names {name}, which is not installed: pip install {name} "):
            load_config(None, [f"trainer.report_to=[{name}]"])
    with pytest.raises(ConfigError, match="log_completions_every must be >= 0"):
        load_config(None, ["trainer.log_completions_every=-1"])
    # a trainer that samples nothing refuses the completions table before any model loads
    from posttrain.trainers.sft import train_sft

    sft = load_config(None, ["model.name=tiny-random", "trainer.log_completions_every=1"], cls=SFTConfig)
    with pytest.raises(ConfigError, match="posttrain sft samples no completions"):
        train_sft(sft, output_dir=str(tmp_path / "sft"))
    assert not (tmp_path / "sft").exists()


def test_wandb_goes_online_only_when_asked(tmp_path, monkeypatch):
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode() == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password k3y\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_mode() is None  # `wandb login` stored a key: wandb's own default (online)
    (tmp_path / ".netrc").unlink()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode() is None  # the user's WANDB_MODE, whatever it is, is wandb's to read
