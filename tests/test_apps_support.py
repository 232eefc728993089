"""Shared set-up for the apps tests (test_apps.py, test_chat.py): a tiny GGUF and bad model files.

The GGUF comes from ``lowrank.export.gguf.export_gguf`` when that module exists;
until then a minimal private writer (llama architecture, SentencePiece vocabulary,
F32 tensors, via the gguf package) stands in, enough for llama.cpp to load and chat.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lowrank.templates import BUILTIN_TEMPLATES


def make_tiny_gguf(model_dir: Path, out_dir: Path) -> Path:
    """A GGUF of the tiny spm model (chat template: vicuna), written by export_gguf when available."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        from lowrank.export.gguf import export_gguf
    except ImportError:
        return _private_gguf(model_dir, out_dir / "tiny-f32.gguf")
    export_gguf(model_dir, out_dir, types=["f16"])
    return sorted(out_dir.rglob("*.gguf"))[0]


def _permute_for_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    # HF rotates the two halves of a head; llama.cpp rotates adjacent pairs (convert_hf_to_gguf.py, permute).
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _private_gguf(model_dir: Path, path: Path, arch: str = "llama") -> Path:
    import json

    import gguf
    import sentencepiece as spm
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    weights = load_file(model_dir / "model.safetensors")
    writer = gguf.GGUFWriter(str(path), arch)
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config["hidden_size"] // n_head)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(0)
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i).encode())
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(BUILTIN_TEMPLATES["vicuna"])
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for name, w in weights.items():
        w = w.astype(np.float32)
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            module = rest.rsplit(".", 1)[0]
            if module == "self_attn.q_proj":
                w = _permute_for_llama_cpp(w, n_head)
            elif module == "self_attn.k_proj":
                w = _permute_for_llama_cpp(w, n_kv)
            gguf_name = f"blk.{layer}.{per_layer[module]}.weight"
        else:
            gguf_name = names[name]
        writer.add_tensor(gguf_name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def make_unknown_arch_gguf(path: Path) -> Path:
    """A well-formed GGUF whose general.architecture llama.cpp does not know."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "notamodelarch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
