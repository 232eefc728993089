"""The fast rollout path (lowrank.fast_rollout): sampling from a merged, dequantized copy of the
policy gives the plain peft path's logits at every step and the same tokens under a fixed seed,
on an fp32 and on an nf4 base, and stays equal after the adapter is updated (refresh)."""

from __future__ import annotations

import logging

import pytest
import torch

from lowrank.errors import UserError


def _policy(base_dir, quant: str, tmp_path, arch_seed: int = 3):
    from peft import PeftModel

    from lowrank.models import load_base_model
    from tests.adapter_support import make_adapter

    adapter = make_adapter(base_dir, tmp_path / f"adapter-{quant}", seed=arch_seed, scale=0.3)
    base = load_base_model(str(base_dir), quant, gradient_checkpointing=False, device="cpu")
    return PeftModel.from_pretrained(base, str(adapter), adapter_name="policy").eval()


def _generate(generate, prompts, seed: int):
    torch.manual_seed(seed)
    return generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True, max_new_tokens=12,
                    temperature=1.0, top_k=0, top_p=1.0, output_logits=True, return_dict_in_generate=True,
                    pad_token_id=0)


def _assert_same_rollout(model, merged, prompts, seed, atol):
    plain = _generate(model.generate, prompts, seed)
    merged.refresh(model)
    fast = _generate(merged.generate, prompts, seed)
    assert len(fast.logits) == len(plain.logits) == 12
    for step, (a, b) in enumerate(zip(plain.logits, fast.logits)):
        assert torch.allclose(a, b, atol=atol, rtol=0), f"step {step}: {(a - b).abs().max().item()}"
    assert torch.equal(plain.sequences, fast.sequences)


@pytest.mark.parametrize("quant, atol", [("none", 1e-4), ("nf4", 1e-3)])
def test_merged_copy_samples_the_same_logits_and_tokens_before_and_after_an_update(quant, atol, tiny_spm, tmp_path):
    from lowrank.fast_rollout import MergedPolicy

    model = _policy(tiny_spm, quant, tmp_path)
    merged = MergedPolicy(model, "policy")
    prompts = torch.randint(3, 200, (3, 5), generator=torch.Generator().manual_seed(0))
    _assert_same_rollout(model, merged, prompts, seed=11, atol=atol)

    with torch.no_grad():  # an optimizer step: every LoRA B moves
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.3)
    stale = _generate(merged.generate, prompts, 12)
    plain = _generate(model.generate, prompts, 12)
    assert not torch.allclose(stale.logits[0], plain.logits[0], atol=atol)  # a copy not refreshed is off-policy
    _assert_same_rollout(model, merged, prompts, seed=12, atol=atol)


def test_only_the_lora_targets_are_rebuilt_and_the_rest_is_the_base(tiny_spm, tmp_path):
    from lowrank.fast_rollout import MergedPolicy

    model = _policy(tiny_spm, "none", tmp_path)
    merged = MergedPolicy(model, "policy")
    assert merged._lora and all(name.split(".")[-1].endswith("proj") for name in merged._lora)
    base = model.get_base_model()
    assert torch.equal(merged.model.get_submodule("model.embed_tokens").weight, base.model.embed_tokens.weight)
    layer = base.get_submodule(merged._lora[0])
    expected = layer.get_base_layer().weight + layer.get_delta_weight("policy")
    assert torch.allclose(merged.model.get_submodule(merged._lora[0]).weight, expected, atol=1e-6)


def test_sample_with_the_merged_copy_matches_the_plain_sample(tiny_spm, tmp_path):
    from lowrank.fast_rollout import MergedPolicy
    from lowrank.rollout import sample

    model = _policy(tiny_spm, "none", tmp_path)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    args = dict(max_new_tokens=8, temperature=1.0, top_p=1.0, top_k=0, stop_ids=[2], pad_id=0, device="cpu")
    torch.manual_seed(4)
    plain = sample(model, prompts, **args)
    torch.manual_seed(4)
    fast = sample(model, prompts, merged=MergedPolicy(model, "policy"), **args)
    assert torch.equal(plain.responses, fast.responses) and torch.equal(plain.mask, fast.mask)


def test_graphs_asked_for_on_the_cpu_fall_back_with_one_line(tiny_spm, tmp_path, caplog):
    from lowrank.fast_rollout import MergedPolicy

    model = _policy(tiny_spm, "none", tmp_path)
    with caplog.at_level(logging.INFO, logger="lowrank.fast_rollout"):
        merged = MergedPolicy(model, "policy", graphs=True)
    assert not merged.graphs
    lines = [r.getMessage() for r in caplog.records if r.name == "lowrank.fast_rollout"]
    assert len(lines) == 1 and "needs a CUDA device" in lines[0]


def test_an_unknown_fast_rollout_is_refused():
    from lowrank.fast_rollout import check

    with pytest.raises(UserError, match="--fast-rollout must be one of off, merged, merged-graphs, got 'fast'"):
        check("fast")


def test_a_dora_policy_is_refused(tiny_spm, tmp_path):
    from peft import LoraConfig, get_peft_model

    from lowrank.fast_rollout import MergedPolicy
    from lowrank.models import load_base_model

    base = load_base_model(str(tiny_spm), "none", gradient_checkpointing=False, device="cpu")
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", use_dora=True), adapter_name="policy")
    with pytest.raises(UserError, match="cannot merge a DoRA adapter"):
        MergedPolicy(model, "policy")
