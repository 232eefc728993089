"""lowrank merge: streamed merge equals peft's merge_and_unload; quantized-base modes; bad input."""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowrank.cli import main as cli_main
from lowrank.errors import UserError
from lowrank.quantize import merge as merge_mod
from lowrank.quantize.merge import merge_adapters
from adapter_support import make_adapter


def peft_merged_state(base: Path, adapters: list[Path]) -> dict[str, torch.Tensor]:
    """The reference: every adapter loaded with peft, activated together, merge_and_unload (fp32)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    names = [f"a{i}" for i in range(len(adapters))]
    peft_model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        peft_model.load_adapter(str(path), adapter_name=name)
    peft_model.base_model.set_adapter(names)
    return peft_model.merge_and_unload(safe_merge=True, adapter_names=names).state_dict()


def read_merged(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


@pytest.fixture(scope="module")
def adapters(tiny_spm, tmp_path_factory):
    """Two adapters: one with per-module rank/alpha patterns, one rsLoRA on a few modules."""
    root = tmp_path_factory.mktemp("adapters")
    first = make_adapter(tiny_spm, root / "first", seed=1, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3})
    second = make_adapter(tiny_spm, root / "second", seed=2, r=8, lora_alpha=4, use_rslora=True,
                          target_modules=["q_proj", "down_proj"])
    return first, second


def test_merged_weights_equal_peft_merge_and_unload(tiny_spm, adapters, tmp_path):
    # Two adapters, applied in order, with rank_pattern/alpha_pattern and rsLoRA scaling.
    out = merge_adapters(str(tiny_spm), [str(a) for a in adapters], tmp_path / "merged", dtype="float32")
    got = read_merged(out)
    ref = peft_merged_state(tiny_spm, list(adapters))
    assert set(got) == set(ref)
    base = load_file(str(tiny_spm / "model.safetensors"))
    for name in ref:
        # fp32 on both sides, same operations: 1e-6 covers summation-order differences.
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-6)
    moved = [n for n in ref if not torch.equal(base[n], got[n])]
    assert len(moved) == 14  # every linear of the 2 layers (all-linear), nothing else (norms, embeddings, lm_head)


def test_single_adapter_fp16_model_loads_and_matches_peft_logits(tiny_spm, adapters, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = merge_adapters(str(tiny_spm), [str(adapters[0])], tmp_path / "merged")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float16"
    assert all(t.dtype == torch.float16 for t in read_merged(out).values())
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_spm)), str(adapters[0]))
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 7]])
    with torch.no_grad():
        diff = (merged(ids).logits - trained(ids).logits).abs().max().item()
    assert diff < 2e-3  # fp16 rounding of weights (rel 5e-4) through 2 layers; a missing delta gives > 0.1
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "tokenizer.model"):
        assert (out / name).is_file(), name


def test_merge_streams_one_shard_at_a_time(tiny_spm, adapters, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(str(tiny_spm)).save_pretrained(str(sharded), max_shard_size="200KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(tiny_spm / name, sharded / name)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    shard_sizes = {}
    for file in index.values():
        shard_sizes[file] = shard_sizes.get(file, 0) + 1
    assert len(shard_sizes) >= 3

    # Count merged tensors alive at once: each is released when its shard has been written.
    live, peak = set(), [0]
    real = merge_mod._merged_tensor

    def counting(name, *args):
        tensor = real(name, *args)
        key = (name, id(tensor))
        live.add(key)
        weakref.finalize(tensor, live.discard, key)
        peak[0] = max(peak[0], len(live))
        return tensor

    monkeypatch.setattr(merge_mod, "_merged_tensor", counting)
    written = []
    out = merge_adapters(str(sharded), [str(a) for a in adapters], tmp_path / "merged", dtype="float32",
                         on_shard=written.append)
    assert peak[0] <= max(shard_sizes.values()) < len(index)
    assert len(written) == len(shard_sizes) and written[-1]["index"] == written[-1]["total"]
    out_index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(out_index.values())) == len(shard_sizes)
    ref = peft_merged_state(tiny_spm, list(adapters))
    got = read_merged(out)
    assert max((got[n] - ref[n]).abs().max().item() for n in ref) < 1e-6

    # --max-shard-size re-shards: more, smaller files, same tensors.
    resharded = merge_adapters(str(sharded), [str(adapters[0])], tmp_path / "resharded", max_shard_size="50KB")
    files = list(resharded.glob("*.safetensors"))
    assert len(files) > len(shard_sizes)
    for f in files:  # each file is within the limit, or is one tensor too big to split (embeddings: 128 KB)
        assert f.stat().st_size < 50_000 + 4096 or len(load_file(str(f))) == 1
    assert set(read_merged(resharded)) == set(ref)


@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_chat_template_comes_from_adapter_lowrank_json(tiny_spm, tmp_path, layout):
    from transformers import AutoTokenizer

    from lowrank.templates import BUILTIN_TEMPLATES

    jinja = BUILTIN_TEMPLATES["chatml"]
    # lowrank.json holds {"chat_template": {"name", "jinja"}}; a flat "template" + "chat_template" string is read too.
    meta = ({"stage": "sft", "chat_template": {"name": "chatml", "jinja": jinja}} if layout == "nested"
            else {"stage": "sft", "template": "chatml", "chat_template": jinja})
    adapter = make_adapter(tiny_spm, tmp_path / "ad", seed=3, meta=meta)
    out = merge_adapters(str(tiny_spm), [str(adapter)], tmp_path / "merged")
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == jinja
    record = json.loads((out / "lowrank.json").read_text())
    assert record["chat_template"] == {"name": "chatml", "jinja": jinja}


def test_tokenizer_template_kept_without_lowrank_json(tiny_bpe, tmp_path):
    from transformers import AutoTokenizer

    adapter = make_adapter(tiny_bpe, tmp_path / "ad", seed=4)
    out = merge_adapters(str(tiny_bpe), [str(adapter)], tmp_path / "merged")
    expected = AutoTokenizer.from_pretrained(str(tiny_bpe)).chat_template
    assert expected and AutoTokenizer.from_pretrained(str(out)).chat_template == expected


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_into_dequantized_uses_the_weights_training_saw(tiny_spm, tmp_path, quant):
    # bitsandbytes' own dequantized weights of the quantized base, plus the LoRA delta.
    from peft.utils.integrations import dequantize_module_weight
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    adapter = make_adapter(tiny_spm, tmp_path / "ad", seed=5, meta={"stage": "sft", "config": {"quant": quant}})
    deq = merge_adapters(str(tiny_spm), [str(adapter)], tmp_path / "deq", dtype="float32", into="dequantized")
    orig = merge_adapters(str(tiny_spm), [str(adapter)], tmp_path / "orig", dtype="float32", into="original")
    delta = read_merged(orig)["model.layers.1.mlp.up_proj.weight"] - load_file(str(tiny_spm / "model.safetensors"))["model.layers.1.mlp.up_proj.weight"]
    bnb_config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
                  if quant == "nf4" else BitsAndBytesConfig(load_in_8bit=True))
    qmodel = AutoModelForCausalLM.from_pretrained(str(tiny_spm), quantization_config=bnb_config, dtype=torch.float32)
    trained_weight = dequantize_module_weight(qmodel.model.layers[1].mlp.up_proj).float() + delta
    got = read_merged(deq)
    torch.testing.assert_close(got["model.layers.1.mlp.up_proj.weight"], trained_weight, rtol=0, atol=1e-6)
    # Layers the adapter does not touch are round-tripped too (training saw them quantized) ...
    assert not torch.equal(got["model.layers.1.mlp.up_proj.weight"], read_merged(orig)["model.layers.1.mlp.up_proj.weight"])
    # ... but the unquantized embedding and lm_head are not.
    assert torch.equal(got["lm_head.weight"], read_merged(orig)["lm_head.weight"])
    assert json.loads((deq / "lowrank.json").read_text())["into"] == "dequantized"


def test_default_into_is_recorded_default(tiny_spm, tmp_path):
    adapter = make_adapter(tiny_spm, tmp_path / "ad", seed=6, meta={"quant": "nf4"})
    out = merge_adapters(str(tiny_spm), [str(adapter)], tmp_path / "m")
    assert json.loads((out / "lowrank.json").read_text())["into"] == merge_mod.DEFAULT_INTO


# ---- bad input: each a one-line error from `lowrank merge` with exit status 2, and no output dir ----

def run_merge_cli(capsys, *argv) -> tuple[int, str]:
    rc = cli_main(["merge", *map(str, argv)])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""


def test_cli_merges(tiny_spm, adapters, tmp_path, capsys):
    rc = cli_main(["merge", "--base", str(tiny_spm), "--adapter", str(adapters[0]), "--adapter", str(adapters[1]),
                   "--out", str(tmp_path / "m"), "--dtype", "bfloat16"])
    assert rc == 0 and str(tmp_path / "m") in capsys.readouterr().out
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    assert len(json.loads((tmp_path / "m" / "lowrank.json").read_text())["adapters"]) == 2


def test_error_base_not_a_model(adapters, tmp_path, capsys):
    (tmp_path / "notmodel").mkdir()
    rc, err = run_merge_cli(capsys, "--base", tmp_path / "notmodel", "--adapter", adapters[0], "--out", tmp_path / "m")
    assert rc == 2 and err.startswith("lowrank merge: error:") and "not a model dir (no config.json)" in err
    assert not (tmp_path / "m").exists()


def test_error_unsupported_architecture(tiny_spm, adapters, tmp_path, capsys):
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(tiny_spm, gpt2)
    config = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    rc, err = run_merge_cli(capsys, "--base", gpt2, "--adapter", adapters[0], "--out", tmp_path / "m")
    assert rc == 2 and "model_type 'gpt2' is not supported; supported architectures: llama, mistral, qwen2" in err


def test_error_adapter_without_adapter_config(tiny_spm, tmp_path, capsys):
    (tmp_path / "ad").mkdir()
    rc, err = run_merge_cli(capsys, "--base", tiny_spm, "--adapter", tmp_path / "ad", "--out", tmp_path / "m")
    assert rc == 2 and "not a PEFT adapter (no adapter_config.json)" in err


def test_error_adapter_for_another_base_digest(tiny_spm, tmp_path, capsys):
    meta = {"stage": "sft", "base": {"id": "other/model", "digest": "0" * 64}}
    adapter = make_adapter(tiny_spm, tmp_path / "ad", seed=7, meta=meta)
    rc, err = run_merge_cli(capsys, "--base", tiny_spm, "--adapter", adapter, "--out", tmp_path / "m")
    assert rc == 2 and "adapter was trained on another base (other/model)" in err
    assert not (tmp_path / "m").exists()


def test_error_adapter_targets_modules_missing_in_base(tiny_spm, tiny_model_factory, tmp_path, capsys):
    adapter = make_adapter(tiny_spm, tmp_path / "ad", seed=8)  # 2 layers
    one_layer = tiny_model_factory(tokenizer="spm", num_layers=1)
    rc, err = run_merge_cli(capsys, "--base", one_layer, "--adapter", adapter, "--out", tmp_path / "m")
    assert rc == 2 and "adapter targets model.layers.1." in err and "which the base does not have" in err


def test_error_adapter_shapes_from_another_base(tiny_spm, tiny_model_factory, tmp_path, capsys):
    adapter = make_adapter(tiny_spm, tmp_path / "ad", seed=9)  # hidden 64
    wider = tiny_model_factory(tokenizer="spm", hidden_size=96, num_heads=4, num_kv_heads=2)
    rc, err = run_merge_cli(capsys, "--base", wider, "--adapter", adapter, "--out", tmp_path / "m")
    assert rc == 2 and "the adapter was made for another base" in err


def test_error_no_disk_room(tiny_spm, adapters, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(merge_mod.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    rc, err = run_merge_cli(capsys, "--base", tiny_spm, "--adapter", adapters[0], "--out", tmp_path / "m")
    assert rc == 2 and "not enough disk space" in err
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.tmp-*"))


def test_error_output_exists_without_overwrite(tiny_spm, adapters, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    rc, err = run_merge_cli(capsys, "--base", tiny_spm, "--adapter", adapters[0], "--out", tmp_path / "m")
    assert rc == 2 and "already exists; pass --overwrite" in err


def test_error_nan_adapter_writes_nothing(tiny_spm, tmp_path, capsys):
    from safetensors.torch import load_file as load, save_file

    adapter = make_adapter(tiny_spm, tmp_path / "ad", seed=10)
    tensors = load(str(adapter / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_B" in k and "layers.1" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    rc, err = run_merge_cli(capsys, "--base", tiny_spm, "--adapter", adapter, "--out", tmp_path / "m")
    assert rc == 2 and "NaN or Inf" in err
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.tmp-*"))


def test_error_dequantized_without_quantized_training(tiny_spm, adapters, tmp_path):
    with pytest.raises(UserError, match="record no nf4/int8"):
        merge_adapters(str(tiny_spm), [str(adapters[0])], tmp_path / "m", into="dequantized")
