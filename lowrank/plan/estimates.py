"""The memory model: a training stage's peak GPU memory, phase by phase (`estimate`).

The model of memory, term by term, with where each number comes from, is docs/plan.md. In short:
static terms (base weights in their quantized layout, LoRA adapters, optimizer state, cuBLAS
workspaces) plus the activations of the phase with the most live memory: for SFT, the reward
model and DPO the backward pass through the last decoder layer (every layer's checkpointed input,
one layer's recomputed activations and its gradients) or the chunked loss; for PPO the largest of
rollout generation (KV cache), the no-gradient scoring passes and the PPO minibatch update; for
GRPO the largest of generation, reward-adapter scoring, the no-gradient log-prob passes and the
micro-batched update (its loss head or its backward).

Parameters are counted exactly on a model built on the meta device (no weights, no download for
named shapes); the activation terms are per-token sums over the tensors autograd saves, checked
on an H200 against ``torch.cuda.max_memory_allocated`` (the constants below). A plan's ``total``
predicts that figure; the CUDA context and a paged optimizer's state lie outside torch's
allocator and are added for the question whether a card holds the run. Everything is in bytes;
1 GiB = 2**30 bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lowrank.errors import UserError
from lowrank.fast_rollout import check as check_fast_rollout
from lowrank.plan.activations import (FORWARD_INTERMEDIATE_TENSORS, backward_extra_per_token,
                                      layer_saved_per_token)
from lowrank.plan.sharding import check_gpus, per_card
from lowrank.plan.structure import as_architecture, lora_targets, lora_tensors, optimizer_bytes, weight_bytes

GiB = 1 << 30
MiB = 1 << 20
# The default card: an RTX 4090, 24 GiB (nvidia-smi reports 24564 MiB, 23.99 GiB).
DEFAULT_CARD_BYTES = 24 * GiB
STAGES = ("sft", "reward", "ppo", "grpo", "dpo")

# --- constants of the memory model (docs/plan.md says where each comes from) ---------------
# Outside torch's allocator, so not in torch.cuda.max_memory_allocated but on the card all the same:
# the CUDA context (driver, kernels of torch, cuBLAS and bitsandbytes); 0.70 GiB measured on an
# H200 with torch 2.11 + CUDA 13 (torch.cuda.mem_get_info after the first matmul).
CUDA_CONTEXT_BYTES = 700 * MiB
# Inside the allocator: one cuBLAS workspace per stream that runs matmuls (the main thread and the
# autograd thread), 32 MiB each on Hopper.
CUBLAS_WORKSPACE_BYTES = 64 * MiB
# Chunked loss: per logit of a chunk, bf16 logits (2) + fp32 copy (4) + log-softmax (4) in the
# forward pass; + its gradient (4) in backward, minus the fp32 copy, plus a bf16 gradient (2): 14.
LOSS_LOGIT_BYTES = 14


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """A predicted peak. ``breakdown`` (term -> bytes) is what torch's allocator holds at the peak
    (its sum, ``total``, is the prediction of torch.cuda.max_memory_allocated); ``outside`` is what
    the card holds besides (the CUDA context, a paged optimizer's state); ``needed`` is both."""

    model: str
    stage: str
    phase: str  # the phase of the step where the peak falls
    breakdown: dict[str, int]
    outside: dict[str, int] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)  # every phase's predicted peak allocated (its total)

    @property
    def total(self) -> int:
        return sum(self.breakdown.values())

    @property
    def needed(self) -> int:
        return self.total + sum(self.outside.values())

    def fits(self, card_bytes: int = DEFAULT_CARD_BYTES) -> bool:
        return self.needed <= card_bytes


# What each stage's config defaults to (its dataclass in lowrank.<stage>; tests/test_plan.py checks that
# they agree), written out so that planning imports no stage module: the stages import this one.
# lowrank.roles.build_roles sets every dropout to 0 for the stages with a policy and a reference.
STAGE_DEFAULTS = {
    "sft": {"gradient_checkpointing": True, "lora_dropout": 0.05},
    "reward": {"gradient_checkpointing": True, "lora_dropout": 0.05},
    "ppo": {"gradient_checkpointing": False, "lora_dropout": 0.0},
    "grpo": {"gradient_checkpointing": False, "lora_dropout": 0.0},
    "dpo": {"gradient_checkpointing": True, "lora_dropout": 0.0},
}


