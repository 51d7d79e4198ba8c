"""The Learner: trainable weights, their precision and optimizer, and the log-prob passes.

Four primitives, after the Tinker API, are all a training loop needs:

    learner.logprobs(batch, which="current" | "ref")   # no grad, [N, T], length-bucketed
    learner.forward_backward(batch, loss_fn)           # micro-batched; loss_fn(micro, logp, entropy) -> scalar
    learner.optim_step(lr_scale)                       # clip, step, schedule; returns the grad norm
    learner.export_weights()                           # name -> tensor, for a Sampler's load_weights

plus ``state_dict`` / ``load_checkpoint`` and ``fp32_policy()`` for checkpoints. The RL loop
(trainers/rl.py) supplies the policy loss; SFT, DPO and distributed workers supply theirs.

Precision. Mixed precision with fp32 master weights (Micikevicius et al., arXiv 1710.03740): the
forward and backward run on bf16 weights (``self.model``); each gradient moves into fp32 as soon
as it lands. On a CPU the masters are by default the bf16 weights plus 16 low bits
(trainers.master_weights: exact, 2 bytes per weight smaller) and ``policy is model``; otherwise
(``split_master_weights=false``, or CUDA) the fp32 ``policy`` is the master and ``model`` a bf16
copy refreshed after every step. Without bf16: fp32 throughout, ``model is policy``.

The split stays off on CUDA: its int32 -> int16 wrap-around is checked on CPU kernels only, and
a GPU has the memory for a plain fp32 master at the model sizes this library targets.

LoRA (``model.lora``, models/lora.py). The base is frozen in the compute dtype (bf16 where the
device has it: no fp32 master, no optimizer state for it) and the adapter is fp32, its own master,
stepped by AdamW over the adapter alone; ``policy is model`` is the peft model, and under bf16 its
passes run in autocast. Its passes use transformers' forward (the lean decoder refuses LoRA layers,
see fast_decoder.unsupported_reason), so log-probs include the adapter. The reference is the same
model with the adapter disabled (``ref`` is a ``lora.AdapterReference``); the sampler gets a plain
model with merged weights (``sampler_model`` / ``export_weights``), merged again after each
optimizer step when next asked for; a checkpoint holds the adapter alone (``checkpoint_model``).
fsdp2 and activation checkpointing are refused with it.

Mixture-of-Experts (models/moe.py). Every pass of an MoE policy or reference runs inside
``LearnerRouting.in_pass`` (``self.moe``): under ``algorithm.moe.routing_replay`` (R3) each token
goes through the experts the sampler chose for it; the policy's passes count the routing mismatch.
Their rows run as whole sequences (no shared prompt pass), the layout the routing is recorded in.
"""

from __future__ import annotations

import copy
import functools
from contextlib import nullcontext
from typing import Callable, Iterable, Optional

import torch

from posttrain.config import ModelConfig, TrainerConfig
from posttrain.models import fast_decoder
from posttrain.models.logprobs import SharedPromptPass, completion_logprobs, uses_fast_decoder
from posttrain.models.moe import LearnerRouting, is_moe
from posttrain.models.value import ValueModel
from posttrain.rollout.batch import Rollouts
from posttrain.rollout.engine import low_precision_copy, resolve_dtype
from posttrain.trainers.master_weights import SplitMasterAdamW, accumulate_grad

