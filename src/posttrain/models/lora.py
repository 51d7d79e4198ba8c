"""LoRA adapters for every trainer (``model.lora``), on peft.

    W x  ->  W x + (alpha / r) B A x        A: [r, in], B: [out, r], B = 0 at the start

Only A and B train; W is frozen. The pieces the Learner (trainers/learner.py) uses:

- ``LoRAPolicy``: wraps the policy with peft (``get_peft_model``), keeps the frozen base in the
  learner's compute dtype (bf16 where the device has it: no fp32 master for it) and the adapter in
  fp32 (its own master weights, stepped by a plain AdamW over the adapter alone). It also keeps the
  sampler's model: a plain Hugging Face model whose target weights are the merged
  ``W + (alpha / r) B A`` (computed in fp32, rounded to the sampler's dtype) and whose other
  weights are the base's own tensors (shared, no copy, when the dtypes agree). The merge is
  redone lazily, when the sampler next asks for weights after an optimizer step.
- Why merged for the sampler: posttrain's lean decoder (models/fast_decoder.py) and vLLM both
  read the projection weights directly, so a merged plain model samples at full speed on either,
  and vLLM's weight push (every parameter by its Hugging Face name) takes it unchanged. The
  learner's passes run the peft model itself (transformers' forward, adapter unmerged; the lean
  decoder refuses LoRA layers), so its log-probs include the adapter exactly. The two differ by
  the rounding of the merged weights to the sampler's dtype: a train-inference mismatch of the
  kind the RL corrections measure (``behaviour`` vs ``old`` log-probs).
- ``AdapterReference``: the reference policy is the same model inside peft's
  ``disable_adapter()``: the base, with no second copy in memory.
- ``AdapterCheckpoint``: what a checkpoint saves: ``adapter_model.safetensors`` and
  ``adapter_config.json`` (peft's format: ``PeftModel.from_pretrained(base, checkpoint)`` loads
  it), with ``base_model_name_or_path`` naming the base as ``model.name`` gave it.
- ``merge_run(run_dir, out_dir)``: a LoRA run's adapter merged into its base (in fp32), saved as a
  full Hugging Face model that ``AutoModelForCausalLM.from_pretrained`` loads;
  ``load_model_and_tokenizer`` does the same in memory when ``model.name`` is a LoRA run.

Default target modules: every linear projection of a Llama/Qwen2 layer (attention and MLP). LoRA
on all linear layers is what QLoRA (Dettmers et al., arXiv 2305.14314) found necessary to match
full fine-tuning; the embeddings and the (often tied) output head stay frozen.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

ADAPTER = "default"  # peft's adapter name; one adapter per policy
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class PeftNotInstalledError(ValueError):
    """LoRA was asked for without the peft package (an input error: the CLI prints one line)."""


def _peft():
    try:
        import peft
    except ImportError as exc:  # pragma: no cover - peft is in the test and lora extras
        raise PeftNotInstalledError("LoRA needs the peft package: pip install -e '.[lora]' (or pip install peft)") \
            from exc
    return peft


def base_name(name: str) -> str:
    """``model.name`` as a checkpoint records it: an existing path made absolute, else as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


class AdapterReference:
    """``learner.ref`` of a LoRA learner: the policy with its adapters disabled (the base model).

    Not a model of its own: ``Learner.logprobs(batch, "ref")`` runs the policy's model inside
    ``disabled()``. It holds no weights (``named_parameters`` is empty: they are the policy's)."""

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def disabled(self):
        return self.peft_model.disable_adapter()

    def named_parameters(self) -> Iterator:
        return iter(())

    def parameters(self) -> Iterator:
        return iter(())


class AdapterCheckpoint:
    """``save_pretrained`` for a run checkpoint: the adapter alone, in peft's format."""

    def __init__(self, lora: "LoRAPolicy"):
        self.lora = lora

    def save_pretrained(self, directory, safe_serialization: bool = True) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.lora.adapter_state(), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = copy.deepcopy(self.lora.model.peft_config[ADAPTER])
        config.base_model_name_or_path = self.lora.base
        config.inference_mode = True
        config.save_pretrained(str(directory))


