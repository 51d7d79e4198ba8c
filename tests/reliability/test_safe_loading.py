"""Safe loading: no pickle is ever loaded with code execution allowed.

* every ``torch.load(`` in src/ passes ``weights_only=True`` (AST scan, so aliases such as
  ``from torch import load`` and wrapped calls are seen too), and nothing calls
  ``pickle.load(s)`` / ``weights_only=False``;
* checkpoints keep the weights in safetensors only (no ``pytorch_model.bin``), and the one
  torch file (``trainer_state.pt``: optimizer and RNG tensors) loads under ``weights_only``;
* a booby-trapped ``trainer_state.pt`` is refused without running its payload.
"""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import pytest
import torch

import posttrain
from posttrain.config import load_config
from posttrain.runs import load_trainer_state
from posttrain.trainers.rl_run import train_rl

SRC = Path(posttrain.__file__).resolve().parent


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.AST) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _torch_load_aliases(tree: ast.AST) -> set[str]:
    names = {"torch.load"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            names |= {a.asname or a.name for a in node.names if a.name == "load"}
        if isinstance(node, ast.Import):
            names |= {f"{a.asname}.load" for a in node.names if a.name == "torch" and a.asname}
    return names


def test_every_torch_load_in_src_is_weights_only(record):
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    found, unsafe = [], []
    for path in files:
        text = path.read_text()
        tree = ast.parse(text, filename=str(path))
        aliases = _torch_load_aliases(tree)
        for call in _calls(tree):
            name = _name(call.func)
            where = f"{path.relative_to(SRC.parent)}:{call.lineno}"
            if name in aliases:
                found.append(where)
                kw = {k.arg: k.value for k in call.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    unsafe.append(f"{where}: {name}(...) without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "cPickle.load", "dill.load", "joblib.load"):
                unsafe.append(f"{where}: {name}")
            for k in call.keywords:
                if k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is False:
                    unsafe.append(f"{where}: weights_only=False")
    assert found, "expected at least one torch.load (trainer_state.pt)"
    assert not unsafe, unsafe
    record("safe loading", f"{len(files)} source files scanned; torch.load calls, all weights_only=True: {found}")


def test_checkpoints_hold_weights_only_as_safetensors(tmp_path):
    run = tmp_path / "run"
    train_rl(load_config(None, ["model.name=tiny-random", "rollout.num_prompts=2", "rollout.num_completions=2",
                                "rollout.max_new_tokens=4", "trainer.steps=1", "trainer.eval_problems=2"]),
             output_dir=str(run), quiet=True)
    ckpt = run / "checkpoints" / "step_1"
    names = sorted(p.name for p in ckpt.iterdir())
    assert "model.safetensors" in names and "COMPLETE" in names
    pickles = [n for n in names if n.endswith((".bin", ".pkl", ".pickle", ".pth", ".ckpt"))]
    assert not pickles, pickles
    assert [n for n in names if n.endswith(".pt")] == ["trainer_state.pt"]
    state = load_trainer_state(ckpt)  # weights_only=True inside
    assert "model" not in state and not any("weight" in str(k) for k in state)  # no weights here
    # the model directory loads without trusting remote code or pickles
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ckpt, use_safetensors=True)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_booby_trapped_trainer_state_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    ckpt = tmp_path / "step_1"
    ckpt.mkdir()
    torch.save({"step": 1, "evil": payload}, ckpt / "trainer_state.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_trainer_state(ckpt)
    assert not marker.exists(), "the pickle payload ran"
