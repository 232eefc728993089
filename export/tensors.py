"""Hugging Face tensor names -> llama.cpp GGUF tensor names, and llama.cpp's q/k layout.

The mapping is a table, as gguf-py's tensor_mapping.py keeps it: each row is a regular
expression over the HF name and the GGUF name it becomes ({bid} is the block number).
Adding an architecture means adding its rows and its entry in ARCHITECTURES.

Facts from llama.cpp's convert_hf_to_gguf.py (LlamaModel, Qwen2Model) and gguf-py's
constants.py / tensor_mapping.py:
- MistralForCausalLM is converted by LlamaModel: written as general.architecture "llama"
  with the same tensors; only hparams (e.g. sliding window, which llama.cpp ignores for
  "llama") differ.
- LLaMA's q_proj/k_proj rows are permuted (see permute_qk_for_llama_cpp); Qwen2 is run
  by llama.cpp with NEOX-style rope (the same "rotate halves" pairing HF uses), so its
  q/k are written as they are, and it has q/k/v biases.
- A model with tied embeddings has no lm_head.weight; llama.cpp then uses token_embd for
  the output projection, so nothing is written for "output".
- Gemma 2 / 3 (Gemma2Model, Gemma3Model): every RMSNorm scales by (1 + w) in HF and by w in
  llama.cpp, so the converter writes w + 1 for each tensor whose name ends in "norm.weight"
  (the four norms of a layer, the final norm, Gemma 3's q/k norms); the embedding's
  sqrt(hidden_size) scale is applied by llama.cpp's graph, not baked into token_embd.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from lowrank.errors import UserError
from lowrank.models import REFUSED_ARCHITECTURES, unsupported_architecture


@dataclass(frozen=True)
class ArchitectureSpec:
    """How one HF model_type is written for llama.cpp."""

    gguf_arch: str  # general.architecture (a gguf.MODEL_ARCH_NAMES value)
    permute_qk: bool  # llama.cpp runs this arch with its "normal" (adjacent pairs) rope
    has_qkv_bias: bool  # q/k/v projections carry biases
    norm_offset: float = 0.0  # added to every norm weight: llama.cpp scales by w where HF scales by (offset + w)


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": ArchitectureSpec("llama", permute_qk=True, has_qkv_bias=False),
    "mistral": ArchitectureSpec("llama", permute_qk=True, has_qkv_bias=False),
    "qwen2": ArchitectureSpec("qwen2", permute_qk=False, has_qkv_bias=True),
    # Qwen3: Qwen2 without the q/k/v biases, with an RMSNorm over each head's q and k (q_norm, k_norm) before
    # rope, and a head_dim of its own (written as key/value_length when it is not hidden / heads).
    "qwen3": ArchitectureSpec("qwen3", permute_qk=False, has_qkv_bias=False),
    # Phi-3 / Phi-4-mini: q, k and v in one qkv_proj and gate and up in one gate_up_proj, written fused as
    # llama.cpp's phi3 reads them (it splits q|k|v and gate|up itself); NEOX rope, so nothing is permuted;
    # the rope may turn only part of each head (partial_rotary_factor, 0.75 in Phi-4-mini).
    "phi3": ArchitectureSpec("phi3", permute_qk=False, has_qkv_bias=False),
    # Gemma 2 / Gemma 3 (text; transformers' model_type gemma3_text, Gemma3ForCausalLM): NEOX rope, norms
    # stored as their offset from 1, four norms per layer (rows below), tied embeddings; Gemma 3 adds q/k norms.
    "gemma2": ArchitectureSpec("gemma2", permute_qk=False, has_qkv_bias=False, norm_offset=1.0),
    "gemma3_text": ArchitectureSpec("gemma3", permute_qk=False, has_qkv_bias=False, norm_offset=1.0),
}
GEMMA = ("gemma2", "gemma3_text")

# (HF name pattern, GGUF name[, the model_types the row is for]). Rows without model_types are shared by all
# (they use the same HF module names, phi3 fusing two pairs); tensors an architecture lacks (biases for llama,
# q/k norms but in qwen3 and gemma3, fused layers but in phi3) never occur. The first matching row wins.
TENSOR_NAME_TABLE: list[tuple] = [
    # Gemma: a norm after attention, one before and one after the MLP. Its post_attention_layernorm is the
    # norm after attention (llama.cpp's post_attention_norm), where in LLaMA that HF name is the MLP's input
    # norm; Gemma's pre_feedforward_layernorm is llama.cpp's ffn_norm.
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "blk.{bid}.post_attention_norm.weight", GEMMA),
    (r"model\.layers\.(\d+)\.pre_feedforward_layernorm\.weight", "blk.{bid}.ffn_norm.weight", GEMMA),
    (r"model\.layers\.(\d+)\.post_feedforward_layernorm\.weight", "blk.{bid}.post_ffw_norm.weight", GEMMA),
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "blk.{bid}.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", "blk.{bid}.attn_q.{kind}"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", "blk.{bid}.attn_k.{kind}"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", "blk.{bid}.attn_v.{kind}"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "blk.{bid}.attn_output.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_norm\.weight", "blk.{bid}.attn_q_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_norm\.weight", "blk.{bid}.attn_k_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "blk.{bid}.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "blk.{bid}.ffn_gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "blk.{bid}.ffn_up.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.qkv_proj\.weight", "blk.{bid}.attn_qkv.weight"),  # phi3
    (r"model\.layers\.(\d+)\.mlp\.gate_up_proj\.weight", "blk.{bid}.ffn_up.weight"),  # phi3: gate rows first
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "blk.{bid}.ffn_down.weight"),
]

# HF tensors that carry no weights llama.cpp needs (recomputed at load time).
SKIPPED_PATTERNS: list[str] = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]

_COMPILED = [(re.compile(row[0]), row[1], row[2] if len(row) > 2 else None) for row in TENSOR_NAME_TABLE]
_SKIPPED = [re.compile(p) for p in SKIPPED_PATTERNS]


def architecture_spec(model_type: str, where: str = "config.json") -> ArchitectureSpec:
    """The spec for an HF model_type; UserError naming the supported ones otherwise."""
    if model_type in REFUSED_ARCHITECTURES:
        raise unsupported_architecture(where, model_type)
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"{where}: model_type {model_type!r} is not supported for GGUF export; supported: {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


def is_skipped(hf_name: str) -> bool:
    """True for HF tensors that have no place in the GGUF (e.g. rotary inv_freq buffers)."""
    return any(p.fullmatch(hf_name) for p in _SKIPPED)


def gguf_tensor_name(hf_name: str, model_type: str | None = None) -> str | None:
    """The llama.cpp name of an HF tensor (``model.layers.3.mlp.up_proj.weight`` -> ``blk.3.ffn_up.weight``)
    in a model of ``model_type`` (rows for given model_types apply only to them).

    None when the name is not in the table. A leading ``base_model.model.`` (PEFT) is accepted.
    """
    name = hf_name.removeprefix("base_model.model.")
    for pattern, gguf, model_types in _COMPILED:
        if model_types is not None and model_type not in model_types:
            continue
        match = pattern.fullmatch(name)
        if match:
            groups = match.groups()
            bid = groups[0] if groups and groups[0].isdigit() else None
            kind = groups[-1] if groups and not groups[-1].isdigit() else "weight"
            return gguf.format(bid=bid, kind=kind)
    return None


def qk_heads(hf_name: str, n_head: int, n_head_kv: int) -> int | None:
    """Heads to permute by for an HF q/k projection tensor (weight or bias), else None."""
    if re.search(r"q_proj\.(weight|bias)$", hf_name):
        return n_head
    if re.search(r"k_proj\.(weight|bias)$", hf_name):
        return n_head_kv
    return None


def llama_cpp_rows(rows, hf_name: str, config: dict):
    """``rows`` of the HF tensor ``hf_name`` (a weight, a bias or a LoRA B) in the order llama.cpp keeps them:
    q_proj/k_proj permuted (permute_qk_for_llama_cpp) where config's architecture needs it, anything else as is.

    The base GGUF writer and the LoRA GGUF writer both go through here, so an adapter's delta always
    lands on the base file's rows.
    """
    if not architecture_spec(config.get("model_type")).permute_qk:
        return rows
    n_head = int(config["num_attention_heads"])
    heads = qk_heads(hf_name, n_head, int(config.get("num_key_value_heads") or n_head))
    return rows if heads is None else permute_qk_for_llama_cpp(rows, heads)


def llama_cpp_values(data: np.ndarray, hf_name: str, config: dict) -> np.ndarray:
    """The HF tensor ``hf_name`` (a numpy array) as llama.cpp keeps it: rows as :func:`llama_cpp_rows` orders
    them, norm weights shifted by the architecture's norm_offset (Gemma's 1 + w, added in float32: a bf16
    checkpoint's w + 1 rounded to bf16 would lose the low bits of w)."""
    data = llama_cpp_rows(data, hf_name, config)
    offset = architecture_spec(config.get("model_type")).norm_offset
    if offset and hf_name.endswith("norm.weight"):
        data = data.astype(np.float32) + np.float32(offset)
    return data


