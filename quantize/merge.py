"""Merge LoRA adapters into their base, streamed one shard at a time, into a Hugging Face dir.

W' = W + sum over adapters (in the order given) of scaling * B @ A. We never build the
model: each base shard is read with safetensors, its targeted weights get their deltas
in float32, every tensor is checked for NaN/Inf (like peft's safe_merge), the shard is
written in float16/bfloat16 and freed. Peak memory is one shard, so a 7B base merges on
a machine that could not hold it. The result goes to a temporary dir renamed when done.

For an adapter trained on a quantized base ("quant" in its lowrank.json), ``into``
picks the weights it is added to: "original" (the fp16/fp32 weights from disk) or
"dequantized" (the weights as the adapter saw them in training: dequantize(quantize(W))).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowrank import locks, runrecord
from lowrank.errors import UserError
from lowrank.files import check_safetensors, remove_stale
from lowrank.models import REFUSED_ARCHITECTURES, SUPPORTED_ARCHITECTURES, model_digest, unsupported_architecture
from lowrank.quantize.adapters import LoraAdapter, check_against_base, load_lora_adapter, read_json
from lowrank.quantize.roundtrip import QUANT_KINDS, quantized_weight_names, roundtrip_weight

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
INTO_CHOICES = ("original", "dequantized")
# Default for adapters trained on nf4/int8 bases, measured by bench/merge_kl.py (docs/bench/merge.md):
# KL to the trained model (nf4 base + adapter) on a 27M random LLaMA with a trained adapter was
# 2e-8 merged into the dequantized weights vs 7e-4 into the original ones (fp16 output), and
# 1.1e-3 vs 1.9e-3 after Q4_K_M; for int8 dequantized is 2x closer in fp16 and a tie after Q4_K_M.
# The adapter learned on top of the quantization error, so the dequantized base is what it fits.
DEFAULT_INTO = "dequantized"
# Files of a model dir that are weights (rewritten by us), never copied as they are.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class MergeConfig:
    """What `lowrank merge` does: base + adapters (applied in order) -> merged Hugging Face dir."""

    base: str = field(default="", metadata={"help": "base model dir (or `tiny`)", "cli": False})
    adapters: list[str] = field(default_factory=list, metadata={"help": "adapter dirs, applied in order", "cli": False})
    out: str = field(default="", metadata={"help": "output dir", "cli": False})
    dtype: str = field(default="float16", metadata={"help": "dtype of the merged weights: float16, bfloat16 or float32"})
    into: str = field(default="", metadata={"help": "for adapters trained on nf4/int8: merge into the 'original' or the "
                                                    "'dequantized' base weights (default: dequantized, measured better)"})
    max_shard_size: str = field(default="", metadata={"help": "re-shard the output, e.g. 2GB (default: shard like the base)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output dir"})


def parse_size(text: str) -> int:
    """--max-shard-size: '2GB' (10^9 bytes each, as Hugging Face's max_shard_size), '1.5GiB', '123' bytes."""
    from lowrank.config import parse_size as parse

    return parse(text, "--max-shard-size")


def resolve_base_dir(base: str) -> Path:
    """A local base model dir (or `tiny`), checked to be a supported, unquantized model; else UserError."""
    from lowrank.tiny import resolve_model_name

    path = Path(resolve_model_name(base))
    if not path.is_dir():
        raise UserError(f"{base}: base model dir not found (give a local Hugging Face model dir)")
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a model dir (no config.json)")
    config = read_json(path / "config.json")
    supported = SUPPORTED_ARCHITECTURES
    if config.get("model_type") in REFUSED_ARCHITECTURES:
        raise unsupported_architecture(f"{path}/config.json", config["model_type"])
    if config.get("model_type") not in supported:
        raise UserError(f"{path}/config.json: model_type {config.get('model_type')!r} is not supported; "
                        f"supported architectures: {', '.join(supported)}")
    if "quantization_config" in config:
        raise UserError(f"{path}: base is already quantized (config.json has quantization_config); merge into the original weights")
    return path


def _base_shards(base: Path) -> dict[str, list[str]]:
    """Base shard file name -> tensor names, in file order."""
    index = base / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map") or {}
        shards: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            shards.setdefault(file, []).append(name)
        missing = [f for f in shards if not (base / f).is_file()]
        if missing:
            raise UserError(f"{index}: shard {missing[0]} is missing")
        return dict(sorted(shards.items()))
    single = base / "model.safetensors"
    if single.is_file():
        check_safetensors(single)
        with safe_open(str(single), framework="pt") as f:
            return {single.name: list(f.keys())}
    raise UserError(f"{base}: not a model dir (no model.safetensors or model.safetensors.index.json); "
                    "only safetensors bases can be merged")


def _tensor_headers(base: Path, shards: dict[str, list[str]]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype string), read from file headers only."""
    out = {}
    for file, names in shards.items():
        check_safetensors(base / file)
        with safe_open(str(base / file), framework="pt") as f:
            for name in names:
                sl = f.get_slice(name)
                out[name] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def base_tensor_shapes(base: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor of a safetensors base dir and its shape, from the file headers (no weights read)."""
    return {name: shape for name, (shape, _) in _tensor_headers(base, _base_shards(base)).items()}


def _plan_output(shards: dict[str, list[str]], headers, dtype: torch.dtype, max_shard_bytes: int | None):
    """Group tensor names into output shards: like the base, or packed up to max_shard_bytes."""
    def out_bytes(name):
        shape, st_dtype = headers[name]
        numel = math.prod(shape)
        is_float = st_dtype in ("F16", "BF16", "F32", "F64")
        return numel * (dtype.itemsize if is_float else {"I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1}.get(st_dtype, 8))

    sizes = {name: out_bytes(name) for names in shards.values() for name in names}
    if not max_shard_bytes:
        groups = list(shards.values())
    else:
        groups, current, size = [], [], 0
        for names in shards.values():
            for name in names:
                if current and size + sizes[name] > max_shard_bytes:
                    groups.append(current)
                    current, size = [], 0
                current.append(name)
                size += sizes[name]
        if current:
            groups.append(current)
    n = len(groups)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return list(zip(files, groups)), sum(sizes.values())


def _chat_template(adapters: list[LoraAdapter]) -> tuple[str | None, str | None]:
    """(name, jinja) of the chat template the last adapter that records one was trained with."""
    for adapter in reversed(adapters):
        template = adapter.record.chat_template if adapter.record else None
        if template:
            return template.name, template.jinja
    return None, None


def _copy_side_files(base: Path, out: Path, dtype: str, template: tuple[str | None, str | None]) -> None:
    """config (with the new dtype), generation config, tokenizer files; the chat template from training."""
    for item in base.iterdir():
        if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES) and item.name not in _WEIGHT_INDEXES \
                and item.name not in ("config.json", runrecord.RECORD_FILE):
            shutil.copy2(item, out / item.name)
    config = read_json(base / "config.json")
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    name, jinja = template
    if jinja:
        # transformers >= 4.43 reads chat_template.jinja and lets it win over tokenizer_config.json;
        # drop the old key too so no reader (ours or llama.cpp's converter) sees two templates.
        tok_cfg_file = out / "tokenizer_config.json"
        if tok_cfg_file.is_file():
            tok_cfg = read_json(tok_cfg_file)
            if tok_cfg.pop("chat_template", None) is not None:
                tok_cfg_file.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
        (out / "chat_template.jinja").write_text(jinja)


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN/Inf anywhere: min and max propagate both, and cost a quarter of isfinite().all()."""
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def _merged_tensor(name, tensor, adapters, roundtrip_quant, roundtrip_names, dtype) -> torch.Tensor:
    """Base tensor + every adapter's delta, in float32, checked, cast to the output dtype."""
    if not tensor.is_floating_point():
        return tensor
    targeted = [a.modules[name] for a in adapters if name in a.modules]
    if not targeted and not (roundtrip_quant and name in roundtrip_names):
        return tensor.to(dtype)
    weight = tensor.to(torch.float32)
    if roundtrip_quant and name in roundtrip_names:
        weight = roundtrip_weight(weight, roundtrip_quant)
    for module in targeted:
        weight += module.delta()
    if not _all_finite(weight):
        raise UserError(f"merging into {name} gives NaN or Inf values; an adapter is broken (check its training loss)")
    merged = weight.to(dtype)
    if not _all_finite(merged):
        raise UserError(f"{name} overflows {dtype} after the merge; use --dtype bfloat16 or float32")
    return merged


def _roundtrip_choice(adapters: list[LoraAdapter], into: str | None) -> tuple[str, str | None]:
    """(training quantization, quantization to redo before adding the deltas or None)."""
    quants = {a.record.quant for a in adapters if a.record} - {"none"}
    if len(quants) > 1:
        raise UserError(f"adapters were trained on different base quantizations ({', '.join(sorted(quants))}); "
                        "merge them separately")
    if not quants:
        if into == "dequantized":
            raise UserError("--into dequantized: the adapters record no nf4/int8 training quantization in lowrank.json")
        return "none", None
    quant = quants.pop()
    chosen = into or DEFAULT_INTO
    log.info("adapters trained on a %s base: merging into the %s weights", quant, chosen)
    return quant, (quant if quant in QUANT_KINDS and chosen == "dequantized" else None)


def _write_shards(base_path: Path, shards: dict[str, list[str]], plan, tmp: Path, adapters, roundtrip_quant,
                  roundtrip_names, dtype: torch.dtype, on_shard) -> dict[str, str]:
    """Write every output shard into ``tmp``, one at a time; returns tensor name -> file."""
    source = {name: file for file, names in shards.items() for name in names}
    weight_map = {}
    for index, (file, names) in enumerate(plan):
        handles = {}  # safe_open memory-maps; tensors are read one by one
        tensors = {}
        for name in names:
            if source[name] not in handles:
                handles[source[name]] = safe_open(str(base_path / source[name]), framework="pt")
            tensors[name] = _merged_tensor(name, handles[source[name]].get_tensor(name), adapters, roundtrip_quant,
                                           roundtrip_names, dtype)
        handles.clear()
        try:
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        except (OSError, RuntimeError) as e:
            if "No space" in str(e) or getattr(e, "errno", None) == 28:
                raise UserError(f"{tmp.parent}: disk full while writing {file}") from None
            raise
        del tensors  # the shard is on disk: free it before reading the next one
        weight_map.update({name: file for name in names})
        if on_shard:
            on_shard({"shard": file, "index": index + 1, "total": len(plan)})
    return weight_map


def merge_adapters(base: str, adapters: list[str], out_dir: str | Path, *, dtype: str = "float16",
                   into: str | None = None, max_shard_size: str | None = None, overwrite: bool = False,
                   on_shard: Callable[[dict], None] | None = None) -> Path:
    """Merge ``adapters`` (in order) into ``base`` and write a Hugging Face dir at ``out_dir``.

    ``into`` matters only for adapters trained on an nf4/int8 base: "original" or
    "dequantized" (None -> DEFAULT_INTO). ``on_shard`` gets {"shard", "index", "total"}
    after each shard is written. Returns the output path.
    """
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if into not in (None, "", *INTO_CHOICES):
        raise UserError(f"--into {into!r}: expected one of {', '.join(INTO_CHOICES)}")
    if not adapters:
        raise UserError("no adapter given; pass --adapter DIR at least once")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
    base_path = resolve_base_dir(base)
    shards = _base_shards(base_path)
    headers = _tensor_headers(base_path, shards)
    loaded = [load_lora_adapter(a) for a in adapters]
    # Hashing a multi-GB base takes a while: only when some adapter records the digest to compare with.
    digest = model_digest(str(base_path)) if any(a.record and a.record.base.digest for a in loaded) else None
    for adapter in loaded:
        check_against_base(adapter, {n: s for n, (s, _) in headers.items()}, digest)
    train_quant, roundtrip_quant = _roundtrip_choice(loaded, into)
    roundtrip_names = quantized_weight_names(base_path) if roundtrip_quant else set()

    torch_dtype = DTYPES[dtype]
    plan, total_bytes = _plan_output(shards, headers, torch_dtype, parse_size(max_shard_size) if max_shard_size else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < total_bytes * 1.02 + (1 << 20):
        raise UserError(f"{out.parent}: not enough disk space: the merged model needs {total_bytes / 1e9:.2f} GB, "
                        f"{free / 1e9:.2f} GB free")

    locks.hold(out)
    leftovers = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(?P<pid>\d+)")
    for stale in remove_stale(out.parent, leftovers):
        log.info("removed %s, left by a merge that was killed", stale)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        weight_map = _write_shards(base_path, shards, plan, tmp, loaded, roundtrip_quant, roundtrip_names,
                                   torch_dtype, on_shard)
        if len(plan) > 1:
            index_doc = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2) + "\n")
        template = _chat_template(loaded)
        _copy_side_files(base_path, tmp, dtype, template)
        # Same record as an adapter's, so export reads the template from either.
        runrecord.write(tmp, runrecord.RunRecord(
            stage="merge", base=runrecord.BaseRef(id=base),
            chat_template=runrecord.ChatTemplate(*template) if template[1] else None,
            extra={"adapters": [str(a.path) for a in loaded], "dtype": dtype, "train_quant": train_quant,
                   "into": "dequantized" if roundtrip_quant else "original"}))
        if out.exists():  # --overwrite: move the old one aside first, so a crash never leaves half of each
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        locks.release(out)
    return out


def merge(config: MergeConfig, on_shard: Callable[[dict], None] | None = None) -> Path:
    """merge_adapters from a MergeConfig."""
    return merge_adapters(config.base, list(config.adapters), config.out, dtype=config.dtype, into=config.into or None,
                          max_shard_size=config.max_shard_size or None, overwrite=config.overwrite, on_shard=on_shard)


__all__ = ["MergeConfig", "merge", "merge_adapters", "DEFAULT_INTO", "INTO_CHOICES", "DTYPES"]
