"""The merged Hugging Face model dir a GGUF is written from: its config, its tensors with their GGUF
names (from the safetensors headers only), and each tensor read as llama.cpp keeps it.

Nothing here imports torch or transformers: the headers are parsed by lowrank.files.check_safetensors
and each tensor is read with one ``readinto``, so an F16 or Q8_0 export starts in a fraction of a second.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowrank.errors import UserError
from lowrank.export import quants
from lowrank.export import tensors as table
from lowrank.export.hparams import GEMMA_SWA_PERIOD, check_gemma, head_dim, llama3_rope_factors, rope_scaling
from lowrank.files import check_safetensors


@dataclass
class SourceTensor:
    hf_name: str
    gguf_name: str
    file: Path | None  # None for tensors we compute (rope_freqs)
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype, e.g. "F16"
    offset: int = 0  # where its bytes start in ``file``


@dataclass
class SourceModel:
    model_dir: Path
    config: dict
    spec: table.ArchitectureSpec
    tensors: list[SourceTensor]

    @property
    def n_params(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)


def read_config(model_dir: Path) -> dict:
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: not a directory; give a merged Hugging Face model dir")
    path = model_dir / "config.json"
    if not path.exists():
        raise UserError(f"{model_dir}: not a Hugging Face model dir (no config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e})") from e


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / n for n in names]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir}: no .safetensors weights (merge adapters first, or save with safe_serialization)")
    for f in files:
        if not f.exists():
            raise UserError(f"{f}: listed in model.safetensors.index.json but missing")
    return files


# safetensors dtype -> the numpy dtype its bytes are read as (bfloat16, which numpy lacks, as its bits).
_SAFETENSORS_DTYPES = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32, "F64": np.float64}


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def read_source(model_dir: str | Path) -> SourceModel:
    """Check the dir and list its tensors with GGUF names, from the safetensors headers only."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    spec = table.architecture_spec(config.get("model_type", "<missing>"), str(model_dir / "config.json"))
    if config["model_type"] in GEMMA_SWA_PERIOD:
        check_gemma(config, str(model_dir / "config.json"))
    found: list[SourceTensor] = []
    for f in _safetensors_files(model_dir):
        # The header as check_safetensors parses it: not through safetensors.safe_open, whose "pt" framework
        # imports torch (over a second of start-up) and whose "numpy" one copies each tensor out of the file.
        header, data_start = check_safetensors(f)
        for hf_name, entry in header.items():
            if table.is_skipped(hf_name):
                continue
            gguf_name = table.gguf_tensor_name(hf_name, config.get("model_type"))
            if gguf_name is None:
                raise UserError(f"{f}: tensor {hf_name} has no llama.cpp equivalent for {config['model_type']}")
            if entry.get("dtype") not in _SAFETENSORS_DTYPES:
                raise UserError(f"{f}: tensor {hf_name} is {entry.get('dtype')}; GGUF export reads F16, BF16, F32 or F64")
            begin, end = entry["data_offsets"]
            found.append(SourceTensor(hf_name, gguf_name, f, tuple(entry["shape"]), entry["dtype"], data_start + begin))
    if config.get("tie_word_embeddings", False):
        # llama.cpp uses token_embd as the output projection when output.weight is absent.
        found = [t for t in found if t.gguf_name != "output.weight"]
    elif not any(t.gguf_name == "output.weight" for t in found):
        raise UserError(f"{model_dir}: no lm_head.weight and tie_word_embeddings is false")
    if not any(t.gguf_name == "token_embd.weight" for t in found):
        raise UserError(f"{model_dir}: no model.embed_tokens.weight")
    rope = rope_scaling(config)
    if rope.get("rope_type") == "llama3":
        found.append(SourceTensor("<computed>", "rope_freqs.weight", None, (head_dim(config) // 2,), "F32"))
    found.sort(key=lambda t: _natural_key(t.gguf_name))
    return SourceModel(model_dir, config, spec, found)


def load_tensor(source: SourceModel, tensor: SourceTensor) -> np.ndarray:
    """One tensor as float16/32 numpy, as llama.cpp keeps it (q/k permuted, norms offset: tensors.llama_cpp_values).

    Read with one ``readinto`` into a fresh array: the kernel copies from the page cache at memory speed,
    where a mmap'd view (what safetensors gives) takes a page fault per 4 KiB, in the checks here and again
    in the write, 2-4x the time on a 1.1B model; and nothing of the shard stays mapped. bfloat16 is widened
    to float32 (exact: its bits are the high half of a float32's).
    """
    if tensor.file is None:
        return llama3_rope_factors(source.config)
    data = np.empty(tensor.shape, _SAFETENSORS_DTYPES[tensor.dtype])
    with open(tensor.file, "rb", buffering=0) as f:
        f.seek(tensor.offset)
        if f.readinto(memoryview(data).cast("B")) != data.nbytes:
            raise UserError(f"{tensor.file}: truncated while reading tensor {tensor.hf_name}")
    if tensor.dtype == "BF16":
        data = (data.astype(np.uint32) << 16).view(np.float32)
    data = table.llama_cpp_values(data, tensor.hf_name, source.config)
    if not quants.all_finite(data):
        raise UserError(f"{tensor.file}: tensor {tensor.hf_name} has NaN or infinite values; refusing to export it")
    return data
