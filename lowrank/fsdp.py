"""FSDP under `accelerate launch --config_file recipes/accelerate/fsdp-qlora.yaml`: whether a run is
sharded, the settings it cannot honour, preparing the model and optimizer together, and gathering the
adapter to save. lowrank.train.make_accelerator refuses an FSDP launch of a stage not in FSDP_STAGES.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from lowrank.errors import UserError
from lowrank.plan.sharding import FSDP_STAGES

# FSDP_STAGES (lowrank.plan.sharding) are the stages that train under an FSDP config. PPO and GRPO switch adapters (set_adapter) between sampling
# and scoring and generate token by token: under FSDP2 every switch reshards the PeftModel (peft's FSDP
# caveat 6) and every generated token all-gathers each layer. Reward (its score head is peft's
# modules_to_save, which peft calls untested under FSDP) and DPO (the reference adapter's log-probs
# up front) have not been made to run sharded yet.
FSDP_CONFIG = "recipes/accelerate/fsdp-qlora.yaml"


def fsdp_requested() -> bool:
    """Whether the processes were launched with an FSDP config (`accelerate launch` then sets ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def is_fsdp(accelerator) -> bool:
    """Whether ``accelerator`` shards the model with FSDP."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def check_fsdp_settings(optim_bits: int) -> None:
    """Refuse the settings a stage cannot honour under FSDP, before anything loads.

    bitsandbytes' paged optimizers run their kernels on raw tensor pointers, which FSDP2's sharded
    DTensor parameters do not expose, and peft reports paged 8-bit AdamW failing at checkpoints under
    FSDP-QLoRA: the optimizer is torch's AdamW (32-bit), whose state FSDP shards over the GPUs anyway.
    """
    if optim_bits != 32:
        raise UserError(f"--optim-bits {optim_bits}: under FSDP the optimizer is torch's 32-bit AdamW, sharded over "
                        "the GPUs (bitsandbytes' paged 8-bit AdamW cannot step sharded parameters); pass --optim-bits 32")


def prepare_model_and_optimizer(accelerator, model, make_optimizer: Callable[[list], torch.optim.Optimizer]):
    """``accelerator.prepare`` the model and an optimizer over its trainable parameters; returns (model,
    optimizer, trainable parameters as the optimizer steps them).

    DDP (and one process): the model is wrapped and the optimizer is used as built. FSDP2: accelerate
    shards the model (and re-points the optimizer at the sharded parameters), so both go through
    ``prepare`` together, and the parameters to clip are read back from the optimizer.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params)
    if not is_fsdp(accelerator):
        return accelerator.prepare(model), optimizer, params
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, [p for group in optimizer.param_groups for p in group["params"]]


def gathered_trainable_state(accelerator, model) -> dict[str, torch.Tensor] | None:
    """Under FSDP, the trainable parameters (the adapter) whole, on the CPU, by name; None otherwise.

    Every process must call it (each sharded parameter is all-gathered); the frozen base is not gathered.
    """
    if not is_fsdp(accelerator):
        return None
    state = {}
    for name, param in accelerator.unwrap_model(model).named_parameters():
        if param.requires_grad:
            whole = param.full_tensor() if hasattr(param, "full_tensor") else param
            state[name] = whole.detach().cpu()
    return state


def _optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps torch's


def full_optimizer_state(accelerator, model, optimizer) -> dict | None:
    """Under FSDP, the optimizer state whole (every shard gathered, keyed by parameter name) as a checkpoint
    holds it, so that a run resumes on any number of processes; None otherwise.

    Every process must call it (torch.distributed.checkpoint gathers the shards); the main process gets the
    whole state in CPU memory, the others an empty one, so no GPU holds a second, whole copy.
    """
    if not is_fsdp(accelerator):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, _optimizer(optimizer), options=options)


def load_full_state(accelerator, model, optimizer, trainable: dict[str, torch.Tensor], optimizer_state: dict) -> bool:
    """Under FSDP, put a checkpoint's whole adapter and optimizer state into this process's shards and
    return True; False (nothing done) otherwise. Every process must call it, each with the whole state."""
    if not is_fsdp(accelerator):
        return False
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)  # the frozen base is not in a checkpoint
    set_model_state_dict(model, trainable, options=options)
    set_optimizer_state_dict(model, _optimizer(optimizer), optimizer_state, options=options)
    return True