class LoRAPolicy:
    """A policy with a LoRA adapter: ``model`` (the peft model the learner trains), the merged
    plain model the sampler reads (``sampler_model()``), the reference and the checkpoint views.

    ``policy`` is modified in place: cast to ``dtype`` (the learner's compute dtype) and frozen.
    Under bf16 the learner's passes run in ``autocast()``: the adapter's fp32 weights are cast
    for the matmul (their gradients land in fp32), and peft's cast of every LoRA input to fp32
    is switched off there (it would keep an fp32 copy of each projection's input for the backward).
    """

    def __init__(self, policy, cfg, name: str, *, dtype: torch.dtype, sampler_dtype: torch.dtype):
        peft = _peft()
        self.cfg, self.base, self.dtype, self.sampler_dtype = cfg, base_name(name), dtype, sampler_dtype
        # Weights only: buffers (the rotary inv_freq) keep their precision, as under split master weights.
        with torch.no_grad():
            for p in policy.parameters():
                p.data = p.data.to(dtype)
        policy.requires_grad_(False)
        # The sampler's model: the same module structure, sharing every base tensor (cast when the
        # sampler's dtype differs); its target weights get their own storage below.
        memo = {id(p): p if p.dtype == sampler_dtype else
                torch.nn.Parameter(p.detach().to(sampler_dtype), requires_grad=False) for p in policy.parameters()}
        merged = copy.deepcopy(policy, memo)
        config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                 target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecations, reached through peft
                # autocast_adapter_dtype: the adapter in fp32 whatever the base's dtype
                self.model = peft.get_peft_model(policy, config, autocast_adapter_dtype=True)
        except ValueError as exc:
            raise ValueError(f"model.lora.target_modules={list(cfg.target_modules)}: {exc}") from exc
        self.layers: list[tuple[str, torch.nn.Module, torch.nn.Linear]] = []
        prefix = "base_model.model."
        for module_name, module in self.model.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                if not isinstance(module.get_base_layer(), torch.nn.Linear):
                    raise ValueError(f"model.lora.target_modules: {module_name[len(prefix):]} is a "
                                     f"{type(module.get_base_layer()).__name__}; LoRA here adapts nn.Linear layers only")
                target = merged.get_submodule(module_name[len(prefix):])
                target.weight = torch.nn.Parameter(torch.empty_like(target.weight), requires_grad=False)
                self.layers.append((module_name[len(prefix):], module, target))
        self.merged = merged.eval().requires_grad_(False)
        self.stale = True  # the merged weights lag the adapter (set by Learner.optim_step)

    # ------------------------------------------------------------------ views
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def reference(self) -> AdapterReference:
        return AdapterReference(self.model)

    def checkpoint(self) -> AdapterCheckpoint:
        return AdapterCheckpoint(self)

    @contextmanager
    def autocast(self, device_type: str):
        """The learner's passes: bf16 autocast without peft's fp32 input casts (nothing under fp32)."""
        if self.dtype == torch.float32:
            yield
            return
        from peft.helpers import disable_input_dtype_casting

        with ExitStack() as stack:
            stack.enter_context(torch.autocast(device_type, dtype=self.dtype))
            stack.enter_context(disable_input_dtype_casting(self.model, active=True))
            yield

    # ------------------------------------------------------------------ the sampler's weights
    @torch.no_grad()
    def sampler_model(self):
        """The merged plain model, current with the adapter (merged again if it moved)."""
        if self.stale:  # about 2 ms per million merged weights on one core
            for _, layer, target in self.layers:
                delta = layer.get_delta_weight(ADAPTER).float()
                # out of place: on an fp32 base, .float() is the base tensor itself and add_ would move it
                target.weight.copy_(layer.get_base_layer().weight.float() + delta)
            self.stale = False
        return self.merged

    def sampler_weights(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.sampler_model().named_parameters()}

    # ------------------------------------------------------------------ state
    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors under peft's saved names (without the adapter name)."""
        peft = _peft()
        return {k: v.detach().contiguous() for k, v in peft.get_peft_model_state_dict(self.model).items()}

    def load_adapter_state(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        peft = _peft()
        expected = set(self.adapter_state())
        if set(tensors) != expected:
            missing, unknown = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ValueError(f"{source} does not fit this model's LoRA adapter (model.lora: rank "
                             f"{self.cfg.rank}, target_modules {list(self.cfg.target_modules)}): missing "
                             f"{missing[:3]}, unexpected {unknown[:3]}")
        result = peft.set_peft_model_state_dict(self.model, tensors)
        if result.unexpected_keys:
            raise ValueError(f"{source}: unexpected adapter tensors {result.unexpected_keys[:3]}")
        self.stale = True

    def load_adapter(self, checkpoint: Path) -> None:
        from safetensors.torch import load_file

        path = Path(checkpoint) / ADAPTER_WEIGHTS
        self.load_adapter_state(load_file(str(path)), str(path))

    def summary(self) -> dict:
        trainable = sum(p.numel() for p in self.trainable())
        total = sum(p.numel() for p in self.model.parameters())
        return {"rank": self.cfg.rank, "alpha": self.cfg.alpha, "dropout": self.cfg.dropout,
                "target_modules": list(self.cfg.target_modules), "adapted_layers": len(self.layers),
                "trainable_params": trainable, "total_params": total,
                "base_dtype": str(self.dtype).removeprefix("torch."),
                "sampler": "merged", "sampler_dtype": str(self.sampler_dtype).removeprefix("torch.")}

    def describe(self) -> str:
        s = self.summary()
        return (f"LoRA rank {s['rank']} alpha {s['alpha']:g} on {s['adapted_layers']} layers: "
                f"{s['trainable_params']:,} of {s['total_params']:,} parameters train "
                f"({100 * s['trainable_params'] / s['total_params']:.2f}%), base frozen in {s['base_dtype']}; "
                f"the sampler uses merged weights (W + alpha/r BA, {s['sampler_dtype']}, refreshed after each "
                "optimizer step); a reference model, where the method uses one, is the base (adapter disabled)")


# ------------------------------------------------------------------ resume checks
def resume_problem(old: Optional[dict], new: Optional[dict]) -> Optional[str]:
    """Why a run saved with ``model.lora`` = ``old`` cannot resume with ``new`` (None if it can).
    The dropout may change; the adapter's shape and scale may not."""
    keys = ("rank", "alpha", "target_modules")
    pick = lambda c: None if c is None else {k: c.get(k) for k in keys}  # noqa: E731
    if pick(old) == pick(new):
        return None
    return (f"model.lora={pick(new)!r}: the checkpoint was trained with model.lora={pick(old)!r}, and its state would "
            "not fit")


def checkpoint_weights_file(lora) -> str:
    """The weight file a run checkpoint holds: the adapter alone under LoRA."""
    return ADAPTER_WEIGHTS if lora is not None else "model.safetensors"


# ------------------------------------------------------------------ merge
def is_adapter_checkpoint(directory: Path) -> bool:
    directory = Path(directory)
    return (directory / ADAPTER_CONFIG).is_file() and not (directory / "config.json").is_file()


def adapter_base(checkpoint: Path) -> str:
    """The base model a LoRA checkpoint's adapter belongs to (``base_model_name_or_path``)."""
    path = Path(checkpoint) / ADAPTER_CONFIG
    try:
        name = json.loads(path.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is unreadable or not JSON ({exc})") from exc
    if not name:
        raise ValueError(f"{path} names no base model (base_model_name_or_path)")
    return name


def load_merged(checkpoint: Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer): a LoRA checkpoint's base with its adapter merged in (fp32 merge), as a
    plain Hugging Face model in ``dtype``. The base is loaded as ``load_model_and_tokenizer`` loads
    ``model.name`` (an alias, directory, hub id, or another run, merged in turn)."""
    from posttrain.models.loading import load_model_and_tokenizer

    peft = _peft()
    checkpoint = Path(checkpoint)
    base, _ = load_model_and_tokenizer(adapter_base(checkpoint), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = peft.PeftModel.from_pretrained(base, str(checkpoint))
    merged = model.merge_and_unload()
    vars(merged).pop("peft_config", None)  # a plain model again: save_pretrained writes all of it
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return merged.to(dtype).eval(), tokenizer


def merge_run(run_dir, out_dir, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``out_dir``: the latest checkpoint of the LoRA run ``run_dir`` (or that checkpoint
    directory itself) merged into its base, as a full Hugging Face model (config, safetensors
    weights, generation config, tokenizer) that ``AutoModelForCausalLM.from_pretrained`` loads.
    ``out_dir`` must be new or empty; it is written under a temporary name and renamed."""
    from posttrain.models.loading import ModelLoadError, latest_checkpoint

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    checkpoint = run_dir if (run_dir / ADAPTER_CONFIG).is_file() else latest_checkpoint(run_dir)
    if checkpoint is None:
        raise ModelLoadError(f"{run_dir} is no run directory with a complete checkpoint")
    if not is_adapter_checkpoint(checkpoint):
        raise ModelLoadError(f"{checkpoint} holds a full model, not a LoRA adapter: it needs no merge (load it "
                             "with model.name or AutoModelForCausalLM.from_pretrained as it is)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ModelLoadError(f"{out_dir} exists and is not empty; choose a new output directory")
    model, tokenizer = load_merged(checkpoint, dtype)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
