"""FLOPs per trained token and MFU (lowrank.plan.flops), checked against counts worked out by hand."""

from __future__ import annotations

import pytest

from lowrank.plan.flops import mfu, peak_flops, train_flops_per_token
from lowrank.plan.structure import as_architecture

# One layer, hidden 8, 2 heads of 4, no GQA, MLP 16, vocabulary 10.
SHAPE = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
         "num_key_value_heads": 2, "vocab_size": 10}


def test_flops_per_token_by_hand_with_gradient_checkpointing():
    arch = as_architecture(SHAPE)
    # linears: q, k, v, o 8x8 each (4 * 64 = 256 multiply-adds), gate and up 8x16, down 16x8 (3 * 128 = 384): 640.
    frozen = 2 * 640 * 3  # forward, recompute, input gradient
    attention = 2 * 2 * 4 * 2 * (7 + 1) / 2 * (2 + 2)  # seq 7: 4 keys on average; fwd + recompute + 2x backward
    lora = 2 * 2 * (4 * (8 + 8) + 3 * (8 + 16)) * (2 + 2)  # r 2: (in + out) * r per pair
    head = 4 * 8 * 10
    assert train_flops_per_token(arch, 7, lora_r=2) == frozen + attention + lora + head


def test_without_checkpointing_nothing_is_recomputed():
    arch = as_architecture(SHAPE)
    with_recompute = train_flops_per_token(arch, 7, lora_r=2)
    without = train_flops_per_token(arch, 7, lora_r=2, checkpointed=False)
    recompute = 2 * 640 + 2 * 2 * 4 * 2 * 4 + 2 * 2 * (4 * 16 + 3 * 24)  # one more forward of each layer
    assert with_recompute - without == recompute


def test_a_lora_on_q_proj_only_counts_that_pair():
    arch = as_architecture(SHAPE)
    all_linear = train_flops_per_token(arch, 7, lora_r=2)
    q_only = train_flops_per_token(arch, 7, lora_r=2, target_modules=["q_proj"])
    assert all_linear - q_only == 2 * 2 * (3 * (8 + 8) + 3 * (8 + 16)) * 4


def test_a_7b_step_is_close_to_six_times_its_matmul_parameters():
    arch = as_architecture("llama2-7b")
    per_token = train_flops_per_token(arch, 1024)
    matmul_params = sum(i * o for _, i, o in arch.linears)
    assert 6 * matmul_params < per_token < 6.6 * matmul_params  # attention, LoRA and the head on top


def test_mfu_divides_by_the_cards_dense_bf16_peak():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA GeForce RTX 4090") == 165.2e12
    assert mfu(1e9, 989.0, "NVIDIA H200") == pytest.approx(1e-3)  # 9.89e11 of 9.89e14 FLOP/s
    assert mfu(1e9, 1e3, "Some Unknown Card") is None