def permute_qk_for_llama_cpp(weight, n_head: int, n_head_kv: int | None = None):
    """Reorder q_proj/k_proj rows (or biases) from HF's rotary layout to llama.cpp's.

    Why: HF's LLaMA applies rope with ``rotate_half``: within each head of dimension d,
    element i is rotated together with element i + d/2 (the two halves). llama.cpp's rope
    for LLM_ARCH_LLAMA (the "normal", non-NEOX mode) rotates adjacent pairs (2i, 2i + 1).
    Interleaving each head's two halves makes the same rotation happen: rows
    [h0..h(d/2-1) | h(d/2)..h(d-1)] become [h0, h(d/2), h1, h(d/2+1), ...]. Original
    checkpoints from Meta were in the interleaved layout; HF's conversion script applied the
    inverse, and llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute) undoes it again.

    ``weight``: (n_head * head_dim, ...) numpy array or torch tensor; works for 2-D weights,
    1-D biases and LoRA B matrices (out, r). For k_proj pass the KV head count, either as
    ``n_head`` or as ``n_head_kv`` (llama.cpp's convention: when n_head_kv differs from
    n_head, the KV count is used).
    """
    if n_head_kv is not None and n_head_kv != n_head:
        n_head = n_head_kv
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot permute {rows} rows into {n_head} heads of even size")
    shape = tuple(weight.shape)
    # (heads, 2 halves, d/2, ...) -> (heads, d/2, 2, ...) interleaves the halves.
    return weight.reshape(n_head, 2, rows // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute_qk_from_llama_cpp(weight, n_head: int):
    """Inverse of permute_qk_for_llama_cpp (for reading GGUF weights back in tests)."""
    rows = weight.shape[0]
    shape = tuple(weight.shape)
    return weight.reshape(n_head, rows // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
