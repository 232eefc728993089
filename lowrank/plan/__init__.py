"""Peak GPU memory of a training run, predicted before it starts (`lowrank plan`), and the hooks the
training stages call to log that plan and record the measured peak beside it.

The memory model lives in three modules, re-exported here (``from lowrank import plan``,
``plan.estimate(...)``): lowrank.plan.structure (the model's shape, counted on the meta device;
weights, LoRA adapters and optimizer state in bytes), lowrank.plan.estimates (the activations and
phases of each stage: ``estimate`` and ``Plan``; its docstring and docs/plan.md explain the model)
and lowrank.plan.fit (the table `lowrank plan` prints, the largest micro-batch that fits a card).
The stage hooks stay in this module: the stages call them as ``plan.report_start`` and so on, and
``peak_metrics`` calls ``report_end`` here, so a test that replaces a hook on this module (as
tests/test_fast_step.py does, with no GPU) replaces it for every caller.
"""

from __future__ import annotations

import functools
import json
import logging

from lowrank.plan.activations import BACKWARD_BYTES_PER_TOKEN, FORWARD_INTERMEDIATE_TENSORS
from lowrank.plan.estimates import (CUBLAS_WORKSPACE_BYTES, CUDA_CONTEXT_BYTES, DEFAULT_CARD_BYTES,
                                    GRPO_HEAD_LOGIT_BYTES, LOSS_LOGIT_BYTES, SCORING_LOGIT_BYTES, STAGE_DEFAULTS,
                                    STAGES, GiB, MiB, Plan, estimate)
from lowrank.plan.fit import format_plan, largest_tokens_per_step
from lowrank.plan.structure import (OPTIM_8BIT_MIN_NUMEL, PAGED_MIN_NUMEL, SHAPES, Architecture, architecture,
                                    int8_bytes, lora_targets, lora_tensors, nf4_bytes, optimizer_bytes, weight_bytes)

