"""Loading bases for LoRA training: quantization on the CPU, checkpointing, LoRA defaults, refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lowrank.errors import UserError


def _train_one_step(model) -> dict[str, torch.Tensor]:
    """One AdamW step on a fixed batch; returns the trainable tensors before the step."""
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    return before


def test_lora_defaults_cover_every_linear_projection_but_lm_head(tiny_spm):
    from peft import get_peft_model

    from lowrank.models import load_base_model, lora_config

    config = lora_config()
    assert (config.r, config.lora_alpha, config.lora_dropout) == (16, 32, 0.05)
    model = get_peft_model(load_base_model(str(tiny_spm), "none"), config)
    wrapped = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    layers = model.base_model.model.config.num_hidden_layers
    assert sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A")) == 7 * layers
    assert not any("lm_head" in n for n, p in model.named_parameters() if p.requires_grad)


def test_lora_config_is_configurable():
    from lowrank.models import lora_config

    config = lora_config(r=4, alpha=8, dropout=0.0, target_modules="q_proj,v_proj")
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.0)
    assert set(config.target_modules) == {"q_proj", "v_proj"}


def test_gradient_checkpointing_is_on_by_default(tiny_spm):
    from lowrank.models import is_checkpointing, load_base_model

    assert is_checkpointing(load_base_model(str(tiny_spm), "none"))
    assert is_checkpointing(load_base_model(str(tiny_spm), "nf4"))
    assert not is_checkpointing(load_base_model(str(tiny_spm), "none", gradient_checkpointing=False))


@pytest.mark.parametrize("quant,layer_class", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantized_lora_training_step_runs_on_cpu_and_changes_the_adapter(tiny_spm, quant, layer_class):
    from peft import get_peft_model

    from lowrank.models import load_base_model, lora_config

    base = load_base_model(str(tiny_spm), quant)
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == layer_class  # really quantized
    model = get_peft_model(base, lora_config(dropout=0.0))
    before = _train_one_step(model)
    after = dict(model.named_parameters())
    # lora_B starts at zero (the adapter starts as the identity); one step must move it.
    moved = [n for n in before if "lora_B" in n and not torch.equal(before[n], after[n].detach())]
    assert len(moved) == sum(1 for n in before if "lora_B" in n) > 0
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    # Evaluation (eval mode, no gradients) works too, also when a layer's size is not a multiple of 32
    # (bitsandbytes' CPU repacking would assert on the MLP's 172 outputs here).
    assert base.config.intermediate_size % 32 != 0
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 9, 12]])).logits).all()


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_supported_architectures_load_and_train(tiny_model_factory, arch):
    from peft import get_peft_model

    from lowrank.models import load_base_model, lora_config

    path = tiny_model_factory(arch=arch, num_layers=1)
    model = get_peft_model(load_base_model(str(path), "none"), lora_config(dropout=0.0))
    before = _train_one_step(model)
    assert any(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters() if n in before)


def test_unsupported_architecture_names_it_and_the_supported_ones(tmp_path):
    from transformers import GPT2Config

    from lowrank.models import load_base_model

    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UserError, match=r"unsupported architecture 'gpt2'; supported: llama, mistral, qwen2"):
        load_base_model(str(tmp_path / "gpt2"), "none")


def test_missing_model_dir(tmp_path):
    from lowrank.models import load_base_model

    with pytest.raises(UserError, match="model dir not found"):
        load_base_model(str(tmp_path / "nowhere"), "none")


def test_dir_without_config_json(tmp_path):
    from lowrank.models import load_tokenizer

    with pytest.raises(UserError, match="no config.json"):
        load_tokenizer(str(tmp_path))


def test_unreadable_config(tmp_path):
    from lowrank.models import load_base_model

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json: unreadable model config"):
        load_base_model(str(tmp_path), "none")


def test_unknown_quant(tiny_spm):
    from lowrank.models import load_base_model

    with pytest.raises(UserError, match="--quant: unknown value 'fp3'"):
        load_base_model(str(tiny_spm), "fp3")


def test_model_digest_is_stable_path_independent_and_tracks_changes(tiny_spm, tmp_path, monkeypatch):
    from lowrank.models import model_digest

    copy = tmp_path / "copy"
    shutil.copytree(tiny_spm, copy)
    digest = model_digest(str(tiny_spm))
    assert digest == model_digest(str(tiny_spm)) == model_digest(str(copy))
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    (copy / "config.json").write_text(json.dumps(config))
    assert model_digest(str(copy)) != digest
    (copy / "config.json").write_text((tiny_spm / "config.json").read_text())
    assert model_digest(str(copy)) == digest
    # Same names and shapes, other values (a base and its fine-tune; two seeds): the header is the
    # same, the digest must not be. Also for a file above the size that is hashed whole (sampled).
    from safetensors.torch import load_file, save_file

    from lowrank import models

    tensors = load_file(str(copy / "model.safetensors"))
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    changed = model_digest(str(copy))
    assert changed != digest
    monkeypatch.setattr(models, "_DIGEST_WHOLE_FILE", 1024)
    monkeypatch.setattr(models, "_DIGEST_SAMPLE_BYTES", 4096)
    assert model_digest(str(copy)) != model_digest(str(tiny_spm))
    # Replacing the weights by a file with other tensors changes it too (the header differs).
    save_file({"x": torch.zeros(2)}, str(copy / "model.safetensors"))
    assert model_digest(str(copy)) not in (digest, changed)
