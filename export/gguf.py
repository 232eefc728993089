"""Write a merged Hugging Face model dir as GGUF files that llama.cpp runs.

One file per requested type. F32, F16, BF16, Q8_0, Q4_0 and Q5_0 are written here with
the `gguf` package (header, key-values, tensor infos, aligned data, in the format's order).
K-quants (Q4_K_M, Q5_K_M, Q6_K) need llama.cpp's own quantizer (its importance-weighted
mixes are not in gguf-py), so they are made from an F16 file with llama-cpp-python's
``llama_model_quantize``.

Tensors are streamed: the writer is given every tensor's name, shape and type from the
safetensors headers first (lowrank.export.source), then each tensor is read, converted and written one at a time,
so peak memory stays near the largest tensor rather than the model.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from lowrank import locks
from lowrank.errors import UserError
from lowrank.export import quants
from lowrank.export.hparams import write_hparams
from lowrank.export.source import SourceModel, SourceTensor, load_tensor, read_source
from lowrank.export.stream import TensorWriter
from lowrank.export.vocab import GGUFVocab, load_gguf_vocab, write_vocab
from lowrank.files import remove_stale

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFType:
    """One output type: how its tensors are written and the general.file_type it records."""

    name: str
    ggml: str | None  # gguf.GGMLQuantizationType name for 2-D tensors; None = via llama.cpp
    file_type: str  # gguf.LlamaFileType name
    bits_per_weight: float  # for size estimates of llama.cpp-quantized files


TYPES: dict[str, GGUFType] = {
    "f32": GGUFType("f32", "F32", "ALL_F32", 32),
    "f16": GGUFType("f16", "F16", "MOSTLY_F16", 16),
    "bf16": GGUFType("bf16", "BF16", "MOSTLY_BF16", 16),
    "q8_0": GGUFType("q8_0", "Q8_0", "MOSTLY_Q8_0", 8.5),
    "q5_0": GGUFType("q5_0", "Q5_0", "MOSTLY_Q5_0", 5.5),
    "q4_0": GGUFType("q4_0", "Q4_0", "MOSTLY_Q4_0", 4.5),
    # Average bits per weight of llama.cpp's mixes (llama.cpp tools/quantize README, 7B; the smaller types from
    # the file sizes of LLaMA 3 8B, 8.03e9 weights, in llama.cpp's examples/perplexity/README.md).
    "q6_k": GGUFType("q6_k", None, "MOSTLY_Q6_K", 6.56),
    "q5_k_m": GGUFType("q5_k_m", None, "MOSTLY_Q5_K_M", 5.69),
    "q5_k_s": GGUFType("q5_k_s", None, "MOSTLY_Q5_K_S", 5.57),
    "q4_k_m": GGUFType("q4_k_m", None, "MOSTLY_Q4_K_M", 4.89),
    "q4_k_s": GGUFType("q4_k_s", None, "MOSTLY_Q4_K_S", 4.67),
    "iq4_nl": GGUFType("iq4_nl", None, "MOSTLY_IQ4_NL", 4.50),  # quantize's nominal figure: no 8B size published
    "iq4_xs": GGUFType("iq4_xs", None, "MOSTLY_IQ4_XS", 4.43),
    "q3_k_l": GGUFType("q3_k_l", None, "MOSTLY_Q3_K_L", 4.31),
    "q3_k_m": GGUFType("q3_k_m", None, "MOSTLY_Q3_K_M", 4.00),
    "q3_k_s": GGUFType("q3_k_s", None, "MOSTLY_Q3_K_S", 3.66),
    "q2_k": GGUFType("q2_k", None, "MOSTLY_Q2_K", 3.17),
}


@dataclass
class ExportConfig:
    """`lowrank export`: a merged HF dir (or base + adapters) -> one GGUF file per type."""

    type: list[str] = field(default_factory=lambda: ["f16"], metadata={"help": f"GGUF types, one file each: {', '.join(TYPES)}"})
    out: str = field(default="gguf", metadata={"help": "output directory"})
    name: str | None = field(default=None, metadata={"help": "file name stem (default: the model dir's name)"})
    chat_template: str | None = field(default=None, metadata={"help": "chat template (Jinja, or a built-in name) to store instead of the tokenizer's"})
    context_length: int = field(default=2048, metadata={"help": "context length for the fit report"})
    fit: str | None = field(default=None, metadata={"help": "RAM budget to check the files against, e.g. 4GiB (2^30 bytes) or 4GB (10^9); a bare number is GiB"})
    modelfile: bool = field(default=True, metadata={"help": "write an Ollama Modelfile next to each GGUF"})
    verify: bool = field(default=True, metadata={"help": "run lowrank verify on each file after export"})
    threads: int = field(default=0, metadata={"help": "threads for llama.cpp's quantizer (0: all cores)"})
    lora: bool = field(default=False, metadata={"help": "with --adapter: also write the base as GGUF and each adapter as a "
                                                       "llama.cpp LoRA GGUF (Llama(model_path=base, lora_path=adapter)), "
                                                       "and verify that base + adapter gives the merged file's logits"})
    lora_only: bool = field(default=False, metadata={"help": "with --adapter: write only each adapter as a llama.cpp "
                                                            "LoRA GGUF (<name>-lora.gguf); no merge, no model files"})


def parse_types(types: list[str] | str) -> list[GGUFType]:
    """`f16,q8_0,q4_k_m` -> GGUFTypes; UserError for an unknown name."""
    names = [t.strip().lower() for t in (types.split(",") if isinstance(types, str) else types) if t.strip()]
    if not names:
        raise UserError(f"--type: give at least one of {', '.join(TYPES)}")
    for n in names:
        if n not in TYPES:
            raise UserError(f"--type: unknown GGUF type {n!r}; known: {', '.join(TYPES)}")
    return [TYPES[n] for n in dict.fromkeys(names)]


# ----------------------------------------------------------------------------- tensors

# Types below 8 bits whose output projection is written as Q8_0 instead, as llama.cpp's quantizer keeps it at
# higher precision (Q6_K, which gguf-py cannot write, or Q8_0 for rows that are not a multiple of 256).
_OUTPUT_AT_Q8_0 = ("Q4_0", "Q5_0")


def output_tensor_name(source: SourceModel) -> str:
    """The tensor llama.cpp multiplies the last hidden state by: output.weight, or token_embd.weight when tied."""
    return "output.weight" if any(t.gguf_name == "output.weight" for t in source.tensors) else "token_embd.weight"


def tensor_qtype(tensor: SourceTensor, gtype: GGUFType, output_name: str = "output.weight"):
    """The ggml type one tensor is stored as in a file of type ``gtype``.

    1-D tensors (norms, biases, rope factors) stay F32, as llama.cpp's converter keeps
    them. Quantized blocks cover 32 elements of a row; a row length that is not a multiple
    falls back to F16 (as llama.cpp's converter does for Q8_0 / Q4_0 / Q5_0). In Q4_0 and
    Q5_0 files the output projection (``output_name``) is Q8_0: its error reaches every logit.
    """
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(tensor.shape) == 1:
        return Q.F32
    qtype = Q[gtype.ggml]
    if gtype.ggml in _OUTPUT_AT_Q8_0 and tensor.gguf_name == output_name:
        qtype = Q.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if tensor.shape[-1] % block:
        return Q.F16
    return qtype


def tensor_nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    return math.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype))


def convert_tensor(array: np.ndarray, qtype) -> np.ndarray:
    import gguf

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return array.astype(np.float32, copy=False)
    if qtype == Q.F16:
        return array.astype(np.float16, copy=False)
    return quants.quantize(array, qtype)  # gguf-py's bytes, chunked and multi-threaded


# ----------------------------------------------------------------------------- files

def check_disk_space(path: Path, needed: int) -> None:
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise UserError(f"{path}: not enough disk space: needs {needed} bytes, {free} free on {path.parent}")


def estimate_vocab_bytes(vocab: GGUFVocab) -> int:
    return (sum(len(t.encode()) + 16 for t in vocab.tokens) + sum(len(m.encode()) + 8 for m in vocab.merges)
            + len((vocab.chat_template or "").encode()) + 65536)


def estimate_file_bytes(source: SourceModel, gtype: GGUFType, vocab: GGUFVocab) -> int:
    if gtype.ggml is None:
        data = sum(math.prod(t.shape) * (4 if len(t.shape) == 1 else gtype.bits_per_weight / 8) for t in source.tensors)
        return int(data) + estimate_vocab_bytes(vocab)
    output = output_tensor_name(source)
    return (sum(tensor_nbytes(t.shape, tensor_qtype(t, gtype, output)) + 64 for t in source.tensors)
            + estimate_vocab_bytes(vocab))


# What a killed export leaves: atomic_output's temp files and the f16 intermediate of K-quants.
_LEFTOVERS = (re.compile(r"\..+\.gguf\.tmp-(?P<pid>\d+)"), re.compile(r"\..+-f16-intermediate-(?P<pid>\d+)\.gguf"))


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A temporary name next to ``path`` to write to: renamed to ``path`` when the block ends, removed on any error,
    so a file under the final name is always complete."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_direct(source: SourceModel, vocab: GGUFVocab, gtype: GGUFType, path: Path, name: str,
                 on_tensor: Callable[[dict], None] | None = None) -> Path:
    """Write one GGUF of a directly written type, streaming tensors; atomic rename at the end."""
    import gguf

    check_disk_space(path, estimate_file_bytes(source, gtype, vocab))
    output = output_tensor_name(source)
    plan = [(t, tensor_qtype(t, gtype, output)) for t in source.tensors]
    with atomic_output(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), source.spec.gguf_arch)
        try:
            writer.add_name(name)
            write_hparams(writer, source.config, int(gguf.LlamaFileType[gtype.file_type]))
            write_vocab(writer, vocab)
            for t, qtype in plan:
                writer.add_tensor_info(t.gguf_name, t.shape, np.dtype(np.float32), tensor_nbytes(t.shape, qtype),
                                       raw_dtype=qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            # Three stages overlap: a reader thread reads the next tensor, this thread converts one, the writer
            # thread writes (and starts disk writeback of) the one before; at most 4 tensors are held at once.
            with TensorWriter(writer) as data, ThreadPoolExecutor(1, thread_name_prefix="lowrank-gguf-reader") as reader:
                upcoming = reader.submit(load_tensor, source, plan[0][0]) if plan else None
                for i, (t, qtype) in enumerate(plan):
                    array = upcoming.result()
                    upcoming = reader.submit(load_tensor, source, plan[i + 1][0]) if i + 1 < len(plan) else None
                    data.write(convert_tensor(array, qtype))
                    del array
                    if on_tensor:
                        on_tensor({"file": path.name, "tensor": t.gguf_name, "index": i + 1, "total": len(plan)})
            writer.fout[0].flush()
            os.fsync(writer.fout[0].fileno())
        finally:
            writer.close()
    return path


def write_llama_quantized(intermediate: Path, gtype: GGUFType, path: Path, threads: int = 0) -> Path:
    """A K-quant file from an F16/F32 GGUF with llama.cpp's quantizer; atomic rename at the end."""
    import ctypes

    import gguf
    import llama_cpp

    from lowrank.export.llama import silence_llama_cpp

    silence_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType[gtype.file_type])
    params.nthread = threads
    with atomic_output(path) as tmp:
        rc = llama_cpp.llama_model_quantize(str(intermediate).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize failed with code {rc} for {path}")
    return path


def export_gguf(model_dir: str | Path, out_dir: str | Path, types: list[str] | str = ("f16",), *,
                name: str | None = None, chat_template: str | None = None, threads: int = 0,
                on_tensor: Callable[[dict], None] | None = None) -> list[Path]:
    """Write ``model_dir`` (a merged HF dir) as one GGUF per type into ``out_dir``; return the paths.

    ``chat_template`` (Jinja) replaces the tokenizer's own in tokenizer.chat_template.
    """
    gtypes = parse_types(list(types) if not isinstance(types, str) else types)
    source = read_source(model_dir)
    vocab = load_gguf_vocab(source.model_dir, int(source.config["vocab_size"]), chat_template)
    out = Path(out_dir)
    locks.hold(out)  # released by the CLI when the command ends (files are published one by one, atomically)
    out.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale(out, *_LEFTOVERS):
        log.info("removed %s, left by an export that was killed", stale)
    stem = name or source.model_dir.resolve().name
    paths = {g.name: out / f"{stem}-{g.name}.gguf" for g in gtypes}
    written: list[Path] = []
    for g in (g for g in gtypes if g.ggml is not None):
        written.append(write_direct(source, vocab, g, paths[g.name], stem, on_tensor))
        log.info("wrote %s", paths[g.name])
    kquants = [g for g in gtypes if g.ggml is None]
    if kquants:
        intermediate = paths.get("f16") or paths.get("f32")
        temp_intermediate = intermediate is None
        if temp_intermediate:
            intermediate = out / f".{stem}-f16-intermediate-{os.getpid()}.gguf"
            needed = estimate_file_bytes(source, TYPES["f16"], vocab) + sum(estimate_file_bytes(source, g, vocab) for g in kquants)
            check_disk_space(intermediate, needed)
            write_direct(source, vocab, TYPES["f16"], intermediate, stem, on_tensor)
        try:
            for g in kquants:
                check_disk_space(paths[g.name], estimate_file_bytes(source, g, vocab))
                written.append(write_llama_quantized(intermediate, g, paths[g.name], threads))
                log.info("wrote %s", paths[g.name])
        finally:
            if temp_intermediate:
                intermediate.unlink(missing_ok=True)
    return [paths[g.name] for g in gtypes]
