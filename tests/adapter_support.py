"""A PEFT LoRA adapter with random non-zero B for tests of merge and export.

A freshly initialised adapter has B = 0 and changes nothing, which would hide a merge or layout bug.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def make_adapter(base: Path, out: Path, seed: int, meta: dict | None = None, scale: float = 0.1,
                 **lora_kwargs) -> Path:
    """Write an adapter on ``base`` to ``out`` (r 4, alpha 8, all linear layers unless overridden).

    ``meta``, when given, is written as the adapter's lowrank.json.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear",
                                                     **lora_kwargs}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    peft_model.save_pretrained(str(out))
    if meta is not None:
        (out / "lowrank.json").write_text(json.dumps(meta))
    return out
