"""Adapter swapping on one base: roles never leak, frozen adapters stay frozen, each role computes
exactly what its adapter loaded alone computes."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from lowrank import roles
from lowrank.scoring import add_score_head, load_reward_adapter, score_sequences

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _base(path):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapters(tiny_spm, tmp_path_factory):
    """An 'SFT' adapter and a 'reward' adapter (LoRA + score head) with random non-zero weights."""
    root = tmp_path_factory.mktemp("roles")
    torch.manual_seed(1)
    sft = get_peft_model(_base(tiny_spm), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                     init_lora_weights=False, lora_dropout=0.1))
    sft.save_pretrained(root / "sft")
    torch.manual_seed(2)
    base = _base(tiny_spm)
    add_score_head(base, seed=3)
    reward = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                                             modules_to_save=["score"]))
    with torch.no_grad():  # a head different from the base's fresh one
        reward.base_model.model.score.modules_to_save["default"].weight.normal_()
    reward.save_pretrained(root / "reward")
    (root / "reward" / "lowrank.json").write_text(json.dumps({"stage": "reward"}))
    return root / "sft", root / "reward"


@pytest.fixture()
def model(tiny_spm, adapters):
    return roles.build_roles(_base(tiny_spm), reward_adapter=adapters[1], sft_adapter=adapters[0])


IDS = torch.tensor([[1, 5, 9, 30, 41, 7], [1, 12, 13, 14, 2, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])


def _logits(model):
    return model(input_ids=IDS, attention_mask=MASK).logits


def test_only_policy_and_value_are_trainable_after_every_switch(model):
    for role in roles.ROLES:
        with roles.use_role(model, role):
            roles.check_frozen(model)
            trainable = {roles.adapter_of(n) for n, p in model.named_parameters() if p.requires_grad}
            assert trainable == {"policy", "value"}
        assert model.active_adapter == "policy"
    groups = roles.trainable_parameters(model)
    assert groups["policy"] and groups["value"]
    # the value adapter owns a trainable copy of the score head; the reward's copy is frozen
    names = {n for n, p in model.named_parameters() if p.requires_grad and "score" in n}
    assert names == {"base_model.model.score.modules_to_save.value.weight",
                     "base_model.model.score.modules_to_save.value.bias"}


def test_reference_role_equals_sft_adapter_loaded_alone(model, tiny_spm, adapters):
    alone = PeftModel.from_pretrained(_base(tiny_spm), str(adapters[0])).eval()
    with torch.no_grad():
        expected = alone(input_ids=IDS, attention_mask=MASK).logits
        with roles.use_role(model, "reference"):
            got = _logits(model)
        bare = _base(tiny_spm)(input_ids=IDS, attention_mask=MASK).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert (bare - expected).abs().max() > 1e-2  # the adapter does change the model


def test_training_the_policy_leaves_the_reference_untouched(model):
    optimizer = torch.optim.SGD(roles.trainable_parameters(model)["policy"], lr=1.0)
    with torch.no_grad(), roles.use_role(model, "reference"):
        before = _logits(model)
    with roles.use_role(model, "policy"):
        _logits(model).logsumexp(-1).mean().backward()
    optimizer.step()
    with torch.no_grad():
        with roles.use_role(model, "reference"):
            after = _logits(model)
        with roles.use_role(model, "policy"):
            policy = _logits(model)
    assert torch.equal(before, after)
    assert (policy - before).abs().max() > 1e-3
    assert all(p.grad is None for n, p in model.named_parameters() if roles.adapter_of(n) in ("reference", "reward"))


def test_reward_role_scores_equal_reward_adapter_loaded_alone(model, tiny_spm, adapters):
    alone = load_reward_adapter(_base(tiny_spm), adapters[1]).eval()
    with torch.no_grad():
        expected = score_sequences(alone, IDS, MASK)
        with roles.use_role(model, "reward"):
            got = score_sequences(model, IDS, MASK)
        with roles.use_role(model, "value"):
            value = score_sequences(model, IDS, MASK)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(value, expected, atol=1e-5)  # value starts as a copy of the reward model


def test_role_is_restored_after_an_exception(model):
    with pytest.raises(ZeroDivisionError):
        with roles.use_role(model, "reward"):
            1 / 0
    assert model.active_adapter == "policy"
    roles.check_frozen(model)


def test_without_sft_adapter_reference_is_the_bare_base(tiny_spm, adapters):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    model = roles.build_roles(_base(tiny_spm), reward_adapter=adapters[1], policy_lora_config=config)
    with torch.no_grad():
        with roles.use_role(model, "reference"):
            reference = _logits(model)
        policy = _logits(model)
        bare = _base(tiny_spm)(input_ids=IDS, attention_mask=MASK).logits
    assert torch.allclose(reference, bare, atol=1e-5)
    assert (policy - bare).abs().max() > 1e-3
    roles.check_frozen(model)
