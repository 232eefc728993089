"""The GGUF key-values that describe a model's architecture to llama.cpp (``<arch>.*``), from its config.json.

llama.cpp reads these (src/llama-model.cpp, load_hparams) to size every tensor and to run the rope.
"""

from __future__ import annotations

import math

import numpy as np

from lowrank.errors import UserError


def head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def rope_scaling(config: dict) -> dict:
    """HF rope settings in one dict (transformers 5 has rope_parameters, 4.x rope_theta + rope_scaling)."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def llama3_rope_factors(config: dict) -> np.ndarray:
    """Per-frequency divisors llama.cpp reads from rope_freqs.weight for LLaMA-3.1 rope scaling.

    Same formula as transformers' _compute_llama3_parameters (and llama.cpp's converter):
    long wavelengths are divided by `factor`, short ones kept, a smooth ramp in between.
    """
    rope = rope_scaling(config)
    dim = head_dim(config)
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    ramp = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, ramp))
    return out.astype(np.float32)


def write_hparams(writer, config: dict, file_type: int) -> None:
    import gguf

    n_head = int(config["num_attention_heads"])
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or n_head))
    # Phi-4-mini turns only part of each head (partial_rotary_factor); llama.cpp reads the rotated width.
    writer.add_rope_dimension_count(int(head_dim(config) * float(rope_scaling(config).get("partial_rotary_factor", 1.0))))
    if head_dim(config) != config["hidden_size"] // n_head:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    rope = rope_scaling(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    kind = rope["rope_type"]
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        if "original_max_position_embeddings" in rope:
            writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind == "llama3":
        pass  # carried by the rope_freqs.weight tensor, as llama.cpp expects
    elif kind != "default":
        raise UserError(f"config.json: rope scaling {kind!r} is not supported by this exporter (linear, yarn, llama3)")
