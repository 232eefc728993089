"""A LoRA adapter alone as a GGUF adapter file, applied by llama.cpp on top of the base GGUF.

One base GGUF can then serve many adapters (llama-cpp-python: ``Llama(model_path=base,
lora_path=adapter)``). Format facts, from llama.cpp's src/llama-adapter.cpp and
convert_lora_to_gguf.py:
- metadata: general.type = "adapter", general.architecture = the base's (llama.cpp refuses
  "model arch and LoRA arch mismatch"), adapter.type = "lora", adapter.lora.alpha (float32).
- tensors "<base GGUF tensor name>.lora_a" and ".lora_b", e.g. "blk.0.attn_q.weight.lora_a".
  A is stored as torch (r, in) -> ggml ne [in, r]; B as (out, r) -> ne [r, out]; llama.cpp
  checks a.ne[0] == w.ne[0], b.ne[1] == w.ne[1] and a.ne[1] == b.ne[0].
- llama.cpp scales every pair by alpha / rank with rank = b.ne[0] (one alpha per file).
  PEFT's per-module alpha_pattern/rank_pattern and rsLoRA (alpha / sqrt(r)) do not fit
  that formula, so we fold the difference into B: B' = B * scaling * r / alpha, which is
  exactly B for a plain adapter.
- q_proj/k_proj rows are permuted in the base GGUF for llama.cpp's rotary layout; the
  adapter's delta B @ A must land on the same rows, so B gets the same row permutation
  (A acts on the input side and is untouched).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lowrank.errors import UserError
from lowrank.export import tensors
from lowrank.quantize.adapters import LoraAdapter, check_against_base, load_lora_adapter, read_json

log = logging.getLogger(__name__)


def lora_gguf_tensors(adapter: LoraAdapter, config: dict):
    """Yield (gguf tensor name, float32 numpy array) for each lora_a / lora_b, sorted by module name.

    Names and q/k row order come from lowrank.export.tensors, the table the base GGUF writer uses,
    so the adapter can never disagree with the base file about either.
    """
    alpha = adapter.alpha
    if alpha == 0:
        raise UserError(f"{adapter.path}/adapter_config.json: lora_alpha is 0; the adapter would do nothing")
    for hf_name, module in adapter.modules.items():
        name = tensors.gguf_tensor_name(hf_name, config.get("model_type"))
        if name is None:
            raise UserError(f"{adapter.path}: adapter targets {hf_name}, which has no llama.cpp tensor")
        a, b = module.lora_A.to(torch.float32), module.lora_B.to(torch.float32)
        if module.fan_in_fan_out:
            raise UserError(f"{adapter.path}: fan_in_fan_out adapters (GPT-2 style) cannot be written for llama.cpp")
        rank = a.shape[0]
        # llama.cpp multiplies by alpha / rank; fold PEFT's own scaling in so the product is exact.
        b = b * (module.scaling * rank / alpha)
        b = tensors.llama_cpp_rows(b, hf_name, config)
        yield f"{name}.lora_a", a.contiguous().numpy()
        yield f"{name}.lora_b", b.contiguous().numpy()


def export_lora_gguf(adapter_dir: str | Path, base_dir: str | Path, out_path: str | Path) -> Path:
    """Write ``adapter_dir`` (a PEFT LoRA adapter trained on ``base_dir``) as a llama.cpp GGUF adapter.

    The base dir gives the architecture, head counts (for the q/k permutation) and shapes to
    check against. The file goes to a temporary name and is renamed when complete. llama.cpp
    adds the adapter to the base GGUF's weights as they are, i.e. like `merge --into original`.
    """
    import gguf

    from lowrank.export.gguf import atomic_output
    from lowrank.models import model_digest
    from lowrank.quantize.merge import base_tensor_shapes, resolve_base_dir

    base = resolve_base_dir(str(base_dir))
    config = read_json(base / "config.json")
    adapter = load_lora_adapter(adapter_dir)
    digest = model_digest(str(base)) if adapter.record and adapter.record.base.digest else None
    check_against_base(adapter, base_tensor_shapes(base), digest)
    arch = tensors.architecture_spec(config.get("model_type")).gguf_arch
    pairs = list(lora_gguf_tensors(adapter, config))

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, adapter.alpha)
            writer.add_name(adapter.path.name)
            for name, array in pairs:
                writer.add_tensor(name, array)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    log.info("wrote %s (%d LoRA tensors, alpha %g)", out, len(pairs), adapter.alpha)
    return out


def lora_gguf_logit_gap(base_gguf: str | Path, adapter_gguf: str | Path, merged_gguf: str | Path,
                        tokens: list[int], n_threads: int = 1) -> dict:
    """How far llama.cpp's base + LoRA adapter is from the merged GGUF on ``tokens``.

    Returns {"max_abs_diff": max |logits(base + adapter) - logits(merged)|, "adapter_effect":
    max |logits(merged) - logits(base)|, "merged_max_abs": max |logits(merged)|}: the gap should
    be float noise, the effect much larger (an effect near 0 means the adapter did nothing and
    the gap proves nothing). For verify.
    """
    import numpy as np

    from lowrank.export.llama import gguf_logits, load_llama

    def logits(model_path, lora_path=None) -> np.ndarray:
        llm = load_llama(Path(model_path), lora_path=lora_path, n_ctx=max(64, len(tokens)), n_threads=n_threads)
        try:
            return gguf_logits(llm, list(tokens))  # (tokens, vocab)
        finally:
            llm.close()

    with_adapter, merged, plain = logits(base_gguf, adapter_gguf), logits(merged_gguf), logits(base_gguf)
    return {"max_abs_diff": float(np.abs(with_adapter - merged).max()),
            "adapter_effect": float(np.abs(merged - plain).max()),
            "merged_max_abs": float(np.abs(merged).max())}
