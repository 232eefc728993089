"""Model FLOPs per trained token and the model FLOPs utilisation (MFU) the GPU bench prints.

Counted from the shapes (lowrank.plan.structure.Architecture), matmuls only, 2 FLOPs per
multiply-add. For a LoRA step on a frozen base:

- each frozen decoder linear (in x out): forward 2*in*out per token, the same again when gradient
  checkpointing recomputes the layer, and 2*in*out in the backward for the input's gradient only
  (the frozen weight gets none): 6*in*out with checkpointing, 4*in*out without;
- attention scores and their weighted sum: 2 * 2 * head_dim * heads per key, over a causal mean of
  (seq + 1) / 2 keys; recomputed with the layer; its backward is twice its forward (both operands
  are activations);
- each LoRA pair (in x r, r x out): 2*r*(in+out) forward, recomputed, and twice that backward
  (input and weight gradients);
- the lm_head (hidden x vocab): forward and the input gradient, 4*hidden*vocab; never recomputed.

MFU = FLOPs per token * tokens/s / the card's dense bf16 peak (no sparsity).
"""

from __future__ import annotations

from lowrank.plan.structure import Architecture, lora_targets

# Dense bf16 tensor-core peaks in FLOP/s (vendor datasheets; no 2:4 sparsity), by device name.
PEAK_BF16 = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
             ("RTX 4090", 165.2e12), ("RTX 3090", 71e12), ("L4", 121e12), ("A10G", 70e12))


def train_flops_per_token(arch: Architecture, seq_len: int, *, lora_r: int = 16, target_modules=("all-linear",),
                          checkpointed: bool = True) -> float:
    """FLOPs to train on one token of a ``seq_len``-token row (forward, recompute, backward)."""
    passes = 3 if checkpointed else 2  # forward (+ recompute) + input-gradient backward, frozen weights
    frozen = sum(2 * i * o for _, i, o in arch.linears) * passes  # every layer's linears
    keys = (seq_len + 1) / 2
    attention_forward = 2 * 2 * arch.head_dim * arch.heads * keys * arch.layers
    attention = attention_forward * ((2 if checkpointed else 1) + 2)
    targets = lora_targets(arch, target_modules)
    in_layers = sum(2 * lora_r * (i + o) for name, i, o in targets if name != "lm_head")
    on_head = sum(2 * lora_r * (i + o) for name, i, o in targets if name == "lm_head")
    lora = in_layers * ((2 if checkpointed else 1) + 2) + on_head * 3
    head = 4 * arch.hidden * arch.vocab
    return frozen + attention + lora + head


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of the card called ``device_name`` (torch.cuda.get_device_name), or None."""
    return next((peak for key, peak in PEAK_BF16 if key in device_name), None)


def mfu(flops_per_token: float, tokens_per_s: float, device_name: str) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None for a card not in PEAK_BF16."""
    peak = peak_flops(device_name)
    return None if peak is None else flops_per_token * tokens_per_s / peak
