"""What the base weights looked like to an adapter trained on a 4-bit or 8-bit base.

A QLoRA adapter never saw the original weights W: its forward pass used
dequantize(quantize(W)). Merging into that round-tripped weight reproduces the
trained function; merging into W adds the adapter to a slightly different base.
These functions redo bitsandbytes' quantization exactly as transformers applied it
when the base was loaded for training, one tensor at a time, so that a merge can
stream through a model that does not fit in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch

QUANT_KINDS = ("nf4", "int8")


def roundtrip_weight(weight: torch.Tensor, quant: str) -> torch.Tensor:
    """dequantize(quantize(weight)) as bitsandbytes computes it; returns float32, same shape.

    nf4: transformers' BitsAndBytesConfig(load_in_4bit, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True) makes Params4bit quantize with blocksize 64 and
    compress_statistics=True (the per-block absmax values are themselves quantized to
    8 bits in blocks of 256: "double quantization"), bitsandbytes/nn/modules.py
    Params4bit._quantize. The weight is quantized in the dtype it was loaded in;
    we quantize the float32 values (loading on CPU trains in float32).
    int8: LLM.int8 (Int8Params._quantize) casts to float16 and keeps one absmax per
    output row: CB = round(127 * W / absmax_row), W' = CB * absmax_row / 127.
    """
    import bitsandbytes.functional as bnbf

    if quant == "nf4":
        w = weight.detach().to(torch.float32).contiguous()
        packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        return bnbf.dequantize_4bit(packed, state).to(torch.float32)
    if quant == "int8":
        w = weight.detach().to(torch.float16).contiguous()
        cb, scb, _ = bnbf.int8_vectorwise_quant(w)
        return bnbf.int8_vectorwise_dequant(cb, scb).to(torch.float32)
    raise ValueError(f"unknown quantization {quant!r}; expected one of {QUANT_KINDS}")


def quantized_weight_names(base_dir: str | Path) -> set[str]:
    """Names of the weight tensors that bitsandbytes replaced when this base was loaded quantized.

    transformers swaps every nn.Linear for a bnb layer except the modules returned by
    get_keys_to_not_convert (the output embedding lm_head, tied weights, the last
    parameter). We build the model on the meta device (no memory) and ask the same
    function, so the answer follows transformers rather than a guess from names.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert

    config = AutoConfig.from_pretrained(str(base_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    skip = set(get_keys_to_not_convert(model))
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not any(name == s or name.startswith(s + ".") for s in skip):
            names.add(f"{name}.weight")
    return names

