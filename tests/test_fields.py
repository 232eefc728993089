"""The shared config field groups (lowrank.fields): a stage restates a default or a help text, and
everything it does not restate stays the group's."""

from __future__ import annotations

import dataclasses

import pytest

from lowrank.dpo import DPOConfig
from lowrank.errors import UserError
from lowrank.fields import AdapterFields, RLFields, TrainingFields, restate, stage_config
from lowrank.ppo import PPOConfig
from lowrank.sft import SFTConfig


def _field(cls, name):
    return {f.name: f for f in dataclasses.fields(cls)}[name]


def test_a_restated_default_changes_that_stage_only_and_keeps_the_groups_help():
    assert (DPOConfig().learning_rate, SFTConfig().learning_rate, PPOConfig().learning_rate) == (5e-6, 2e-4, 1e-5)
    group_help = _field(TrainingFields, "learning_rate").metadata["help"]
    assert _field(DPOConfig, "learning_rate").metadata["help"] == group_help
    assert _field(PPOConfig, "learning_rate").metadata["help"] == "AdamW learning rate (policy and value)"
    assert _field(TrainingFields, "learning_rate").default == 2e-4  # the group itself is untouched


def test_a_stage_composed_of_groups_has_each_shared_field_once_with_its_type():
    names = [f.name for f in dataclasses.fields(PPOConfig)]
    assert len(names) == len(set(names))
    assert {"lora_r", "save_every", "temperature", "min_reward_accuracy"} <= set(names)
    assert _field(PPOConfig, "save_every").type == _field(AdapterFields, "save_every").type == "int"
    assert (PPOConfig().save_every, SFTConfig().save_every) == (0, 50)  # RLFields restates it for ppo and grpo


def test_plain_values_restate_defaults_and_list_defaults_are_not_shared():
    @stage_config
    class Made(RLFields):
        lora_r = 8
        seed = restate(3, help="made-up seed")

    assert (Made().lora_r, Made().seed, _field(Made, "seed").metadata["help"]) == (8, 3, "made-up seed")
    assert Made().lora_alpha == RLFields().lora_alpha

    @stage_config
    class WithList(SFTConfig):
        target_modules = ["q_proj"]

    first, second = WithList(), WithList()
    first.target_modules.append("v_proj")
    assert second.target_modules == ["q_proj"]


def test_the_shared_checks_still_run_when_a_composed_config_is_built():
    with pytest.raises(UserError, match="--learning-rate must be at least 0"):
        DPOConfig(learning_rate=-1.0)
    with pytest.raises(UserError, match="--report-to: unknown tracker"):
        PPOConfig(report_to="paper")
