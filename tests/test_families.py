"""Each supported model family end to end, as a user takes it: SFT of a LoRA on an nf4 base, merge, export to
F16 + Q8_0 + Q4_K_M, and every file verified in llama.cpp (tokenization on the built-in texts, F32/F16
logits and greedy continuation, chat-template token ids, and the quantized files' KL and top-1 limits)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from lowrank.cli import main

FAMILIES = {
    # Byte-level BPE with LLaMA-3's pre-tokenizer and template, and LLaMA 3.1's rope scaling (rope_freqs).
    "llama3": dict(tokenizer="bpe", rope_llama3=True),
    "llama2": dict(tokenizer="spm"),  # SentencePiece
    "mistral": dict(tokenizer="spm", arch="mistral", num_kv_heads=4),
    "qwen2": dict(tokenizer="bpe", arch="qwen2", tie_word_embeddings=True),
    "qwen3": dict(tokenizer="bpe", arch="qwen3", random_norms=True),
    # Fused qkv_proj and gate_up_proj (LoRA on the fused layers, merged, written fused), SentencePiece as Phi-3's.
    "phi3": dict(tokenizer="spm", arch="phi3", random_norms=True),
    # Phi-4-mini: a partial rope (3/4 of each head turns), tied embeddings, byte-level BPE.
    "phi4-mini": dict(tokenizer="bpe", arch="phi3", partial_rotary=0.75, tie_word_embeddings=True),
    # Gemma 2: norms stored as offsets from 1 (random, so a missing +1 or a mis-wired norm shows), four per layer,
    # soft-capped attention and logits, every other layer a 16-token sliding window, GELU, tied embeddings;
    # Gemma's SentencePiece tokenizer (no dummy prefix, <start_of_turn> / <end_of_turn>) and chat template.
    "gemma2": dict(tokenizer="spm", arch="gemma2", random_norms=True),
    # Gemma 3 (text): q/k norms, five sliding layers then a global one (so 6 layers: both ropes turn, the
    # global one with linear scaling), no soft-caps.
    "gemma3": dict(tokenizer="spm", arch="gemma3", random_norms=True, num_layers=6),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sft_on_nf4_merge_export_and_verify(family, tiny_model_factory, tmp_path, capsys, sample_data):
    base = tiny_model_factory(**FAMILIES[family])
    adapter, merged, gguf = tmp_path / "sft", tmp_path / "merged", tmp_path / "gguf"
    assert main(["sft", "--model", str(base), "--data", str(sample_data["alpaca"]), "--quant", "nf4",
                 "--max-steps", "2", "--batch-size", "2", "--max-length", "96", "--lora-r", "4", "--eval-every", "0",
                 "--no-gradient-checkpointing", "--output-dir", str(adapter)]) == 0
    assert json.loads((adapter / "lowrank.json").read_text())["stage"] == "sft"
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(merged)]) == 0
    capsys.readouterr()
    code = main(["export", str(merged), "--type", "f16,q8_0,q4_k_m", "--out", str(gguf), "--name", "m"])
    out = capsys.readouterr().out
    assert code == 0, out
    for kind in ("F16", "Q8_0", "Q4_K_M"):
        assert f"m-{kind.lower()}.gguf ({kind}): PASS" in out, out
    # A greedy token that differs only within the logit tolerance (a near-tie of the HF model) passes.
    assert re.search(r"logits: max relative diff \S+ \(tolerance \S+\); greedy: \d+/32 tokens identical", out), out
    assert out.count("chat template: identical rendering and token ids") == 3
    assert len(re.findall(r"tokenization: (\d+)/\1 texts identical", out)) == 3


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_reward_ppo_grpo_and_dpo_train_on_gemma(family, tiny_model_factory, tmp_path, sample_data):
    """The RL and preference stages on Gemma's odd parts: Gemma 2's soft-capped logits (the chunked loss caps
    them too) and eager attention, sliding-window caches when sampling left-padded prompts, tied embeddings."""
    from peft import load_peft_weights

    base = str(tiny_model_factory(**FAMILIES[family]))
    common = ["--model", base, "--quant", "none", "--no-gradient-checkpointing"]
    short = ["--max-length", "96", "--max-steps", "2", "--batch-size", "2", "--eval-every", "0"]
    sft, reward = tmp_path / "sft", tmp_path / "reward"
    assert main(["sft", *common, *short, "--data", str(sample_data["alpaca"]), "--lora-r", "4", "--output-dir", str(sft)]) == 0
    assert main(["reward", *common, *short, "--data", str(sample_data["preferences"]), "--sft-adapter", str(sft),
                 "--output-dir", str(reward)]) == 0
    rollouts = ["--prompts", str(sample_data["prompts"]), "--steps", "1", "--max-new-tokens", "8"]
    assert main(["ppo", *common, "--sft-adapter", str(sft), "--reward-adapter", str(reward), *rollouts,
                 "--output-dir", str(tmp_path / "ppo")]) == 0
    assert main(["grpo", *common, "--sft-adapter", str(sft), "--reward-adapter", str(reward), *rollouts,
                 "--group-size", "2", "--prompts-per-step", "1", "--output-dir", str(tmp_path / "grpo")]) == 0
    assert main(["dpo", *common, *short, "--sft-adapter", str(sft), "--pairs", str(sample_data["preferences"]),
                 "--output-dir", str(tmp_path / "dpo")]) == 0
    start = load_peft_weights(str(sft))
    for stage in ("reward", "ppo", "grpo", "dpo"):
        assert json.loads((tmp_path / stage / "lowrank.json").read_text())["stage"] == stage
        trained = load_peft_weights(str(tmp_path / stage))
        moved = [k for k in start if k in trained and not torch.equal(start[k], trained[k])]
        assert moved, f"{stage} left every LoRA weight of the SFT adapter as it was"