__all__ = [
    "BACKWARD_BYTES_PER_TOKEN", "CUBLAS_WORKSPACE_BYTES", "CUDA_CONTEXT_BYTES", "DEFAULT_CARD_BYTES",
    "FORWARD_INTERMEDIATE_TENSORS", "GRPO_HEAD_LOGIT_BYTES", "LOSS_LOGIT_BYTES", "OPTIM_8BIT_MIN_NUMEL",
    "PAGED_MIN_NUMEL", "SCORING_LOGIT_BYTES", "SHAPES", "STAGE_DEFAULTS", "STAGES", "Architecture", "GiB", "MiB",
    "Plan", "architecture", "estimate", "format_plan", "int8_bytes", "largest_tokens_per_step", "lora_targets",
    "lora_tensors", "nf4_bytes", "optimizer_bytes", "peak_metrics", "plan_for_training", "report_end",
    "report_start", "settings_from_config", "weight_bytes",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Hooks for the training stages on CUDA
# --------------------------------------------------------------------------------------------

def _adapter_shape(adapter_dir: str) -> dict:
    """lora_r and target_modules of a saved PEFT adapter (its adapter_config.json); {} when unreadable."""
    from pathlib import Path

    try:
        config = json.loads((Path(adapter_dir).expanduser() / "adapter_config.json").read_text())
        return {"lora_r": int(config["r"]), "target_modules": config["target_modules"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def settings_from_config(stage: str, config, *, prompt_len: int | None = None) -> dict:
    """estimate() keyword arguments for a stage's config dataclass (SFTConfig, RewardConfig, PPOConfig,
    GRPOConfig, DPOConfig). Stages that start from an SFT adapter take its rank and target modules."""
    get = functools.partial(getattr, config)
    settings = {"stage": stage, "quant": get("quant", "auto"), "lora_r": get("lora_r", 16),
                "gradient_checkpointing": get("gradient_checkpointing", None)}
    sft_adapter = get("sft_adapter", "") if stage in ("ppo", "grpo", "dpo") else ""
    if sft_adapter:
        settings.update(_adapter_shape(sft_adapter))
    if stage == "ppo":
        settings.update(ppo_rollout_batch=get("rollout_batch_size", 8) * get("samples_per_prompt", 1),
                        ppo_minibatch=get("minibatch_size", 4),
                        ppo_new_tokens=get("max_new_tokens", 256), ppo_prompt_len=prompt_len or 256,
                        ppo_reference_adapter=bool(sft_adapter), fast_rollout=get("fast_rollout", "off"))
        return settings
    if stage == "grpo":
        completions = get("group_size", 8) * get("prompts_per_step", 4)
        minibatch = get("minibatch_size", 0) or completions  # GRPOConfig.minibatch and .micro_batch
        settings.update(grpo_group_size=get("group_size", 8), grpo_prompts_per_step=get("prompts_per_step", 4),
                        grpo_minibatch=minibatch, grpo_micro_batch=get("micro_batch_size", 0) or minibatch,
                        grpo_reward_adapter=bool(get("reward_adapter", "")), reference_adapter=bool(sft_adapter),
                        ppo_new_tokens=get("max_new_tokens", 128), ppo_prompt_len=prompt_len or 256,
                        fast_rollout=get("fast_rollout", "off"))
        return settings
    if stage == "dpo":  # rows: the chosen and the rejected sequence of each pair; batch_size is pairs per step
        max_length = get("max_length", 512)
        micro = 2 * get("micro_batch_size", 2) * max_length
        settings.update(max_length=max_length, tokens_per_micro_batch=micro, reference_adapter=bool(sft_adapter),
                        tokens_per_step=max(micro, 2 * get("batch_size", 8) * max_length))
        return settings
    max_length = get("max_length", 1024)
    rows = get("batch_size", 4) * (2 if stage == "reward" else 1)  # reward: chosen and rejected rows
    micro = get("tokens_per_micro_batch", 0) or rows * max_length
    settings.update(target_modules=get("target_modules", ["all-linear"]), lora_dropout=get("lora_dropout", None),
                    max_length=max_length, tokens_per_micro_batch=micro, optim_bits=get("optim_bits", 32),
                    tokens_per_step=get("tokens_per_step", 0) or micro * get("gradient_accumulation_steps", 1))
    return settings


def plan_for_training(model_path: str, stage: str, config, device, *, prompt_len: int | None = None,
                      gpus: int = 1) -> Plan | None:
    """The plan of a run about to start on ``device`` (each card's of ``gpus`` under FSDP); None off CUDA
    or when it cannot be made.

    Never raises: a plan is advice, and a run must not fail because its plan could not be made.
    """
    if not str(device).startswith("cuda"):
        return None
    try:
        return estimate(model_path, **settings_from_config(stage, config, prompt_len=prompt_len), gpus=gpus)
    except Exception as e:  # noqa: BLE001 - see the docstring
        log.warning("memory plan: could not estimate (%s)", str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None


def report_start(plan: Plan | None, device=None) -> None:
    """Log the plan, warn when it exceeds the free GPU memory, and reset the peak counter. Call before loading."""
    if plan is None:
        return
    import torch

    free, card = torch.cuda.mem_get_info(device)
    # Memory this process already holds in torch's cache can be reused; the CUDA context is already made.
    available = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    needed = plan.needed - plan.outside.get("CUDA context", 0)  # this process's context exists already
    log.info("memory plan:\n%s", format_plan(plan, card))
    if needed > available:
        log.warning("memory plan: this run needs about %.1f GiB of GPU memory and %.1f GiB are free: expect an "
                    "out-of-memory error; lower the tokens per micro-batch (batch size or max length) and "
                    "raise gradient accumulation instead (`lowrank plan` shows what fits)",
                    needed / GiB, available / GiB)
    torch.cuda.reset_peak_memory_stats(device)


def report_end(plan: Plan | None, device=None) -> int | None:
    """Log the measured peak (torch.cuda.max_memory_allocated) beside the plan's; return the measured bytes."""
    if plan is None:
        return None
    import torch

    measured = torch.cuda.max_memory_allocated(device)
    log.info("memory plan: peak allocated %.2f GiB measured, %.2f GiB planned (%+.1f%%)",
             measured / GiB, plan.total / GiB, 100 * (plan.total / max(1, measured) - 1))
    return measured


def peak_metrics(plan: Plan | None, device=None) -> dict:
    """{"peak_gpu_gib", "planned_gpu_gib"} for a stage's lowrank.json metrics (logged too); {} off CUDA."""
    measured = report_end(plan, device)
    if measured is None:
        return {}
    return {"peak_gpu_gib": round(measured / GiB, 3), "planned_gpu_gib": round(plan.total / GiB, 3)}
