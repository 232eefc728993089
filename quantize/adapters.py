"""Read a PEFT LoRA adapter dir into per-module (A, B, scaling) triples, checked against a base.

Kept apart from the merge loop so that the LoRA-to-GGUF writer (export/lora.py) reads
adapters exactly the way the merge does: same key parsing, same scaling rules.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowrank import runrecord
from lowrank.errors import UserError
from lowrank.files import check_safetensors
from lowrank.runrecord import RunRecord

# PEFT saves "base_model.model.<module path>.lora_A.weight"; older or hand-made files may keep
# the adapter name ("lora_A.default.weight").
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_UNSUPPORTED_KEY = re.compile(r"lora_embedding_[AB]|lora_magnitude_vector|\.lora_[AB](?:\.[^.]+)?\.bias$")


@dataclass
class LoraModule:
    """One adapted linear layer: the delta is scaling * B @ A, shape (out, in) of the base weight."""

    lora_A: torch.Tensor  # (r, in)
    lora_B: torch.Tensor  # (out, r)
    scaling: float  # alpha / r, or alpha / sqrt(r) with rsLoRA
    fan_in_fan_out: bool  # base weight stored transposed (GPT-2 Conv1D style)

    def delta(self) -> torch.Tensor:
        """scaling * B @ A in float32, laid out like the base weight."""
        d = (self.lora_B.to(torch.float32) @ self.lora_A.to(torch.float32)) * self.scaling
        return d.T if self.fan_in_fan_out else d


@dataclass
class LoraAdapter:
    path: Path
    config: dict  # adapter_config.json
    record: RunRecord | None  # lowrank.json (None for a plain PEFT dir)
    modules: dict[str, LoraModule] = field(default_factory=dict)  # base weight name -> module

    @property
    def alpha(self) -> float:
        return float(self.config.get("lora_alpha", 8))


def read_json(path: Path) -> dict:
    """A JSON object from a file, or a UserError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module path ending in it (peft get_pattern_key)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_lora_adapter(adapter_dir: str | Path) -> LoraAdapter:
    """Load a LoRA adapter's small tensors and work out each module's scaling."""
    from safetensors import safe_open

    path = Path(adapter_dir)
    if not path.is_dir():
        raise UserError(f"{path}: adapter dir not found")
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise UserError(f"{path}: not a PEFT adapter (no adapter_config.json); give the dir written by lowrank sft/ppo")
    config = read_json(config_file)
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{config_file}: peft_type is {config.get('peft_type')}; only LoRA adapters can be merged")
    if config.get("use_dora"):
        raise UserError(f"{config_file}: DoRA adapters (use_dora) are not supported; train a plain LoRA adapter")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"{path}: no adapter_model.safetensors (only safetensors adapters are supported)")
    record = runrecord.read_optional(path)

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    extra: list[str] = []
    check_safetensors(weights)
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if _UNSUPPORTED_KEY.search(key):
                raise UserError(f"{weights}: tensor {key} is of a LoRA variant that cannot be merged (embedding LoRA, DoRA or lora_bias)")
            m = _LORA_KEY.match(key)
            if m is None:
                extra.append(key)
                continue
            pairs.setdefault(m["module"], {})[m["which"]] = f.get_tensor(key)
    if extra:
        # modules_to_save (e.g. a reward model's score head) replace whole base modules; a causal LM has no score head.
        raise UserError(f"{weights}: holds non-LoRA tensors ({extra[0]}{', ...' if len(extra) > 1 else ''}), "
                        "e.g. a reward model's score head; only causal-LM LoRA adapters (SFT, PPO policy) can be merged")
    if not pairs:
        raise UserError(f"{weights}: no LoRA tensors found")

    adapter = LoraAdapter(path=path, config=config, record=record)
    alpha = float(config.get("lora_alpha", 8))
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise UserError(f"{weights}: {module} has lora_{'A' if 'A' not in ab else 'B'} missing; the file is incomplete")
        rank = ab["A"].shape[0]  # the saved shape is the truth; rank_pattern only explains it
        mod_alpha = float(_pattern_value(config.get("alpha_pattern"), module, alpha))
        # rsLoRA (Kalajdzievski 2023) scales by alpha/sqrt(r) so that larger ranks keep learning; peft use_rslora.
        scaling = mod_alpha / math.sqrt(rank) if config.get("use_rslora") else mod_alpha / rank
        adapter.modules[f"{module}.weight"] = LoraModule(ab["A"], ab["B"], scaling, bool(config.get("fan_in_fan_out")))
    return adapter


def check_against_base(adapter: LoraAdapter, base_shapes: dict[str, tuple[int, ...]], base_digest: str | None) -> None:
    """UserError if the adapter was made for another base: recorded digest, missing modules, or wrong shapes."""
    if base_digest:
        runrecord.check_base(adapter.record, adapter.path, digest=base_digest, hint="pass the base it was trained on")
    for name, module in adapter.modules.items():
        if name not in base_shapes:
            raise UserError(f"{adapter.path}: adapter targets {name.removesuffix('.weight')}, which the base does not have; "
                            "pass the base it was trained on")
        rows, cols = module.lora_B.shape[0], module.lora_A.shape[1]
        expected = (cols, rows) if module.fan_in_fan_out else (rows, cols)
        if tuple(base_shapes[name]) != expected:
            raise UserError(f"{adapter.path}: {name} is {tuple(base_shapes[name])} in the base but the adapter expects "
                            f"{expected}; the adapter was made for another base")
