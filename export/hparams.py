"""The GGUF key-values that describe a model's architecture to llama.cpp (``<arch>.*``), from its config.json.

llama.cpp reads these (src/llama-model.cpp, load_hparams) to size every tensor and to run the rope.
"""

from __future__ import annotations

import math

import numpy as np

from lowrank.errors import UserError


def head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def rope_scaling(config: dict, layer_type: str = "full_attention") -> dict:
    """HF rope settings in one dict (transformers 5 has rope_parameters, 4.x rope_theta + rope_scaling).

    Gemma 3 turns its global and sliding-window layers with different ropes: transformers 5 keeps one dict per
    ``layer_type`` in rope_parameters; 4.x config.json files have rope_theta and rope_scaling for the global
    layers and rope_local_base_freq (no scaling) for the sliding ones.
    """
    per_type = config.get("rope_parameters") or {}
    if "full_attention" in per_type or "sliding_attention" in per_type:
        params = dict(per_type.get(layer_type) or {})
    elif layer_type == "sliding_attention" and "rope_local_base_freq" in config:
        params = {"rope_theta": config["rope_local_base_freq"]}
    else:
        params = dict(config.get("rope_scaling") or {})
        params.update(per_type)
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
    if config.get("model_type") in GEMMA_SWA_PERIOD:
        write_gemma_hparams(writer, config)


# ----------------------------------------------------------------------------- Gemma 2 / 3

# llama.cpp's sliding-window layout (llama_hparams::set_swa_pattern(n): layer i slides unless i % n == n - 1),
# fixed per architecture in src/llama-model.cpp: gemma2 every other layer, gemma3 five of every six. transformers
# builds the same layer_types by default (sliding unless (i + 1) % n == 0).
GEMMA_SWA_PERIOD = {"gemma2": 2, "gemma3_text": 6}
# Layer counts llama.cpp takes for the 27B models (LLM_TYPE_27B), for which it scales attention scores by
# 1 / sqrt(hidden / heads) instead of 1 / sqrt(head_dim) (it never reads query_pre_attn_scalar).
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}


def layer_types(config: dict) -> list[str]:
    """Each layer's attention, "sliding_attention" or "full_attention", as transformers runs a Gemma config."""
    if config.get("layer_types"):
        return list(config["layer_types"])
    period = int(config.get("sliding_window_pattern") or GEMMA_SWA_PERIOD[config["model_type"]])
    return ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(int(config["num_hidden_layers"]))]


def check_gemma(config: dict, where: str) -> None:
    """UserError naming the config.json field when llama.cpp would run this Gemma model differently from transformers.

    llama.cpp's gemma2/gemma3 graphs (src/models/gemma2.cpp, gemma3.cpp, hparams in src/llama-model.cpp) fix
    what transformers reads from the config: the sliding-window layout, the attention scale, the activation,
    Gemma 2's soft-caps (always applied) and Gemma 3's lack of an attention soft-cap.
    """
    model_type = config["model_type"]
    period, layers = GEMMA_SWA_PERIOD[model_type], int(config["num_hidden_layers"])
    expected = ["sliding_attention" if i % period < period - 1 else "full_attention" for i in range(layers)]
    found = layer_types(config)
    if found != expected:
        first = next((i for i, (a, b) in enumerate(zip(found, expected)) if a != b), min(len(found), layers))
        what = f"layer {first} is {found[first]}" if first < len(found) else f"{len(found)} entries for {layers} layers"
        raise UserError(f"{where}: layer_types: {what}, which is not llama.cpp's {model_type} layout (every "
                        f"{period}{'nd' if period == 2 else 'th'} layer global, the others sliding)")
    if not config.get("sliding_window"):
        raise UserError(f"{where}: sliding_window is {config.get('sliding_window')!r}; llama.cpp's {model_type} needs "
                        "the window of its sliding layers")
    if config.get("use_bidirectional_attention"):
        raise UserError(f"{where}: use_bidirectional_attention is true; llama.cpp runs {model_type} causally")
    activation = config.get("hidden_activation", "gelu_pytorch_tanh")  # what Gemma2MLP / Gemma3MLP read
    if activation != "gelu_pytorch_tanh":
        raise UserError(f"{where}: hidden_activation {activation!r}; llama.cpp's {model_type} computes GELU with the "
                        "tanh approximation (gelu_pytorch_tanh)")
    heads, hidden = int(config["num_attention_heads"]), int(config["hidden_size"])
    scale_dim = hidden // heads if layers == GEMMA_27B_LAYERS[model_type] else head_dim(config)
    scalar = config.get("query_pre_attn_scalar", 256)
    if float(scalar) != float(scale_dim):
        basis = "hidden_size / num_attention_heads" if layers == GEMMA_27B_LAYERS[model_type] else "head_dim"
        raise UserError(f"{where}: query_pre_attn_scalar {scalar} is not {basis} ({scale_dim}), which llama.cpp "
                        f"scales a {layers}-layer {model_type} model's attention by")
    if model_type == "gemma2":
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if not config.get(key):
                raise UserError(f"{where}: {key} is {config.get(key)!r}; llama.cpp's gemma2 always soft-caps "
                                "(it would use its default cap)")
    else:
        if config.get("attn_logit_softcapping"):
            raise UserError(f"{where}: attn_logit_softcapping {config['attn_logit_softcapping']}; llama.cpp's "
                            "gemma3 does not soft-cap attention scores")
        if rope_scaling(config, "sliding_attention")["rope_type"] != "default":
            raise UserError(f"{where}: the sliding layers' rope is scaled "
                            f"({rope_scaling(config, 'sliding_attention')['rope_type']}); llama.cpp's gemma3 scales "
                            "only the global layers' rope")


def write_gemma_hparams(writer, config: dict) -> None:
    """Gemma's own keys: the sliding window, soft-caps (Gemma 2), the sliding layers' rope base (Gemma 3)."""
    writer.add_sliding_window(int(config["sliding_window"]))
    if config["model_type"] == "gemma2":
        writer.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    else:
        writer.add_rope_freq_base_swa(float(rope_scaling(config, "sliding_attention")["rope_theta"]))
        if config.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