def _pick_peak(model: str, stage: str, phases: dict[str, dict[str, int]], outside: dict[str, int],
               settings: dict) -> Plan:
    """The plan of the phase with the largest total, with every phase's total beside it; per card of
    ``settings["gpus"]`` under FSDP (lowrank.plan.sharding.per_card)."""
    gpus, layers = settings.get("gpus", 1), settings.get("layers", 1)
    phases = {name: per_card(terms, gpus, layers, computing=name != "optimizer step")
              for name, terms in phases.items()}
    totals = {name: sum(terms.values()) for name, terms in phases.items()}
    phase = max(totals, key=totals.get)
    return Plan(model, stage, phase, _nonzero(phases[phase]), _nonzero(outside), settings, totals)


def estimate(model, *, stage: str = "sft", quant: str = "auto", lora_r: int = 16, target_modules=("all-linear",),
             lora_dropout: float | None = None, tokens_per_step: int | None = None,
             tokens_per_micro_batch: int | None = None, max_length: int = 1024, optim_bits: int = 32,
             paged_optimizer: bool | None = None, gradient_checkpointing: bool | None = None,
             loss_chunk_tokens: int | None = None, fp32_norms: bool = False, ppo_rollout_batch: int = 8,
             ppo_minibatch: int = 4, ppo_prompt_len: int = 256, ppo_new_tokens: int = 256,
             ppo_reference_adapter: bool = True, reference_adapter: bool = True, grpo_group_size: int = 8,
             grpo_prompts_per_step: int = 4, grpo_minibatch: int | None = None,
             grpo_micro_batch: int | None = None, grpo_reward_adapter: bool = False,
             fast_rollout: str = "off", gpus: int = 1) -> Plan:
    """Predict the peak CUDA memory of one training stage (see the module docstring and docs/plan.md).

    ``model``: a named shape, 'tiny', a model dir, a hub id, a dict of config.json fields, or an
    :class:`Architecture`. Memory depends on the micro-batch, not on the step:
    ``tokens_per_micro_batch`` defaults to ``tokens_per_step`` (no gradient accumulation), and a
    larger step is reached by accumulating micro-batches at no extra memory. A micro-batch is
    ceil(tokens / max_length) rows of ``max_length`` (packed SFT rows; reward rows are the chosen and
    rejected sequences). PPO: ``ppo_rollout_batch`` prompts of ``ppo_prompt_len`` tokens get
    ``ppo_new_tokens`` each, and updates take ``ppo_minibatch`` rollouts at a time
    (``tokens_per_step`` is not used). GRPO: ``grpo_prompts_per_step`` prompts of ``ppo_prompt_len``
    tokens get ``grpo_group_size`` completions of ``ppo_new_tokens`` each, all sampled at once; the
    log-prob passes and the update take ``grpo_micro_batch`` completions at a time (default: the
    minibatch, ``grpo_minibatch``, default: all of a step's), as GRPOConfig.micro_batch does;
    ``grpo_reward_adapter`` adds a frozen reward adapter that scores all completions at once. DPO:
    rows are the chosen and the rejected sequence of each pair, so a micro-batch of p pairs is
    ``tokens_per_micro_batch`` = 2 p ``max_length``. ``reference_adapter`` (GRPO, DPO; PPO reads
    ``ppo_reference_adapter``): the frozen reference is a copy of the SFT adapter, not the bare base.
    ``fast_rollout`` (PPO, GRPO: "merged" or "merged-graphs", lowrank.fast_rollout) adds the merged
    copy of the model it samples from, every parameter in the compute dtype, for the whole run; its
    static KV cache is as large as the dynamic one at full length, which generation already counts.
    ``None`` settings take the stage's defaults: gradient checkpointing and LoRA dropout from its
    config (0 for the stages with a reference: lowrank.roles turns dropout off), a paged optimizer
    for every stage on a quantized base (lowrank.train.build_optimizer). ``quant`` "auto" is nf4, what
    a run on CUDA takes.

    ``gpus`` > 1: the plan of each card of an FSDP run (recipes/accelerate/fsdp-qlora.yaml; sft only):
    weights, adapters, their gradients and optimizer state are divided by ``gpus``, activations are not;
    the weights FSDP gathers for compute are added (lowrank.plan.sharding); the optimizer is torch's 32-bit
    AdamW (not paged), and the loss takes the whole micro-batch's logits (FSDP shards the LM head, so
    lowrank.lm_loss cannot run it chunk by chunk after the forward).
    """
    from lowrank.models import resolve_quant

    if stage not in STAGES:
        raise UserError(f"--stage: unknown '{stage}'; choose {', '.join(STAGES)}")
    quant = resolve_quant(quant, cuda=True)
    check_fast_rollout(fast_rollout)
    if lora_r < 1:
        raise UserError(f"--lora-r must be at least 1, got {lora_r}")
    if optim_bits not in (8, 32):
        raise UserError(f"--optim-bits must be 8 or 32, got {optim_bits}")
    check_gpus(gpus, stage, quant, optim_bits)
    if gpus > 1:
        paged_optimizer = False  # torch's AdamW under FSDP (lowrank.fsdp.check_fsdp_settings)
    arch = as_architecture(model)
    defaults = STAGE_DEFAULTS[stage]
    checkpointed = defaults["gradient_checkpointing"] if gradient_checkpointing is None else gradient_checkpointing
    dropout = (defaults["lora_dropout"] if lora_dropout is None else lora_dropout) > 0
    paged = (quant != "none") if paged_optimizer is None else paged_optimizer
    stream = 4 if (fp32_norms and quant != "none") else 2  # bytes per value of the residual stream
    h, layers, vocab = arch.hidden, arch.layers, arch.vocab

    static = weight_bytes(arch, quant, fp32_norms=fp32_norms and quant != "none")
    static["cuBLAS workspaces"] = CUBLAS_WORKSPACE_BYTES
    outside = {"CUDA context": CUDA_CONTEXT_BYTES}
    targets = lora_targets(arch, target_modules)
    settings = {"quant": quant, "lora_r": lora_r, "gradient_checkpointing": checkpointed, "lora_dropout": dropout,
                "paged_optimizer": paged, "optim_bits": optim_bits if paged else 32, "stream_bytes": stream,
                "gpus": gpus, "layers": layers}
    if stage in ("ppo", "grpo") and fast_rollout != "off":
        static["merged rollout copy"] = 2 * arch.params  # every parameter in bf16 (lowrank.fast_rollout)
        settings["fast_rollout"] = fast_rollout
    if stage == "ppo":
        return _estimate_ppo(arch, static, outside, targets, settings, r=lora_r, checkpointed=checkpointed,
                             stream=stream, batch=ppo_rollout_batch, minibatch=min(ppo_minibatch, ppo_rollout_batch),
                             prompt=ppo_prompt_len, new=ppo_new_tokens, reference=ppo_reference_adapter)
    if stage == "grpo":
        completions = grpo_group_size * grpo_prompts_per_step
        minibatch = min(grpo_minibatch or completions, completions)
        return _estimate_grpo(arch, static, outside, targets, settings, r=lora_r, checkpointed=checkpointed,
                              stream=stream, group=grpo_group_size, prompts=grpo_prompts_per_step,
                              minibatch=minibatch, micro=min(grpo_micro_batch or minibatch, minibatch),
                              prompt=ppo_prompt_len, new=ppo_new_tokens, reference=reference_adapter,
                              reward=grpo_reward_adapter)

    tokens = tokens_per_micro_batch or tokens_per_step or 4 * max_length
    if tokens < 1 or max_length < 1:
        raise UserError(f"tokens per micro-batch and --max-length must be at least 1, got {tokens} and {max_length}")
    seq = min(max_length, tokens)
    rows = math.ceil(tokens / seq)
    tokens = rows * seq
    step = max(tokens_per_step or tokens, tokens)
    settings.update(tokens_per_micro_batch=tokens, rows=rows, max_length=seq,
                    accumulation=math.ceil(step / tokens), tokens_per_step=step)

    tensors = lora_tensors(targets, lora_r) + ([h + 1] if stage == "reward" else [])  # + the score head
    trainable = sum(tensors)
    static["adapters"] = 4 * trainable
    if stage == "dpo":
        settings.update(pairs=max(1, rows // 2), reference_adapter=reference_adapter)
        static["adapters (reference)"] = 4 * trainable if reference_adapter else 0
    static["optimizer state"], outside["optimizer state (paged)"] = optimizer_bytes(
        tensors, bits=settings["optim_bits"], paged=paged)
    # DPO accumulates micro-batches' gradients in place: from the second on, all of them are alive. (SFT
    # and the reward model do the same; their plans were calibrated without this term.)
    accumulated = {"gradients (accumulated)": 4 * trainable if stage == "dpo" and settings["accumulation"] > 1 else 0}

    saved = layer_saved_per_token(arch, targets, stream=stream, dropout=dropout, checkpointed=checkpointed,
                                   seq=seq, r=lora_r, int8=quant == "int8")
    mask = rows * seq * seq  # boolean block-causal (packed) or padding mask, (rows, 1, seq, seq)
    if checkpointed:
        stored = {"checkpoints (layer inputs)": tokens * h * (2 + (layers - 1) * stream)}
        layer = {"one layer recomputed": tokens * saved}
    else:
        stored = {"activations (all layers)": tokens * saved * layers}
        layer = {}
    backward = {**static, **accumulated, **stored, "attention mask": mask, **layer,
                "gradients in flight": tokens * (h * stream + backward_extra_per_token(arch, stream))
                + 4 * trainable // layers}
    phases = {"backward": backward}
    if stage in ("sft", "dpo"):  # lowrank's chunked LM head on the loss (DPO: response) positions only
        chunk = min(loss_chunk_tokens or _loss_chunk_tokens(vocab), tokens) if gpus == 1 else tokens
        phases["loss"] = {**static, **accumulated, **stored, "attention mask": mask,
                          "final norm": tokens * (4 * h + h * stream),  # its fp32 input and its output
                          # the positions with loss, their gradient, and that gradient scattered back
                          "loss hidden states": 3 * tokens * h * 2,
                          "logits (loss chunk)" if gpus == 1 else "logits (whole micro-batch)":
                          LOSS_LOGIT_BYTES * chunk * vocab}
        settings["loss_chunk_tokens"] = chunk
    if stage == "dpo":
        # dpo.reference_logprobs, once before training (and evaluate() alike): the same micro-batches
        # without gradient; per chunk of the head bf16 logits, an fp32 copy and its log-softmax.
        phases["reference log-probs (no gradient)"] = {
            **static, "attention mask": mask, "hidden states": tokens * h * (stream + 2),
            "forward temporaries": max(tokens * FORWARD_INTERMEDIATE_TENSORS * arch.intermediate * stream,
                                       (2 + 4 + 4) * chunk * vocab)}
    phases["optimizer step"] = {**static, "gradients": 4 * trainable,
                                "optimizer temporaries": 0 if paged else 8 * trainable}
    return _pick_peak(str(arch.name), stage, phases, outside, settings)


def _estimate_ppo(arch, static, outside, targets, settings, *, r, checkpointed, stream, batch, minibatch, prompt,
                  new, reference) -> Plan:
    """PPO: one base, four adapters; the largest of generation, scoring and minibatch update."""
    if min(batch, minibatch, new) < 1 or prompt < 1:
        raise UserError("PPO rollout batch, minibatch, prompt length and new tokens must be at least 1")
    h, inter, layers, vocab = arch.hidden, arch.intermediate, arch.layers, arch.vocab
    adapter = lora_tensors(targets, r)
    head = arch.hidden + 1
    trainable = 2 * adapter + [head]  # policy LoRA; value LoRA and its head copy
    static["adapters (policy, value)"] = 4 * sum(trainable)
    static["adapters (reference, reward)"] = 4 * ((sum(adapter) if reference else 0) + sum(adapter) + 2 * head)
    static["optimizer state"], outside["optimizer state (paged)"] = optimizer_bytes(
        trainable, bits=settings["optim_bits"], paged=settings["paged_optimizer"])
    grads = {"gradients": 4 * sum(trainable)}  # kept from the last minibatch (zeroed before the next)
    seq = prompt + new
    kv = batch * seq * layers * 2 * arch.kv_heads * arch.head_dim * stream
    generation = {**static, **grads, "KV cache": kv + kv // layers, "sampling logits": 2 * batch * vocab * 4}
    tokens = batch * seq
    logits = batch * (new + 1) * vocab * (2 + 4 + 4)  # bf16 logits, their fp32 copy, the fp32 log-softmax
    scoring = {**static, **grads, "hidden states": tokens * h * stream,
               "rollout logits": max(logits, tokens * FORWARD_INTERMEDIATE_TENSORS * inter * stream)}
    mb_tokens = minibatch * seq
    saved = layer_saved_per_token(arch, targets, stream=stream, dropout=False, checkpointed=checkpointed,
                                   seq=seq, r=r, int8=settings["quant"] == "int8")
    if checkpointed:
        stored = {"checkpoints (layer inputs)": mb_tokens * h * (2 + (layers - 1) * stream),
                  "one layer recomputed": mb_tokens * saved}
    else:
        stored = {"activations (all layers)": mb_tokens * saved * layers}
    update = {**static, **stored, "attention mask": minibatch * seq * seq,
              "gradients in flight": mb_tokens * (h * stream + backward_extra_per_token(arch, stream))
              + 4 * sum(trainable) // layers,
              "policy logits": minibatch * new * vocab * 4 + 2 * mb_tokens * h * 4}
    phases = {"rollout generation": generation, "scoring": scoring, "PPO update": update}
    settings.update(rollout_batch=batch, minibatch=minibatch, prompt_len=prompt, new_tokens=new,
                    tokens_per_micro_batch=mb_tokens, reference_adapter=reference)
    return _pick_peak(str(arch.name), "ppo", phases, outside, settings)


# Per logit of the GRPO update's head (rollout.response_logprobs with entropy, then rl.grpo_token_loss):
# the bf16 logits (2) and the fp32 log-softmax autograd keeps (4) stay while rl.entropy_from_logits
# holds an fp32 copy, the softmax and their product (3 x 4). The backward through the head needs
# less (log-softmax output, its incoming and outgoing gradient: 12), the no-gradient passes
# 2 + 4 + 4 (bf16 logits, fp32 copy, log-softmax).
GRPO_HEAD_LOGIT_BYTES = 2 + 4 + 3 * 4
SCORING_LOGIT_BYTES = 2 + 4 + 4


def _estimate_grpo(arch, static, outside, targets, settings, *, r, checkpointed, stream, group, prompts,
                   minibatch, micro, prompt, new, reference, reward) -> Plan:
    """GRPO (lowrank/grpo.py): one base with the policy, its frozen reference copy and optionally a
    frozen reward adapter; no value role. Per step, the largest of: sampling all group x prompts
    completions at once (KV cache), the reward adapter scoring them at once, the no-gradient
    log-prob passes (policy, then reference) in micro-batches, and the update in micro-batches, at
    its loss head (logits over the completion tokens only) or in the backward through a layer."""
    if min(group, prompts, minibatch, micro, new, prompt) < 1:
        raise UserError("GRPO group size, prompts per step, micro-batch, prompt length and new tokens must be "
                        "at least 1")
    h, inter, layers, vocab = arch.hidden, arch.intermediate, arch.layers, arch.vocab
    adapter = lora_tensors(targets, r)
    head = h + 1
    static["adapters (policy)"] = 4 * sum(adapter)
    # The reward adapter's score head: the base's module and the adapter's copy (peft's modules_to_save).
    frozen = (sum(adapter) if reference else 0) + (sum(adapter) + 2 * head if reward else 0)
    static["adapters (reference" + (", reward)" if reward else ")")] = 4 * frozen
    static["optimizer state"], outside["optimizer state (paged)"] = optimizer_bytes(
        adapter, bits=settings["optim_bits"], paged=settings["paged_optimizer"])
    # optimizer_step zeroes the gradients with set_to_none: none live outside the update.
    completions, seq = group * prompts, prompt + new
    kv_per_token = layers * 2 * arch.kv_heads * arch.head_dim * stream
    kv = completions * seq * kv_per_token
    generation = {**static, "KV cache": kv + kv // layers,  # + one layer's cache being concatenated
                  "sampling logits": 2 * completions * vocab * 4}
    prefill_tokens = completions * prompt
    prefill = {**static, "KV cache (prompts)": prefill_tokens * kv_per_token,
               "prefill activations": prefill_tokens * (h * stream + FORWARD_INTERMEDIATE_TENSORS * inter * stream)
               + completions * prompt * prompt}
    phases = {"generation": max(generation, prefill, key=lambda terms: sum(terms.values()))}
    if reward:  # score_responses: the decoder over all completions at once, no LM head
        tokens = completions * seq
        phases["reward scoring"] = {**static, "attention mask": completions * seq * seq,
                                    "hidden states": tokens * h * stream,
                                    "forward temporaries": tokens * FORWARD_INTERMEDIATE_TENSORS * inter * stream}
    tokens = micro * seq  # one micro-batch of completions
    mask = micro * seq * seq
    phases["log-probs (no gradient)"] = {
        **static, "attention mask": mask, "hidden states": tokens * h * stream,
        "forward temporaries": max(micro * (new + 1) * vocab * SCORING_LOGIT_BYTES,
                                   tokens * FORWARD_INTERMEDIATE_TENSORS * inter * stream)}
    trainable = sum(adapter)
    accumulated = {"gradients (accumulated)": 4 * trainable if minibatch > micro else 0}
    saved = layer_saved_per_token(arch, targets, stream=stream, dropout=False, checkpointed=checkpointed,
                                   seq=seq, r=r, int8=settings["quant"] == "int8")
    if checkpointed:
        stored = {"checkpoints (layer inputs)": tokens * h * (2 + (layers - 1) * stream)}
        layer = {"one layer recomputed": tokens * saved}
    else:
        stored, layer = {"activations (all layers)": tokens * saved * layers}, {}
    phases["update: log-probs and entropy"] = {
        **static, **accumulated, **stored, "attention mask": mask,
        "final norm": tokens * (4 * h + h * stream),  # its fp32 input and its output
        "completion logits, log-softmax, entropy": micro * new * vocab * GRPO_HEAD_LOGIT_BYTES}
    phases["update: backward"] = {
        **static, **accumulated, **stored, "attention mask": mask, **layer,
        "gradients in flight": tokens * (h * stream + backward_extra_per_token(arch, stream))
        + 4 * trainable // layers}
    phases["optimizer step"] = {**static, "gradients": 4 * trainable,
                                "optimizer temporaries": 0 if settings["paged_optimizer"] else 8 * trainable}
    settings.update(group_size=group, prompts_per_step=prompts, completions=completions, minibatch=minibatch,
                    micro_batch=micro, prompt_len=prompt, new_tokens=new, tokens_per_micro_batch=tokens,
                    reference_adapter=reference, reward_adapter=reward)
    return _pick_peak(str(arch.name), "grpo", phases, outside, settings)


def _nonzero(terms: dict[str, int]) -> dict[str, int]:
    return {k: int(v) for k, v in terms.items() if v}


def _loss_chunk_tokens(vocab: int) -> int:
    """Tokens per chunk of lowrank's loss: lowrank.lm_loss.LOSS_CHUNK_LOGITS logits (at least 16 tokens)."""
    from lowrank.lm_loss import LOSS_CHUNK_LOGITS

    return max(16, int(LOSS_CHUNK_LOGITS) // vocab)
