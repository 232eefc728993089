"""PPO's four models as four named LoRA adapters on ONE base held once in memory.

| role      | adapter name | from                                  | trainable |
| policy    | "policy"     | the SFT adapter (or a fresh LoRA)      | yes       |
| reference | "reference"  | the SFT adapter (or adapters disabled) | no        |
| reward    | "reward"     | the reward adapter + its score head    | no        |
| value     | "value"      | the reward adapter + its own head copy | yes       |

A reward ensemble (`lowrank reward --ensemble K`) adds frozen roles "reward_2" .. "reward_K", one
per other member; the reward is the mean of their scores (``reward_roles``).

A role is entered only through ``use_role(model, role)``, which activates the adapter (peft's
``set_adapter``, or ``disable_adapter`` for a reference without adapter), and restores the
previous one on exit, so a role can never leak into the next forward pass.

Two peft facts this module works around (peft 0.13-0.21):
- ``set_adapter(name)`` makes the named adapter trainable and freezes the others, and the
  ``ModulesToSaveWrapper`` of the score head does the same to its per-adapter copies. Entering
  the reference or reward role would therefore unfreeze them and freeze the policy. After every
  switch we set ``requires_grad`` from the role table above and check it (``check_frozen``).
- The score head (``base.score``, see lowrank/reward.py) is wrapped by peft: each adapter that
  lists it in ``modules_to_save`` has its own copy, switched together with its LoRA weights. The
  reward and value roles thus read different heads from one module.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from torch import nn

POLICY, REFERENCE, REWARD, VALUE = "policy", "reference", "reward", "value"
ROLES = (POLICY, REFERENCE, REWARD, VALUE)
TRAINABLE_ROLES = frozenset({POLICY, VALUE})
# Sub-module names under which peft keeps per-adapter parameters: "<container>.<adapter>.weight".
_ADAPTER_CONTAINERS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                                 "lora_magnitude_vector", "modules_to_save"})


def adapter_of(parameter_name: str) -> str | None:
    """The adapter a parameter belongs to (``...q_proj.lora_A.policy.weight`` -> "policy"), or None for the base."""
    parts = parameter_name.split(".")
    for container, adapter in zip(parts, parts[1:]):
        if container in _ADAPTER_CONTAINERS:
            return adapter
    return None


def apply_trainability(model: nn.Module) -> None:
    """requires_grad = True exactly for the policy and value adapters' parameters."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(adapter_of(name) in TRAINABLE_ROLES)


def check_frozen(model: nn.Module) -> None:
    """Raise if anything outside the policy/value adapters would get a gradient (or they would not)."""
    for name, parameter in model.named_parameters():
        should = adapter_of(name) in TRAINABLE_ROLES
        if parameter.requires_grad != should:
            state = "trainable" if parameter.requires_grad else "frozen"
            raise RuntimeError(f"adapter swapping left {name} {state}")


def has_reference_adapter(model) -> bool:
    return REFERENCE in getattr(model, "peft_config", {})


@contextlib.contextmanager
def use_role(model, role: str) -> Iterator[None]:
    """Run the block with ``role``'s adapter active; restore the previous adapter (and grads) after."""
    if role not in ROLES and not is_reward_member(role):
        raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    previous = model.active_adapter
    if role == REFERENCE and not has_reference_adapter(model):
        # No SFT adapter: the reference is the bare base (peft bypasses every LoRA and head copy).
        try:
            with model.disable_adapter():
                yield
        finally:
            apply_trainability(model)  # leaving disable_adapter re-sets requires_grad too
            check_frozen(model)
        return
    model.set_adapter(role)
    apply_trainability(model)
    try:
        yield
    finally:
        model.set_adapter(previous)
        apply_trainability(model)
        check_frozen(model)


def is_reward_member(role: str) -> bool:
    """``reward_2``, ``reward_3``, ...: the other models of a reward ensemble, frozen like the reward role."""
    return role.startswith(f"{REWARD}_") and role[len(REWARD) + 1:].isdigit()


def reward_roles(model) -> list[str]:
    """The reward role and, for an ensemble, its other members' roles: the scores to average."""
    return [REWARD] + sorted((name for name in getattr(model, "peft_config", {}) if is_reward_member(name)),
                             key=lambda name: int(name.rsplit("_", 1)[1]))


def zero_value_head(model) -> None:
    """Set the value role's copy of the score head to zero, so that every value starts at 0.

    The reward model's head reads scores with offsets of their own per prompt, and it never saw a
    partial response: as a value function it explains less than a constant (explained variance
    from -6 to -40 on the demo), and GAE passes its errors straight into the advantages. The value
    adapter keeps the reward model's LoRA (its features); only the head starts from scratch.
    """
    import torch

    head = model.get_base_model().score.modules_to_save[VALUE]
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.zero_()


def trainable_parameters(model) -> dict[str, list[nn.Parameter]]:
    """The parameters of the policy and of the value adapter: the only ones given optimizer state."""
    groups: dict[str, list[nn.Parameter]] = {POLICY: [], VALUE: []}
    for name, parameter in model.named_parameters():
        adapter = adapter_of(name)
        if adapter in groups:
            groups[adapter].append(parameter)
    return groups


def build_roles(base: nn.Module, *, reward_adapter: str | Path | None = None, sft_adapter: str | Path | None = None,
                policy_lora_config=None, value: bool = True):
    """Load the role adapters onto ``base`` and return the PeftModel (policy active).

    With ``sft_adapter`` the policy and the reference both start from it (two copies of a small
    adapter, one base). Without it the policy is a fresh LoRA from ``policy_lora_config`` (B = 0,
    so it starts equal to the base) and the reference is the base with adapters disabled.
    ``reward_adapter`` adds the frozen reward role and, with ``value`` (PPO), the value role: a
    second, trainable load of the reward adapter (InstructGPT initialises the value function from
    the reward model). GRPO without a reward model and DPO load only policy and reference.
    """
    from peft import PeftModel, get_peft_model

    from lowrank.scoring import ensemble_members, load_reward_adapter

    from lowrank.files import check_weights_dir

    if sft_adapter is not None:
        check_weights_dir(sft_adapter)
        model = PeftModel.from_pretrained(base, str(sft_adapter), adapter_name=POLICY, is_trainable=True)
        model.load_adapter(str(sft_adapter), adapter_name=REFERENCE, is_trainable=False)
    else:
        if policy_lora_config is None:
            raise ValueError("without an SFT adapter, give policy_lora_config for a fresh policy LoRA")
        model = get_peft_model(base, policy_lora_config, adapter_name=POLICY)
    if reward_adapter is not None:
        load_reward_adapter(model, reward_adapter, adapter_name=REWARD, trainable=False)
        for number, member in enumerate(ensemble_members(reward_adapter), 2):  # `lowrank reward --ensemble`
            load_reward_adapter(model, member, adapter_name=f"{REWARD}_{number}", trainable=False)
        if value:
            load_reward_adapter(model, reward_adapter, adapter_name=VALUE, trainable=True)
    model.set_adapter(POLICY)
    apply_trainability(model)
    check_frozen(model)
    for module in model.modules():
        # PPO's ratio pi/pi_old must compare the same function: dropout would make it noisy
        # (and the reference log-probs would differ from the reference model's).
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model