LossFn = Callable[[Rollouts, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def resolve_device(name: str) -> torch.device:
    """``trainer.device``: auto = CUDA when available, else CPU; cuda without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but PyTorch sees no CUDA GPU (torch.cuda.is_available() is False); "
                         "install a CUDA build of torch or set trainer.device=cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def learner_dtype(autocast: str, device: torch.device) -> torch.dtype:
    """``trainer.autocast`` -> what the learner computes in: bf16 by name, fp32 under none, and under
    auto what the sampler's auto picks (rollout.engine.resolve_dtype: bf16 where it is native)."""
    if autocast == "auto":
        return resolve_dtype("auto", device)
    return torch.bfloat16 if autocast == "bfloat16" else torch.float32


BF16_TOKEN_CAP = 8192  # trainer.micro_batch_tokens under null, for a learner computing in bf16


def token_cap(setting: Optional[int], element_bytes: int) -> int:
    """``trainer.micro_batch_tokens``; null means the same activation bytes in every precision:
    8192 tokens in bf16 (2 B), 4096 in fp32 (4 B).

    In fp32 activations take twice the bytes; on a 2-core CPU without bf16 instructions a 4096-token
    cap measured no slower an update than 8192 with 23-34% less peak RSS (SmolLM2-135M: quickstart
    4.25 vs 5.49 GB, 256-token completions 5.9 vs 9.0 GB; benchmarks/results/token_cap_fp32.md)."""
    return BF16_TOKEN_CAP * 2 // element_bytes if setting is None else setting


class Learner:
    """Owns the policy's trainable weights, optimizer, reference and critic.

    ``sampler_dtype``: the dtype the rollout engine samples in; when it equals the learner's
    compute dtype the two share ``self.model`` (no copy, no sync).
    """

    def __init__(self, policy, trainer: TrainerConfig, model_cfg: ModelConfig, *, temperature: float,
                 device: torch.device, sampler_dtype: torch.dtype, reference: bool = False,
                 critic_lr: Optional[float] = None, shard: bool = False):
        self.cfg, self.model_cfg, self.temperature, self.device = trainer, model_cfg, temperature, device
        self.sampler_dtype, self.will_shard = sampler_dtype, shard
        self.fsdp = None  # a posttrain.distributed.fsdp.FSDPShards once ``shard()`` has run
        policy = policy.to(device)
        self.dtype = learner_dtype(trainer.autocast, device)
        self.micro_batch_tokens = token_cap(trainer.micro_batch_tokens, self.dtype.itemsize)
        use_bf16 = self.dtype == torch.bfloat16
        self.lora = None  # a models.lora.LoRAPolicy under model.lora
        if model_cfg.lora is not None:
            if shard:
                raise ValueError("model.lora does not work with distributed.strategy=fsdp2 yet; use "
                                 "distributed.strategy=ddp (an adapter is small: every learner holds all of it)")
            from posttrain.models.lora import LoRAPolicy

            self.lora = LoRAPolicy(policy, model_cfg.lora, model_cfg.name, dtype=self.dtype,
                                   sampler_dtype=sampler_dtype)
            policy = self.lora.model
        fp32_policy = next(policy.parameters()).dtype == torch.float32 and self.lora is None
        # Under fsdp2 the model stays fp32 (the sharded masters); FSDP's mixed precision computes in bf16.
        self.split_master = (use_bf16 and sampler_dtype == torch.bfloat16 and trainer.split_master_weights
                             and device.type == "cpu" and fp32_policy and not shard)
        if trainer.activation_checkpointing and not uses_fast_decoder(policy.get_decoder(), model_cfg.decoder):
            why = ("model.decoder=hf" if model_cfg.decoder == "hf"
                   else fast_decoder.unsupported_reason(policy.get_decoder()))
            why += " (model.lora: the adapter runs in transformers' forward)" if self.lora is not None else ""
            raise ValueError(f"trainer.activation_checkpointing needs posttrain's lean decoder (model.decoder=auto and a "
                             f"Llama/Qwen2-architecture model), but here: {why}. Set it to false.")
        self.critic = self.critic_optimizer = None
        if critic_lr is not None:  # from the fp32 weights, before they are split
            self.critic = ValueModel(policy).to(device)
            self.critic_optimizer = torch.optim.AdamW(self.critic.parameters(), lr=critic_lr,
                                                      betas=tuple(trainer.adam_betas), weight_decay=trainer.weight_decay)
        self.critic_lr = critic_lr
        adam = dict(lr=trainer.lr, betas=tuple(trainer.adam_betas), weight_decay=trainer.weight_decay)
        self.policy = self.model = policy
        # autocast only where the compute weights stay fp32 but bf16 is wanted (fp32 sampler).
        self.autocast = nullcontext
        if self.lora is not None:
            # The adapter is fp32 (its own master); the frozen base has no optimizer state.
            self.optimizer = torch.optim.AdamW(self.lora.trainable(), fused=True, **adam)
            self.autocast = functools.partial(self.lora.autocast, device.type)
        elif self.split_master:
            # From here the policy holds bf16 weights; the fp32 masters live in the optimizer.
            self.optimizer = SplitMasterAdamW(policy.parameters(), **adam)
        else:
            if shard:
                pass
            elif use_bf16 and fp32_policy and sampler_dtype == torch.bfloat16:
                self.model = low_precision_copy(policy, torch.bfloat16)
                self._route_grads_to_master()
            elif use_bf16:
                self.autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)
            # fused: one pass per parameter with no temporaries (3x faster than the per-parameter
            # loop on a CPU; the multi-tensor path would allocate temporaries the size of the model).
            self.optimizer = torch.optim.AdamW(policy.parameters(), fused=True, **adam)
        self.model.eval()
        self.moe = LearnerRouting() if is_moe(self.model) else None  # R3 replay, mismatch, aux loss
        self.ref = None
        if reference and self.lora is not None:  # the base: the same model with its adapter disabled
            self.ref = self.lora.reference()
        elif reference:  # in the learner's precision, so KL is exactly 0 at the start
            self.ref = copy.deepcopy(self.model).eval().requires_grad_(False)
            if shard:  # a whole local copy in the compute dtype (FSDP's param_dtype)
                self.ref.to(self.dtype)

    def shard(self, group=None) -> None:
        """fully_shard the policy over the data-parallel group (``distributed.strategy=fsdp2``;
        every rank at once, each holding the same whole state): posttrain.distributed.fsdp."""
        from posttrain.distributed.fsdp import shard_learner

        shard_learner(self, group)

    def sampler_model(self):
        """The model an in-process rollout engine samples from: ``self.model`` (shared), or under
        fsdp2 a whole copy in the sampler's dtype (the sharded model only runs in lockstep), or
        under LoRA the plain model with merged weights (models/lora.py)."""
        if self.lora is not None:
            return self.lora.sampler_model()
        if not self.will_shard:
            return self.model
        if self.fsdp is not None:
            raise RuntimeError("the sampling copy must be made before the learner is sharded")
        return copy.deepcopy(self.policy).to(self.sampler_dtype).eval().requires_grad_(False)

    def _extra_passes(self, count: int) -> int:
        """How many zero-weight passes keep this rank in lockstep with the others (fsdp2)."""
        return self.fsdp.lockstep(count) - count if self.fsdp is not None else 0

    def _refresh_compute_copy(self) -> None:
        """The bf16 compute copy := the fp32 masters, rounded (no-op when the two are one model)."""
        if self.model is not self.policy:
            with torch.no_grad():
                for low, master in zip(self.model.parameters(), self.policy.parameters()):
                    low.copy_(master)

    def _route_grads_to_master(self) -> None:
        for master, low in zip(self.policy.parameters(), self.model.parameters(), strict=True):
            low.requires_grad_(master.requires_grad)

            def move(low: torch.Tensor, master: torch.Tensor = master) -> None:
                master.grad = accumulate_grad(master.grad, low.grad, master.dtype)
                low.grad = None

            low.register_post_accumulate_grad_hook(move)

    # ------------------------------------------------------------------ log-prob passes
    def _logprobs(self, model, batch: Rollouts, with_entropy: bool = False, prompt_states=None,
                  with_sum_pi2: bool = False, entropy_top_p: Optional[float] = None):
        cfg, mc = self.cfg, self.model_cfg
        call = completion_logprobs
        sharded = self.fsdp is not None and model is self.model
        if sharded:  # through the root's FSDP forward; one decoder pass per call on every rank
            call = functools.partial(model.posttrain_call, completion_logprobs)
        routing = self.moe.in_pass(model, batch, measure=model is self.model) if self.moe is not None else nullcontext()
        with self.autocast(), routing:
            return call(
                model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask,
                temperature=self.temperature, chunk_tokens=cfg.logprob_chunk_tokens, with_entropy=with_entropy,
                share_prompts=cfg.share_prompt_pass and not sharded and self.moe is None, attention=mc.attention,
                prompt_states=prompt_states, decoder_mode=mc.decoder,
                checkpoint_layers=cfg.activation_checkpointing,  # a no-op under no_grad
                with_sum_pi2=with_sum_pi2,  # True: a third output, sum_v pi_v^2, from the same pass
                entropy_top_p=entropy_top_p,  # p: each token's nucleus entropy (SIREN), not the full one
            )

    def _values(self, batch: Rollouts) -> torch.Tensor:
        mc = self.model_cfg
        with torch.autocast(self.device.type, dtype=torch.bfloat16) if self.dtype == torch.bfloat16 else nullcontext():
            return self.critic(batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask,
                               share_prompts=self.cfg.share_prompt_pass, attention=mc.attention,
                               decoder_mode=mc.decoder)

    def _no_grad_pass(self, batch: Rollouts, fn: Callable[[Rollouts], torch.Tensor],
                      lockstep: bool = False) -> torch.Tensor:
        """[N, T] from ``fn`` run per length bucket on padding-trimmed rows, zero-padded, in row
        order. ``lockstep``: ``fn`` runs the sharded model, so every rank runs as many passes."""
        N, T = batch.completion_ids.shape
        out = None  # [N, T, ...]: fn may return trailing dims (logprobs_and_sum_pi2)
        buckets = length_buckets(batch, self.cfg.micro_batch_size, self.micro_batch_tokens)
        extra = self._extra_passes(len(buckets)) if lockstep else 0  # before any pass: a collective too
        with torch.no_grad():
            for rows in buckets:
                part = fn(trim(batch.select(rows))).float().cpu()
                out = torch.zeros((N, T, *part.shape[2:])) if out is None else out
                out[rows, : part.shape[1]] = part
            for _ in range(extra):
                fn(trim(batch.select(buckets[0][:1])))  # output discarded
        return out if out is not None else torch.zeros((N, T))

    def logprobs(self, batch: Rollouts, which: str = "current") -> torch.Tensor:
        """Log-probs of the completion tokens under the current policy or the frozen reference."""
        model = {"current": self.model, "ref": self.ref}[which]
        if model is None:
            raise ValueError("no reference model: the learner was built with reference=False")
        if self.lora is not None and model is self.ref and hasattr(model, "disabled"):
            with model.disabled():  # the base: the policy's own model with the adapter off
                return self._no_grad_pass(batch, lambda micro: self._logprobs(self.model, micro)[0])
        return self._no_grad_pass(batch, lambda micro: self._logprobs(model, micro)[0], lockstep=model is self.model)

    def logprobs_and_sum_pi2(self, batch: Rollouts) -> torch.Tensor:
        """[N, T, 2]: the current policy's log-probs and sum_v pi_v^2 per token, from one fused pass
        (the optimal token baseline's inputs; verl's calculate_sum_pi_squared)."""
        return self._no_grad_pass(
            batch, lambda micro: torch.stack(self._logprobs(self.model, micro, with_sum_pi2=True)[::2], -1),
            lockstep=True)

    def router_distances(self, batch: Rollouts) -> torch.Tensor:
        """[N, T] the MoE router distance D_t of the current policy vs the sampler (models/moe.py,
        router-aware IS factor), from a no-grad pass of its own."""
        def distance(micro: Rollouts) -> torch.Tensor:
            self.moe.want_distance = True
            try:
                self._logprobs(self.model, micro)
            finally:
                self.moe.want_distance = False
            return self.moe.distance
        return self._no_grad_pass(batch, distance, lockstep=True)

    def entropies(self, batch: Rollouts, top_p: Optional[float] = None) -> torch.Tensor:
        """Per-token entropy of the current policy (for engines that do not record it); with
        ``top_p``, of each token's nucleus (SIREN's top-p mask, ``TokenLogProbs``)."""
        return self._no_grad_pass(
            batch, lambda micro: self._logprobs(self.model, micro, with_entropy=True, entropy_top_p=top_p)[1],
            lockstep=True)

    def values(self, batch: Rollouts) -> torch.Tensor:
        return self._no_grad_pass(batch, self._values)

    # ------------------------------------------------------------------ update
    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.critic is not None:
            self.critic_optimizer.zero_grad(set_to_none=True)

    def forward_backward(self, batch: Rollouts, loss_fn: LossFn, with_entropy: bool = False,
                         value_loss_fn: Optional[Callable[[Rollouts, torch.Tensor], torch.Tensor]] = None,
                         entropy_top_p: Optional[float] = None) -> float:
        """Accumulate the gradients of ``sum over micro-batches of loss_fn(micro, logp, entropy)``.

        ``loss_fn`` must normalise by counts of the whole ``batch`` (aggregation's num_tokens /
        num_seqs), so the split into micro-batches does not change the gradient. Micro-batches
        group rows of similar completion length (little padding); their prompts run through the
        decoder once per batch when that pays (SharedPromptPass). Returns the summed loss.
        ``entropy_top_p``: the entropy handed to ``loss_fn`` is each token's nucleus entropy.
        """
        cfg, mc = self.cfg, self.model_cfg
        self.model.train()
        # Longest first: its activations are freed while the fp32 gradients are first
        # allocated, so the two do not stack at the memory peak.
        buckets = list(reversed(length_buckets(batch, cfg.micro_batch_size, self.micro_batch_tokens)))
        shared = None
        if (cfg.share_prompt_pass and self.fsdp is None and self.moe is None
                and share_prompts_across_micro_batches(batch, cfg.micro_batch_size)):
            with self.autocast():
                # one micro-batch: the prompt activations live no longer than its own, so no recompute
                shared = SharedPromptPass(self.model, batch.prompt_ids, batch.prompt_mask, mc.attention, mc.decoder,
                                          checkpoint_layers=len(buckets) > 1 or cfg.activation_checkpointing)
        total = 0.0
        extra = self._extra_passes(len(buckets))  # fsdp2: agreed before any pass (it is a collective too)
        for rows in buckets:
            micro = trim(batch.select(rows), trim_prompt=shared is None)
            logp, entropy = self._logprobs(self.model, micro, with_entropy,
                                           shared.rows(rows) if shared is not None else None,
                                           entropy_top_p=entropy_top_p)
            loss = loss_fn(micro, logp, entropy)
            loss.backward()
            total += float(loss.detach())
            if value_loss_fn is not None:
                value_loss_fn(micro, self._values(micro)).backward()
        if shared is not None:
            shared.backward()
        for _ in range(extra):  # fsdp2: zero-weight passes keep the ranks' collectives aligned
            logp, _ = self._logprobs(self.model, trim(batch.select(buckets[-1][:1])))
            (logp.sum() * 0.0).backward()
        self.model.eval()
        return total

    def fp32_grads(self, zeros_for: Iterable[int] = ()) -> list[Optional[torch.Tensor]]:
        """The gradients the optimizers step on, one per trainable weight (policy, then critic),
        in an order every replica of this model shares; None where none has accumulated.

        They are fp32 whenever the learner keeps fp32 masters: ``SplitMasterAdamW.grads`` under
        split masters, else the fp32 ``policy`` parameters' ``.grad`` (the bf16 ``model``'s
        hooks route theirs there). The tensors are the learner's own, so writing into them
        (a data-parallel all-reduce, posttrain.distributed.data_parallel) changes the update.
        Positions in ``zeros_for`` that hold None first get a stored zero gradient, so replicas
        where some weight got no gradient can still lay out the same buffers.
        """
        zeros_for, out = set(zeros_for), []
        params = []
        if self.split_master:
            opt = self.optimizer
            for i, p in enumerate(opt.params):
                if p.requires_grad:
                    if opt.grads[i] is None and len(out) in zeros_for:
                        opt.grads[i] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                    out.append(opt.grads[i])
        else:
            params = [p for p in self.policy.parameters() if p.requires_grad]
        if self.critic is not None:
            params += [p for p in self.critic.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None and len(out) in zeros_for:
                p.grad = torch.zeros_like(p)
            out.append(p.grad)
        return out

    def clip_grad_norm(self) -> float:
        max_norm = self.cfg.max_grad_norm
        if self.split_master:
            return float(self.optimizer.clip_grad_norm_(max_norm))
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under fsdp2

    def optim_step(self, lr_scale: float) -> dict[str, float]:
        """One optimizer step at ``trainer.lr * lr_scale`` on the accumulated (clipped) gradients;
        the compute copy, when there is one, is refreshed from the masters."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * lr_scale
        self.optimizer.step()
        self._refresh_compute_copy()
        if self.fsdp is not None:
            self.fsdp.steps += 1  # the gathered weights are stale
        out = {"lr": self.optimizer.param_groups[0]["lr"]}
        if self.lora is not None:
            self.lora.stale = True
        if self.critic is not None:
            out["critic/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.critic.parameters(),
                                                                           self.cfg.max_grad_norm))
            for group in self.critic_optimizer.param_groups:
                group["lr"] = self.critic_lr * lr_scale
            self.critic_optimizer.step()
        return out

    # ------------------------------------------------------------------ weights and state
    def export_weights(self) -> dict[str, torch.Tensor]:
        """The compute weights by Hugging Face name (bf16 when the sampler is bf16): what a
        Sampler's ``load_weights`` takes. Views, not copies: the in-process engine shares them.
        Under fsdp2 (sharded) whole copies in the sampler's dtype: a collective every rank runs
        after each step (trainers.learner_group), cached until the next optimizer step."""
        if self.fsdp is not None:
            return self.fsdp.full_weights(self.policy, self.sampler_dtype)
        if self.lora is not None:  # merged (W + alpha/r BA) in the sampler's dtype, by Hugging Face name
            return self.lora.sampler_weights()
        return {name: p.detach() for name, p in self.model.named_parameters()}

    def checkpoint_model(self):
        """What a checkpoint saves with ``save_pretrained``: the policy, or under fsdp2 the
        policy with its whole fp32 weights (gathered by ``state_dict``'s collective), or under LoRA
        the adapter alone (adapter_model.safetensors + adapter_config.json)."""
        if self.lora is not None:
            return self.lora.checkpoint()
        if self.fsdp is None:
            return self.policy
        from posttrain.distributed.fsdp import WholeWeights

        return WholeWeights(self.policy, self.fsdp.full_state(self)["weights"])

    def fp32_policy(self):
        """Context in which ``self.policy`` holds its fp32 master weights (save or load them)."""
        return self.optimizer.materialized() if self.split_master else nullcontext()

    def state_dict(self) -> dict:
        if self.fsdp is not None:  # the whole optimizer state (a collective; cached per step)
            return {"optimizer": self.fsdp.full_state(self)["optimizer"], "critic_optimizer": None}
        return {"optimizer": self.optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict() if self.critic is not None else None}

    def extra_weights(self) -> Optional[dict[str, dict[str, torch.Tensor]]]:
        return {"critic": self._critic_state()} if self.critic is not None else None

    def _critic_state(self) -> dict[str, torch.Tensor]:
        """The critic's weights; under LoRA its trainable ones (adapter and head: its frozen base is
        the policy's base, loaded with it)."""
        if self.lora is None:
            return self.critic.state_dict()
        return {n: p.detach() for n, p in self.critic.named_parameters() if p.requires_grad}

    def load_checkpoint(self, checkpoint, state: dict) -> None:
        """Weights (exact fp32 masters), optimizer state and critic from a checkpoint directory."""
        from safetensors.torch import load_file, load_model

        self._not_sharded("load a checkpoint")
        if self.lora is not None:
            self.lora.load_adapter(checkpoint)
        else:
            with self.fp32_policy():
                load_model(self.policy, str(checkpoint / "model.safetensors"), strict=False)
        critic = load_file(str(checkpoint / "critic.safetensors")) if self.critic is not None else None
        self._load(state, critic)

    def replica_state(self) -> dict:
        """Everything another replica needs to continue exactly as this one: fp32 master weights,
        optimizer and critic state (copies; plain tensors, so it pickles through Ray)."""
        self._not_sharded("copy its state to another replica")
        with self.fp32_policy():
            weights = {k: v.detach().clone() for k, v in self.policy.state_dict().items()} if self.lora is None \
                else {k: v.clone() for k, v in self.lora.adapter_state().items()}  # the base never moves
        return {"weights": weights, **self.state_dict(),
                "critic": {k: v.clone() for k, v in self._critic_state().items()} if self.critic else None}

    def load_replica_state(self, payload: dict) -> None:
        """The inverse of ``replica_state``: this learner becomes bit-identical to the sender."""
        self._not_sharded("take a replica's state")
        if self.lora is not None:
            self.lora.load_adapter_state(payload["weights"], "the replica state")
        else:
            with self.fp32_policy():
                self.policy.load_state_dict(payload["weights"], strict=False)
        self._load(payload, payload["critic"])

    def _not_sharded(self, what: str) -> None:
        if self.fsdp is not None:
            raise RuntimeError(f"a sharded (fsdp2) learner cannot {what}: that happens before sharding")

    def _load(self, state: dict, critic: Optional[dict]) -> None:
        self._refresh_compute_copy()
        self.optimizer.load_state_dict(state["optimizer"])
        if self.critic is not None:
            result = self.critic.load_state_dict(critic, strict=self.lora is None)
            trainable = {n for n, p in self.critic.named_parameters() if p.requires_grad}
            if set(critic) != trainable and self.lora is not None:
                raise ValueError(f"the saved critic does not fit this LoRA critic (missing "
                                 f"{sorted(trainable - set(critic))[:3]}, unexpected {result.unexpected_keys[:3]})")
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])


def share_prompts_across_micro_batches(batch: Rollouts, micro_batch_size: int) -> bool:
    """Whether one prompt pass for the whole mini-batch pays: some prompt repeats, and the pass
    (distinct prompts x prompt width) is no larger than one micro-batch's forward, since its
    activations stay alive until the mini-batch's last backward."""
    distinct = torch.unique(torch.cat([batch.prompt_ids, batch.prompt_mask.long()], 1), dim=0).shape[0]
    width, longest = batch.prompt_ids.shape[1], int(batch.completion_lengths.max())
    return distinct < len(batch) and distinct * width <= micro_batch_size * (width + longest)


# A micro-batch's fixed cost in units of rows x width^2, attention's cost. For SmolLM2-135M on this
# project's 2-core host a cell costs ~1.1-1.5 us (forward + backward, all layers) and another pass
# ~0.3 s (its kernel launches, and the shared prompt pass's recompute once there are several);
# twice that, so that a cut is made only where it clearly pays: 2^19 cells, ~0.6-0.8 s.
BUCKET_OVERHEAD_CELLS = 1 << 19


def length_buckets(batch: Rollouts, max_rows: int, max_tokens: int) -> list[torch.Tensor]:
    """Row indices of micro-batches: rows sorted by completion length, cut into contiguous runs
    of at most ``max_rows`` rows and ``max_tokens`` padded tokens (rows x (prompt width + longest
    completion in the run); 0 = no token limit; a run holds at least one row).

    Among those, the cuts minimise  sum over runs of (BUCKET_OVERHEAD_CELLS + rows x width^2)
    (dynamic programming over the sorted rows): attention runs on the padded [rows, width] grid
    while the token-wise work skips padding, so one long completion in a run of short ones costs
    its width squared on every row. At 8 prompts x 4 samples of up to 256 tokens, cutting by the
    caps alone put 30 rows padded to 265 tokens in one run (SDPA's backward: ~130 ms a layer);
    this cut (27 rows of up to 127 tokens, 5 of up to 300) took the forward and backward from
    9.4 to 6.3 s. Sorting keeps padding small; the token cap bounds activation memory.
    """
    order = torch.argsort(batch.completion_lengths, stable=True)
    lengths = batch.completion_lengths[order].tolist()
    prompt_width = int(batch.prompt_mask.any(0).sum())
    n = len(lengths)
    best = [0.0] + [float("inf")] * n  # best[i]: cost of the first i sorted rows
    cut = [0] * (n + 1)
    for i in range(1, n + 1):
        width = prompt_width + lengths[i - 1]
        for j in range(i - 1, max(0, i - max_rows) - 1, -1):
            rows = i - j
            if max_tokens and rows > 1 and rows * width > max_tokens:
                break  # more rows only widen the run further
            cost = best[j] + BUCKET_OVERHEAD_CELLS + rows * width * width
            if cost < best[i]:
                best[i], cut[i] = cost, j
    buckets, i = [], n
    while i > 0:
        buckets.append(order[cut[i]:i])
        i = cut[i]
    return buckets[::-1]


def trim(batch: Rollouts, trim_prompt: bool = True) -> Rollouts:
    """Drop completion right-padding (and prompt left-padding) shared by the whole micro-batch."""
    p_keep = batch.prompt_mask.any(0).nonzero()
    c_len = int(batch.completion_mask.sum(-1).max())
    p0 = int(p_keep[0]) if p_keep.numel() and trim_prompt else 0
    out = copy.copy(batch)
    out.prompt_ids, out.prompt_mask = batch.prompt_ids[:, p0:], batch.prompt_mask[:, p0:]
    if batch.prompt_routing is not None:  # MoE: the sampler's routing of the prompt tokens
        out.prompt_routing = batch.prompt_routing[:, p0:]
    for name in ("completion_ids", "completion_mask", "loss_mask", "behaviour_logprobs", "entropies", "advantages",
                 "old_logprobs", "ref_logprobs", "values", "returns", "is_weights", "action_mask",
                 "token_selection", "completion_routing", "completion_router_probs"):
        value = getattr(batch, name)
        if value is not None:
            setattr(out, name, value[:, :c_len])
    return out
