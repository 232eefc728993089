"""A LoRA adapter as a GGUF adapter file: base GGUF + adapter GGUF in llama.cpp == merged GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lowrank.errors import UserError
from lowrank.export.lora import export_lora_gguf, lora_gguf_logit_gap
from lowrank.quantize.merge import merge_adapters
from adapter_support import make_adapter as _make_adapter

TOKENS = [1, 45, 300, 12, 77, 512, 9, 640, 33, 101, 250, 7]


def make_adapter(base, out, seed, **lora_kwargs):
    return _make_adapter(base, out, seed, scale=0.2, **lora_kwargs)


def write_f32_gguf(model_dir: Path, out: Path) -> Path:
    """An F32 GGUF of a Hugging Face dir, by the project's writer (export/gguf.py)."""
    from lowrank.export.gguf import export_gguf

    (written,) = export_gguf(str(model_dir), str(out.parent / (out.stem + "-dir")), types=["f32"])
    return written.rename(out)


@pytest.mark.parametrize("shape", [
    dict(tokenizer="spm"),  # llama, GQA 4/2: q and k rows need different permutations
    dict(tokenizer="spm", arch="mistral", num_kv_heads=4),  # no GQA
    dict(tokenizer="bpe", arch="qwen2"),  # NEOX rope in llama.cpp: no q/k permutation
    dict(tokenizer="bpe", arch="qwen3", random_norms=True),  # q/k norms between the LoRA'd projections and rope
    dict(tokenizer="spm", arch="phi3"),  # LoRA on the fused qkv_proj and gate_up_proj
    dict(tokenizer="spm", arch="gemma2", random_norms=True),  # q/k/v/o, gate/up/down between Gemma's norms + 1
    dict(tokenizer="spm", arch="gemma3", random_norms=True, num_layers=6),  # and between its q/k norms and rope
], ids=["llama-gqa", "mistral-mha", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"])
def test_lora_gguf_on_base_gguf_equals_merged_gguf(tiny_model_factory, tmp_path, shape):
    base = tiny_model_factory(**shape)
    # Per-module rank and alpha and rsLoRA: llama.cpp knows one alpha per file, so scaling is folded into B.
    adapter = make_adapter(base, tmp_path / "adapter", seed=11, rank_pattern={"o_proj": 2}, alpha_pattern={"k_proj": 24})
    merged = merge_adapters(str(base), [str(adapter)], tmp_path / "merged", dtype="float32")
    base_gguf = write_f32_gguf(base, tmp_path / "base-f32.gguf")
    merged_gguf = write_f32_gguf(merged, tmp_path / "merged-f32.gguf")
    lora_gguf = export_lora_gguf(adapter, base, tmp_path / "adapter.gguf")

    gap = lora_gguf_logit_gap(base_gguf, lora_gguf, merged_gguf, TOKENS)
    print(f"lora-vs-merged max abs diff {gap['max_abs_diff']:.2e}, adapter effect {gap['adapter_effect']:.3f}")
    # F32 everywhere; the two differ only in float32 summation order (W x + B (A x) vs (W + BA) x): measured
    # 2e-7..3e-4, and 4.8e-4 on gemma3, whose GELU llama.cpp rounds through fp16 (a last-bit difference in its
    # input can move an activation by an fp16 step). 1e-3 is far below what the adapter changes (> 0.7) or a
    # wrong q/k row order gives (0.78).
    assert gap["adapter_effect"] > 0.05, gap
    assert gap["max_abs_diff"] < 1e-3, gap
    # And the merged GGUF is the merged model (fp32 CPU kernels differ in summation order: up to 1.6e-3
    # abs measured under a loaded 2-core run, 2026-12-05; a wrong q/k layout gives 0.78).
    from transformers import AutoModelForCausalLM

    from lowrank.export.llama import gguf_logits, load_llama

    hf = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    with torch.no_grad():
        hf_logits = hf(torch.tensor([TOKENS])).logits[0].numpy()
    llm = load_llama(merged_gguf, n_ctx=64, n_threads=1)
    merged_logits = gguf_logits(llm, TOKENS)
    llm.close()
    assert np.abs(hf_logits - merged_logits).max() < 5e-3


def test_lora_gguf_metadata_and_layout(tiny_spm, tmp_path):
    import gguf

    adapter = make_adapter(tiny_spm, tmp_path / "adapter", seed=12, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    path = export_lora_gguf(adapter, tiny_spm, tmp_path / "adapter.gguf")
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 16.0
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}  # ggml ne order: (in, r) and (r, out)
    assert shapes["blk.0.attn_q.weight.lora_a"] == (64, 8) and shapes["blk.0.attn_q.weight.lora_b"] == (8, 64)
    assert shapes["blk.1.attn_v.weight.lora_b"] == (8, 32)  # 2 kv heads x 16
    assert len(shapes) == 2 * 2 * 2  # 2 layers x (q, v) x (a, b)
    assert not list(tmp_path.glob(".adapter.gguf.tmp-*"))


def test_lora_gguf_refuses_adapter_for_another_base(tiny_spm, tiny_model_factory, tmp_path):
    adapter = make_adapter(tiny_spm, tmp_path / "adapter", seed=13)
    wider = tiny_model_factory(tokenizer="spm", hidden_size=96)
    with pytest.raises(UserError, match="made for another base"):
        export_lora_gguf(adapter, wider, tmp_path / "adapter.gguf")
    assert not (tmp_path / "adapter.gguf").exists()


def test_lora_gguf_refuses_dir_without_adapter_config(tiny_spm, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no adapter_config.json"):
        export_lora_gguf(tmp_path / "empty", tiny_spm, tmp_path / "adapter.gguf")
