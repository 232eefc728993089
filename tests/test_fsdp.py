"""FSDP (recipes/accelerate/fsdp-qlora.yaml): SFT sharded over two CPU processes, the shipped accelerate
configs, and the settings and bases FSDP cannot run, each refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_support import launch_two_processes, quantized_copy

REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "recipes" / "accelerate" / "fsdp-qlora.yaml"
DDP_CONFIG = REPO / "recipes" / "accelerate" / "ddp.yaml"


def _flags(model, *extra: str, save_every: bool = False) -> list[str]:
    from lowrank.sft import default_data

    return ["--model", str(model), "--data", default_data(), "--max-steps", "2", "--batch-size", "2",
            "--max-length", "96", "--learning-rate", "0.01", "--lora-r", "4", "--lora-dropout", "0",
            "--eval-every", "0", "--eval-fraction", "0.05", *([] if save_every else ["--save-every", "0"]), *extra]


def _adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


# --- SFT under the shipped FSDP config, two CPU processes ------------------------------------------------

def test_fsdp_on_two_cpu_processes_trains_the_adapter_one_process_would(tiny_spm, tmp_path):
    """The shipped fsdp-qlora.yaml, launched with two CPU processes, shards the model with torch's FSDP2
    (fully_shard over gloo; accelerate selects FSDP only on GPUs, so cli_support.fsdp_on_cpu lets it here)
    and trains the adapter one process does with twice the accumulation: gradients are reduced over both
    processes, and each step's loss is normalised by the loss tokens of both (fp32, tolerance 1e-4, as for
    DDP). The adapter is a normal PEFT dir, written from the gathered shards."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lowrank.cli import main

    out = tmp_path / "fsdp"
    launch_two_processes(tmp_path, ["sft", *_flags(tiny_spm, "--quant", "none"), "--output-dir", str(out)],
                         config_file=FSDP_CONFIG, timeout=300)
    meta = json.loads((out / "lowrank.json").read_text())
    assert meta["processes"] == 2 and meta["fsdp"] is True
    assert meta["metrics"]["eval_loss"] < meta["metrics"]["initial_eval_loss"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("adapter")) == [
        "adapter_config.json", "adapter_model.safetensors"]

    one = tmp_path / "one"
    assert main(["sft", *_flags(tiny_spm, "--quant", "none"), "--output-dir", str(one),
                 "--gradient-accumulation-steps", "2"]) == 0
    sharded, whole = _adapter(out), _adapter(one)
    assert sharded.keys() == whole.keys() and len(sharded) == 2 * 7 * 2  # A and B, 7 linears, 2 layers
    for name in whole:
        assert torch.allclose(sharded[name], whole[name], atol=1e-4), name
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in sharded.items() if "lora_B" in k)  # it trained

    base = AutoModelForCausalLM.from_pretrained(str(tiny_spm))
    loaded = PeftModel.from_pretrained(base, str(out))
    b = loaded.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert torch.equal(b.detach(), sharded["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])


# Each process SIGKILLs itself once its checkpoint of step 2 is complete (both have written it then).
_KILL_AFTER_STEP_2 = ("import os, signal\nfrom lowrank import checkpoints\nreal = checkpoints.save_checkpoint\n"
                      "def save(accelerator, out_dir, step, *args, **kwargs):\n"
                      "    path = real(accelerator, out_dir, step, *args, **kwargs)\n"
                      "    if step == 2:\n        os.kill(os.getpid(), signal.SIGKILL)\n    return path\n"
                      "checkpoints.save_checkpoint = save\n")


def test_fsdp_run_killed_after_a_checkpoint_resumes_to_the_adapter_of_an_unbroken_run(tiny_spm, tmp_path):
    """Under FSDP each process holds a shard of the adapter and of AdamW's state; a checkpoint gathers both
    whole, and --resume puts them back into the shards, so the resumed run ends where an unbroken one does."""
    import torch

    argv = ["sft", *_flags(tiny_spm, "--quant", "none", save_every=True), "--max-steps", "4", "--save-every", "2"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    launch_two_processes(tmp_path / "a", [*argv, "--output-dir", str(straight)], config_file=FSDP_CONFIG, timeout=300)
    launch_two_processes(tmp_path / "b", [*argv, "--output-dir", str(broken)], config_file=FSDP_CONFIG, timeout=300,
                         patch=_KILL_AFTER_STEP_2, expect_code=1)
    assert not (broken / "lowrank.json").exists() and (broken / "checkpoints" / "step-2" / "state.pt").is_file()
    state = torch.load(broken / "checkpoints" / "step-2" / "state.pt", weights_only=True)
    lora_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert state["trainable"][lora_a].shape == (4, 64)  # whole, not one process's half of the rows
    moments = state["optimizer"]["state"][lora_a]
    assert moments["exp_avg"].shape == (4, 64) and moments["step"].item() == 2

    launch_two_processes(tmp_path / "b", [*argv, "--output-dir", str(broken), "--resume"], config_file=FSDP_CONFIG,
                         timeout=300)
    assert json.loads((broken / "lowrank.json").read_text())["metrics"]["steps"] == 4
    resumed, unbroken = _adapter(broken), _adapter(straight)
    assert resumed.keys() == unbroken.keys()
    for name in unbroken:
        assert torch.allclose(resumed[name], unbroken[name], atol=1e-6), name


def test_fsdp_qlora_on_two_cpu_processes_trains_on_the_nf4_base(tiny_spm, tmp_path):
    """QLoRA under FSDP: the nf4 weights are stored in the compute dtype (fp32 on the CPU), which is what
    lets FSDP shard them, and the run trains and writes an adapter peft loads on the 4-bit base."""
    from peft import PeftModel

    from lowrank.models import load_base_model

    out = tmp_path / "qlora"
    launch_two_processes(tmp_path, ["sft", *_flags(tiny_spm, "--quant", "nf4"), "--output-dir", str(out)],
                         config_file=FSDP_CONFIG, timeout=300)
    meta = json.loads((out / "lowrank.json").read_text())
    assert meta["fsdp"] is True and meta["config"]["quant"] == "nf4"
    assert meta["metrics"]["eval_loss"] < meta["metrics"]["initial_eval_loss"]
    PeftModel.from_pretrained(load_base_model(str(tiny_spm), "nf4", device="cpu"), str(out))


def test_nf4_is_stored_in_the_compute_dtype_for_fsdp_and_as_bytes_otherwise():
    """bitsandbytes' FSDP-QLoRA guide: bnb_4bit_quant_storage must be the dtype of the rest of the model."""
    import torch

    from lowrank.models import quantization_config

    assert quantization_config("nf4", torch.bfloat16, fsdp=True).bnb_4bit_quant_storage == torch.bfloat16
    assert quantization_config("nf4", torch.float32, fsdp=True).bnb_4bit_quant_storage == torch.float32
    assert quantization_config("nf4", torch.bfloat16).bnb_4bit_quant_storage == torch.uint8


# --- the shipped accelerate configs ------------------------------------------------------------------------

def test_shipped_fsdp_config_is_fsdp2_with_rank0_loading_and_no_autocast():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(FSDP_CONFIG))
    assert config.distributed_type == DistributedType.FSDP
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_cpu_ram_efficient_loading"] is True
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and fsdp["fsdp_reshard_after_forward"] is True
    assert str(config.mixed_precision) == "no" and config.use_cpu is False and config.num_processes == 2


def test_shipped_ddp_config_is_multi_gpu():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(DDP_CONFIG))
    assert config.distributed_type == DistributedType.MULTI_GPU and config.num_processes == 2
    assert not config.fsdp_config


def test_the_plan_shards_the_stages_training_shards():
    from lowrank import fsdp
    from lowrank.plan import sharding

    assert sharding.FSDP_STAGES == fsdp.FSDP_STAGES


# --- bad input: one line, exit 2 ---------------------------------------------------------------------------

def _sft_error(argv: list[str], capsys) -> str:
    from lowrank.cli import main

    code = main(["sft", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("lowrank sft:")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0] and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def as_if_fsdp(monkeypatch):
    """sft in this process as under an FSDP launch: accelerate reports FSDP (no model is sharded here; every
    refusal comes before the base loads)."""
    from lowrank import fsdp

    monkeypatch.setattr(fsdp, "is_fsdp", lambda accelerator: True)


@pytest.fixture
def fsdp_env(monkeypatch):
    """The environment `accelerate launch` gives processes of an FSDP config; accelerate's state reset after."""
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    yield
    AcceleratorState._reset_state(True)


def test_int8_base_under_fsdp_is_refused(tiny_spm, tmp_path, capsys, as_if_fsdp):
    line = _sft_error([*_flags(tiny_spm, "--quant", "int8"), "--output-dir", str(tmp_path / "out")], capsys)
    assert "--quant int8 cannot be sharded by FSDP" in line and "nf4" in line
    assert not (tmp_path / "out").exists()


def test_prequantized_base_stored_as_bytes_under_fsdp_is_refused(tiny_spm, tmp_path, capsys, as_if_fsdp):
    """A published 4-bit checkpoint stores its packed weights as uint8 (bitsandbytes' default), which
    transformers keeps whatever lowrank asks; FSDP cannot shard them beside fp32/bf16 weights."""
    base = quantized_copy(tiny_spm, tmp_path / "base-bnb-4bit", quant_method="bitsandbytes", load_in_4bit=True,
                          bnb_4bit_quant_storage="uint8")
    line = _sft_error([*_flags(base, "--quant", "nf4"), "--output-dir", str(tmp_path / "out")], capsys)
    assert f"{base}: already quantized (4-bit weights stored as uint8" in line
    assert "train from the unquantized base with --quant nf4" in line


def test_prequantized_int8_base_under_fsdp_is_refused(tiny_spm, tmp_path, capsys, as_if_fsdp):
    base = quantized_copy(tiny_spm, tmp_path / "base-bnb-8bit", quant_method="bitsandbytes", load_in_8bit=True)
    line = _sft_error([*_flags(base, "--quant", "none"), "--output-dir", str(tmp_path / "out")], capsys)
    assert "an 8-bit bitsandbytes checkpoint" in line and "cannot be sharded by FSDP" in line


def test_paged_8bit_optimizer_under_fsdp_is_refused(tiny_spm, tmp_path, capsys, as_if_fsdp):
    line = _sft_error([*_flags(tiny_spm, "--quant", "nf4", "--optim-bits", "8"),
                       "--output-dir", str(tmp_path / "out")], capsys)
    assert "--optim-bits 8: under FSDP the optimizer is torch's 32-bit AdamW" in line


def test_fsdp_config_without_gpus_is_refused_rather_than_run_as_ddp(tiny_spm, tmp_path, capsys, fsdp_env):
    line = _sft_error([*_flags(tiny_spm, "--quant", "none"), "--output-dir", str(tmp_path / "out")], capsys)
    assert "the FSDP config needs several CUDA GPUs" in line and "recipes/accelerate/ddp.yaml" in line


def test_stages_fsdp_does_not_run_are_refused_naming_the_one_it_does(fsdp_env):
    from lowrank import train
    from lowrank.errors import UserError

    with pytest.raises(UserError, match=r"^FSDP runs only the sft stage .* launch this stage with "
                                        r"recipes/accelerate/ddp.yaml$"):
        train.make_accelerator()  # what reward, dpo, ppo and grpo call
