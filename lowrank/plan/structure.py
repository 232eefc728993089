"""The model's structure and the memory that does not depend on tokens (for `lowrank plan`).

``architecture()`` counts a model's parameters exactly on the meta device (a named shape from
``SHAPES``, 'tiny', a model dir or a hub id's config); ``weight_bytes``, ``lora_targets`` /
``lora_tensors`` and ``optimizer_bytes`` turn that structure into the bytes of the base weights in
their quantized layouts, the LoRA adapters and the optimizer state. lowrank.plan.estimates adds the
activations of each stage.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

from lowrank.errors import UserError

# bitsandbytes' paged optimizers keep the state of tensors with at least this many elements in
# CUDA managed memory (outside torch's allocator); smaller ones get ordinary tensors.
PAGED_MIN_NUMEL = 100_000
# bitsandbytes' 8-bit optimizers keep 32-bit state for tensors smaller than this (min_8bit_size).
OPTIM_8BIT_MIN_NUMEL = 4096

# Named shapes: config.json fields of well-known models, so that planning needs no download.
SHAPES: dict[str, dict] = {
    "llama2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=4096, tie_word_embeddings=False),
    "llama2-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                       max_position_embeddings=4096, tie_word_embeddings=False),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=8192, tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                       max_position_embeddings=32768, sliding_window=None, tie_word_embeddings=False),
    # LLaMA 3.1: LLaMA 3's shape with its rope scaling and a 128k context (no extra parameters).
    "llama3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                        max_position_embeddings=131072, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                        tie_word_embeddings=False),
    # Qwen2.5: biases on q/k/v (counted by transformers' Qwen2 model).
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       max_position_embeddings=131072, tie_word_embeddings=False),
    # Qwen3: q/k RMSNorms and a head_dim (128) of its own, not hidden / heads.
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     max_position_embeddings=40960, tie_word_embeddings=False),
    # Phi-3-mini (4k): fused qkv_proj and gate_up_proj, counted like the separate layers.
    "phi3-mini": dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                      max_position_embeddings=4096, tie_word_embeddings=False),
    # Phi-4-mini: GQA 24/8, a 200k vocabulary, tied embeddings, a rope over 3/4 of each head.
    "phi4-mini": dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                      num_attention_heads=24, num_key_value_heads=8, vocab_size=200064,
                      max_position_embeddings=131072, partial_rotary_factor=0.75, tie_word_embeddings=True),
    # Gemma 2 9B (google/gemma-2-9b config.json): head_dim 256 beside hidden 3584 / 16 heads, four norms per layer,
    # tied embeddings. 9,241,705,984 parameters: the Gemma 2 report (arXiv:2408.00118, Table 2) gives 917,504,000
    # embedding and 8,324,201,984 non-embedding parameters.
    "gemma2-9b": dict(model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
                      max_position_embeddings=8192, query_pre_attn_scalar=256, sliding_window=4096,
                      final_logit_softcapping=30.0, attn_logit_softcapping=50.0, tie_word_embeddings=True),
    # Gemma 3 12B, its language model alone (text_config of google/gemma-3-12b-it's config.json, as
    # Gemma3ForCausalLM): q/k norms, tied embeddings. 11,766,034,176 parameters: 10,759,155,456 in the decoder,
    # the 10,759M non-embedding figure of the Gemma 3 report (arXiv:2503.19786, Table 1), plus 262,208 x 3840
    # embeddings (the report's 1,012M embedding figure does not follow from this config; the vision encoder,
    # 417M there, is not counted).
    "gemma3-12b": dict(model_type="gemma3_text", hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=262208,
                       max_position_embeddings=131072, query_pre_attn_scalar=256, sliding_window=1024,
                       rope_theta=1000000.0, rope_local_base_freq=10000.0,
                       rope_scaling={"rope_type": "linear", "factor": 8.0}, tie_word_embeddings=True),
    "tinyllama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                         max_position_embeddings=2048, tie_word_embeddings=False),
}


# --------------------------------------------------------------------------------------------
# The model's structure, counted on the meta device
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Architecture:
    """What memory depends on: shape, and every linear layer of the decoder (name, in, out)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    linears: tuple[tuple[str, int, int], ...]  # each nn.Linear inside the decoder layers
    embed_params: int
    head_params: int  # lm_head; 0 when tied to the embeddings
    vector_params: int  # 1-D parameters: norm weights (and biases)
    params: int


def _config_dict(model: str) -> tuple[str, dict]:
    if model in SHAPES:
        return model, dict(SHAPES[model])
    from pathlib import Path

    from lowrank.models import read_model_config
    from lowrank.tiny import NAMED_MODELS, resolve_model_name

    # A bare name that is no dir is a shape name: hub ids are org/name.
    if model not in NAMED_MODELS and not Path(model).expanduser().exists() and "/" not in model:
        raise UserError(f"unknown shape '{model}'; named shapes: {', '.join([*SHAPES, *NAMED_MODELS])} "
                        f"(or give a model dir, or a hub id as org/name)")
    return model, read_model_config(resolve_model_name(model))


