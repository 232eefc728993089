"""lowrank plan: the memory model's exact parts (parameter counts, quantized layouts, LoRA sizes) against
transformers, bitsandbytes and peft on the CPU; its activation terms against a CPU measurement (order of
magnitude: the CUDA figures are checked on a GPU, docs/plan.md); the CLI's verdicts and each bad input."""

from __future__ import annotations

import json

import pytest
import torch

from lowrank import plan as P
from lowrank.errors import UserError

GiB = 2**30


def run_plan(capsys, *args: str) -> tuple[int, str, str]:
    from lowrank.cli import main

    code = main(["plan", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def small_llama(tiny_model_factory):
    """A tiny LLaMA with hidden 256 (linears big enough for several quantization blocks), GQA 4/2."""
    return tiny_model_factory(tokenizer="spm", hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.mark.parametrize("shape, params", [("llama2-7b", 6_738_415_616), ("llama2-13b", 13_015_864_320),
                                           ("llama3-8b", 8_030_261_248), ("mistral-7b", 7_241_732_096),
                                           ("tinyllama-1b", 1_100_048_384)])
def test_named_shapes_count_the_published_parameters_without_a_download(shape, params):
    # conftest sets HF_HUB_OFFLINE: a download would fail, so these come from the meta device alone.
    assert P.architecture(shape).params == params


def test_nf4_weights_of_a_7b_base_take_3_5_to_3_9_gib():
    weights = P.weight_bytes(P.architecture("llama2-7b"), "nf4")
    assert 3.5 * GiB < sum(weights.values()) < 3.9 * GiB
    # 0.5 byte per value plus double-quantized constants: well under the 1 byte of int8.
    int8 = P.weight_bytes(P.architecture("llama2-7b"), "int8")["decoder weights (int8)"]
    assert weights["decoder weights (nf4)"] / int8 == pytest.approx(0.516, abs=0.005)


def _storage_bytes(module) -> int:
    """Bytes of every distinct tensor a bitsandbytes linear layer holds (weight and quantization state)."""
    tensors = {}

    def add(t):
        if isinstance(t, torch.Tensor):
            tensors[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    weight = module.weight
    add(weight)
    add(getattr(weight, "SCB", None))
    state = getattr(weight, "quant_state", None)
    if state is not None:
        for value in (state.absmax, state.code, state.offset):
            add(value)
        if state.state2 is not None:
            add(state.state2.absmax)
            add(state.state2.code)
    return sum(tensors.values())


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_weight_bytes_equal_what_bitsandbytes_allocates(small_llama, quant):
    from transformers import AutoModelForCausalLM

    from lowrank.models import quantization_config

    model = AutoModelForCausalLM.from_pretrained(small_llama, dtype=torch.bfloat16, device_map={"": "cpu"},
                                                 quantization_config=quantization_config(quant, torch.bfloat16))
    measured = sum(_storage_bytes(m) for name, m in model.named_modules()
                   if type(m).__name__ in ("Linear4bit", "Linear8bitLt"))
    planned = P.weight_bytes(P.architecture(str(small_llama)), quant)[f"decoder weights ({quant})"]
    assert planned == measured


@pytest.mark.parametrize("targets", [["all-linear"], ["q_proj", "v_proj"]])
def test_lora_parameter_count_equals_peft(small_llama, targets):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from lowrank.models import lora_config

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(small_llama), lora_config(r=8, target_modules=targets))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    arch = P.architecture(str(small_llama))
    assert sum(P.lora_tensors(P.lora_targets(arch, targets), 8)) == trainable
    # And on a 7B shape, peft's figure for r 16 on all linear layers (peft 0.21, meta device).
    assert sum(P.lora_tensors(P.lora_targets(P.architecture("llama2-7b"), ["all-linear"]), 16)) == 39_976_960


def test_activation_terms_are_the_right_order_of_magnitude_on_the_cpu(small_llama):
    """Live CPU tensor bytes during an SFT forward + backward (fp32, checkpointing) against the plan's
    activation terms. On the CPU, sdpa's kernel keeps (rows, heads, seq, seq) attention weights that
    CUDA's memory-efficient kernel does not, so the plan is expected low here: 0.62x when written.
    Tolerance 0.5x-1.5x: an order-of-magnitude check; the CUDA figures are measured on a GPU."""
    from peft import get_peft_model
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from lowrank import train
    from lowrank.models import load_base_model, lora_config

    class LiveBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.refs, self.now, self.peak = {}, 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for key, (ref, size) in list(self.refs.items()):
                if torch.UntypedStorage._expired(ref):
                    del self.refs[key]
                    self.now -= size
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.untyped_storage().data_ptr():
                    storage = t.untyped_storage()
                    if storage.data_ptr() not in self.refs:
                        self.refs[storage.data_ptr()] = (storage._weak_ref(), storage.nbytes())
                        self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
            return out

    torch.manual_seed(0)
    base = load_base_model(str(small_llama), "none", gradient_checkpointing=True, device="cpu")
    model = get_peft_model(base, lora_config(r=16, dropout=0.05))
    model.train()
    rows, seq = 2, 256
    ids = torch.randint(3, base.config.vocab_size, (rows, seq))
    positions = torch.arange(seq).repeat(rows, 1)
    positions[:, 128:] -= 128  # two packed examples per row
    with LiveBytes() as live:
        train.causal_lm_loss_sum(model, {"input_ids": ids, "position_ids": positions, "labels": ids}).backward()
    # The CPU run is fp32 throughout: the plan's fp32-stream variant.
    plan = P.estimate(str(small_llama), fp32_norms=True, tokens_per_micro_batch=rows * seq, max_length=seq)
    static = ("decoder weights (nf4)", "embeddings, LM head, norms", "cuBLAS workspaces", "adapters", "optimizer state")
    activations = plan.total - sum(v for k, v in plan.breakdown.items() if k in static)
    assert 0.5 < activations / live.peak < 1.5


def test_breakdown_sums_to_the_total_and_the_card_adds_what_torch_does_not_see():
    for stage in P.STAGES:
        plan = P.estimate("llama2-7b", stage=stage, tokens_per_step=4096)
        assert sum(plan.breakdown.values()) == plan.total
        assert plan.needed == plan.total + plan.outside["CUDA context"] + plan.outside.get("optimizer state (paged)", 0)
    sft = P.estimate("llama2-7b", tokens_per_step=4096)
    assert sft.outside["optimizer state (paged)"] > 0  # bitsandbytes' paged AdamW on a quantized base


def test_more_tokens_need_more_memory_and_accumulation_needs_none():
    small, large = (P.estimate("llama2-7b", tokens_per_step=t).total for t in (4096, 16384))
    assert small < large
    accumulated = P.estimate("llama2-7b", tokens_per_step=16384, tokens_per_micro_batch=4096)
    assert accumulated.total == small and accumulated.settings["accumulation"] == 4


def test_a_larger_card_gets_a_larger_proposal():
    on_24 = P.largest_tokens_per_step("llama2-7b", 24 * GiB)
    on_48 = P.largest_tokens_per_step("llama2-7b", 48 * GiB)
    assert 0 < on_24 < on_48 and on_24 % 1024 == 0
    assert P.estimate("llama2-7b", tokens_per_step=on_24).fits(24 * GiB)
    assert not P.estimate("llama2-7b", tokens_per_step=on_24 + 1024).fits(24 * GiB)


def test_ppo_without_checkpointing_is_planned_larger_than_with_it():
    settings = dict(stage="ppo", ppo_rollout_batch=8, ppo_prompt_len=256, ppo_new_tokens=256)
    plain = P.estimate("llama2-7b", gradient_checkpointing=False, **settings)
    checkpointed = P.estimate("llama2-7b", gradient_checkpointing=True, **settings)
    assert plain.phase == "PPO update" and checkpointed.phase == "rollout generation"
    assert checkpointed.total < plain.total


def test_settings_from_a_stage_config():
    from lowrank.sft import SFTConfig

    settings = P.settings_from_config("sft", SFTConfig(batch_size=4, max_length=1024, gradient_accumulation_steps=2))
    assert settings["tokens_per_micro_batch"] == 4096 and settings["tokens_per_step"] == 8192
    assert P.plan_for_training("llama2-7b", "sft", SFTConfig(), "cpu") is None  # plans are for CUDA runs
    P.report_start(None)  # no plan, nothing to report
    assert P.report_end(None) is None


def test_cli_prints_the_breakdown_and_exits_0_when_it_fits(capsys):
    code, out, _ = run_plan(capsys, "--model", "llama2-7b", "--tokens-per-step", "16384", "--gpu-memory", "24GB")
    assert code == 0
    assert "decoder weights (nf4)" in out and "fits: yes" in out
    assert "largest that fits:" in out and "22.35 GiB" in out  # 24 GB = 10^9 bytes each


def test_cli_exits_1_when_it_does_not_fit(capsys):
    code, out, _ = run_plan(capsys, "--model", "llama2-7b", "--tokens-per-step", "65536", "--gpu-memory", "16GiB")
    assert code == 1
    assert "fits: no" in out and "does not fit: needs" in out and "of 16.0 GiB" in out


def test_cli_exits_1_when_not_even_one_row_fits(capsys):
    code, out, _ = run_plan(capsys, "--model", "llama2-13b", "--max-length", "65536", "--gpu-memory", "12GiB")
    assert code == 1
    assert "largest that fits: none: not one row of 65536 tokens" in out and "one row needs" in out


def test_cli_unknown_shape_lists_the_known_ones(capsys):
    code, out, err = run_plan(capsys, "--model", "llama2-70b")
    assert code == 2 and not out
    assert err.startswith("lowrank plan: error: unknown shape 'llama2-70b'") and "llama3-8b" in err
    assert err.count("\n") == 1


def test_cli_unreadable_config_is_one_line(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    code, _, err = run_plan(capsys, "--model", str(tmp_path))
    assert code == 2 and "config.json: unreadable model config" in err and err.count("\n") == 1


def test_cli_unsupported_architecture(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    code, _, err = run_plan(capsys, "--model", str(tmp_path))
    assert code == 2 and "unsupported architecture 'gpt2'" in err


def test_cli_hub_id_offline_is_one_line(capsys):
    code, _, err = run_plan(capsys, "--model", "some-org/some-model")
    assert code == 2 and "could not fetch it from the hub" in err and err.count("\n") == 1


@pytest.mark.parametrize("text", ["lots", "24XB", "-3GB", "0GiB", "GB"])
def test_cli_malformed_gpu_memory(capsys, text):
    code, out, err = run_plan(capsys, "--model", "llama2-7b", f"--gpu-memory={text}")
    assert code == 2 and not out and "--gpu-memory: cannot read" in err


def test_gpu_memory_units():
    from lowrank.cli.plan import parse_memory

    assert parse_memory("24GB") == 24 * 10**9
    assert parse_memory("24GiB") == parse_memory("24") == 24 * GiB
    assert parse_memory("1.5 gib") == 3 * GiB // 2
    assert parse_memory("24564MiB") == 24564 * 2**20


def test_every_size_flag_reads_sizes_the_same_way():
    """--gpu-memory, --fit and --max-shard-size share one reader: GB is 10^9 bytes, GiB 2^30."""
    from lowrank.cli.plan import parse_memory
    from lowrank.export.fit import parse_size as fit_size
    from lowrank.quantize.merge import parse_size as shard_size

    for parse in (parse_memory, fit_size, shard_size):
        assert parse("4GB") == 4 * 10**9 and parse("4GiB") == 4 * 2**30 and parse("500 MB") == 500 * 10**6
    assert fit_size("4") == 4 * 2**30 and shard_size("4096") == 4096  # bare numbers: GiB for RAM, bytes for shards


@pytest.mark.parametrize("text", ["abc", "4XB", "-1GB", "0GB", ""])
def test_unreadable_sizes_are_refused_naming_the_flag(text):
    from lowrank.errors import UserError
    from lowrank.quantize.merge import parse_size

    with pytest.raises(UserError, match=r"^--max-shard-size: cannot read size"):
        parse_size(text)