@functools.lru_cache(maxsize=32)
def _architecture(name: str, config_json: str) -> Architecture:
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowrank.models import SUPPORTED_ARCHITECTURES, unsupported_architecture

    config = json.loads(config_json)
    model_type = config.pop("model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise unsupported_architecture(name, model_type or "none")
    for key in ("quantization_config", "architectures", "auto_map", "torch_dtype", "dtype"):
        config.pop(key, None)
    try:
        hf_config = AutoConfig.for_model(model_type, **config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    except Exception as e:  # noqa: BLE001 - a config.json transformers cannot build a model from
        raise UserError(f"{name}: cannot build the model from its config ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    text = hf_config.get_text_config()
    linears = tuple((n, m.in_features, m.out_features) for n, m in model.named_modules()
                    if isinstance(m, nn.Linear) and ".layers." in n)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    heads = text.num_attention_heads
    return Architecture(
        name=name, hidden=text.hidden_size, intermediate=text.intermediate_size, layers=text.num_hidden_layers,
        heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, vocab=embed.shape[0],
        linears=linears, embed_params=embed.numel(), head_params=0 if head is embed else head.numel(),
        vector_params=sum(p.numel() for p in model.parameters() if p.ndim == 1),
        params=sum(p.numel() for p in model.parameters()))


def architecture(model: str) -> Architecture:
    """The structure of ``model``: a named shape, 'tiny', a local model dir or a hub id (config only)."""
    name, config = _config_dict(model)
    return _architecture(name, json.dumps(config, sort_keys=True))


# --------------------------------------------------------------------------------------------
# Weights in their quantized layouts
# --------------------------------------------------------------------------------------------

def nf4_bytes(numel: int, blocksize: int = 64) -> int:
    """Bytes of one weight in bitsandbytes NF4 with double quantization (Linear4bit, quant_storage uint8).

    Packed weight: 2 values per byte. QuantState: absmax of each block of 64, quantized to uint8;
    its offset (one fp32); the nested state: an fp32 absmax per 256 blocks and the 256-entry fp32
    code it was quantized with; and the 16-entry fp32 NF4 code (bitsandbytes.functional.quantize_4bit).
    """
    blocks = math.ceil(numel / blocksize)
    return math.ceil(numel / 2) + blocks + 4 + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 * 16


def int8_bytes(in_features: int, out_features: int) -> int:
    """Bytes of one weight in LLM.int8 (Linear8bitLt): int8 values and an fp32 scale per output row."""
    return in_features * out_features + 4 * out_features


def weight_bytes(arch: Architecture, quant: str, *, compute_bytes: int = 2, fp32_norms: bool = False
                 ) -> dict[str, int]:
    """Bytes of the base weights: decoder linears (quantized unless ``quant`` is none); embeddings, LM
    head and 1-D parameters (norms) in the compute dtype, as lowrank.models loads them (norms in fp32
    with ``fp32_norms``, as peft's prepare_model_for_kbit_training would cast them)."""
    if quant == "nf4":
        linears = sum(nf4_bytes(i * o) for _, i, o in arch.linears)
    elif quant == "int8":
        linears = sum(int8_bytes(i, o) for _, i, o in arch.linears)
    elif quant == "none":
        linears = sum(i * o for _, i, o in arch.linears) * compute_bytes
    else:
        raise UserError(f"--quant: unknown value '{quant}'; choose nf4, int8 or none")
    return {f"decoder weights ({quant if quant != 'none' else 'bf16'})": linears,
            "embeddings, LM head, norms": (arch.embed_params + arch.head_params) * compute_bytes
            + arch.vector_params * (4 if fp32_norms else compute_bytes)}


# --------------------------------------------------------------------------------------------
# LoRA adapters and optimizer state
# --------------------------------------------------------------------------------------------

def lora_targets(arch: Architecture, target_modules) -> list[tuple[str, int, int]]:
    """(name, in, out) of the layers a LoRA adapts: peft's "all-linear" (every decoder linear, not
    lm_head) or module names, matched as peft does (the name or a dotted suffix of it)."""
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    targets = [t.strip() for part in targets for t in str(part).split(",") if t.strip()]
    if targets == ["all-linear"] or not targets:
        return list(arch.linears)
    found = [(n, i, o) for n, i, o in arch.linears if any(n == t or n.endswith("." + t) for t in targets)]
    if "lm_head" in targets:
        found.append(("lm_head", arch.hidden, arch.vocab))
    if not found:
        names = sorted({n.rsplit(".", 1)[-1] for n, _, _ in arch.linears})
        raise UserError(f"--target-modules: none of {', '.join(targets)} is a linear layer of {arch.name}; "
                        f"its layers: {', '.join(names)}")
    return found


def lora_tensors(targets, r: int) -> list[int]:
    """Element counts of the LoRA weight tensors: A (r x in) and B (out x r) per adapted layer."""
    return [n for _, i, o in targets for n in (r * i, o * r)]


def optimizer_bytes(tensors: list[int], *, bits: int, paged: bool) -> tuple[int, int]:
    """(bytes in torch's allocator, bytes in CUDA managed memory) of AdamW state for these tensors.

    32-bit: two fp32 moments (8 bytes per parameter). bitsandbytes 8-bit: two uint8 moments and an
    fp32 absmax per block of 256 for each (tensors under 4096 elements keep 32-bit state). A paged
    bitsandbytes optimizer puts the state of tensors of 100,000+ elements in managed memory.
    """
    inside = outside = 0
    for n in tensors:
        if bits == 8 and n >= OPTIM_8BIT_MIN_NUMEL:
            size = 2 * n + 2 * 4 * math.ceil(n / 256)
        else:
            size = 8 * n
        if paged and n >= PAGED_MIN_NUMEL:
            outside += size
        else:
            inside += size
    return inside, outside


def as_architecture(model) -> Architecture:
    """``model`` as an :class:`Architecture`: one already, a dict of config.json fields, or a name for
    :func:`architecture`."""
    if isinstance(model, Architecture):
        return model
    if isinstance(model, dict):  # config.json fields
        config = {"model_type": "llama", **model}
        return _architecture(str(config.get("_name_or_path") or "custom shape"), json.dumps(config, sort_keys=True))
    return architecture(str(model))
