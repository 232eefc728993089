"""Typed configs filled from a YAML recipe and/or command-line flags (flags win).

Each stage defines one dataclass (SFTConfig, RewardConfig, PPOConfig, ...), composed of the
shared field groups of lowrank.fields plus its own fields. Its fields become flags automatically: ``learning_rate: float = 2e-4`` gives
``--learning-rate``; the comment written in ``field(metadata={"help": ...})`` is
the flag's help. A field of type bool gets ``--name/--no-name``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lowrank.errors import UserError

T = TypeVar("T")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar_type(tp: Any) -> Any:
    """The Python type a flag's string is parsed into (Optional[X] -> X)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _scalar_type(args[0]) if len(args) == 1 else str
    if origin in (list, tuple):
        return list
    return tp if tp in (int, float, str, bool) else str


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of ``cls`` plus ``--config FILE.yaml``.

    Defaults are left as None so that we can tell which flags were given and let
    them override the YAML file.
    """
    parser.add_argument("--config", type=Path, default=None, help="YAML recipe; flags override its values")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        tp = _scalar_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is not None and default != "":
            help_text = f"{help_text} (default: {default})"
        if tp is bool:
            parser.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif tp is list:
            parser.add_argument(_flag(f.name), dest=f.name, default=None, help=help_text + " (comma-separated)",
                                type=lambda s: [x.strip() for x in s.split(",") if x.strip()])
        else:
            parser.add_argument(_flag(f.name), dest=f.name, type=tp, default=None, help=help_text,
                                metavar=f.name.upper())


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read config file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a text file (byte {e.start} is not UTF-8); give a YAML recipe") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{where}: not valid YAML") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of field: value at the top level")
    return data


def build_config(cls: type[T], args: argparse.Namespace | None = None, **overrides: Any) -> T:
    """Fill ``cls`` from ``args.config`` (YAML), then flags given on the command line, then ``overrides``."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    source = "config"
    if args is not None and getattr(args, "config", None):
        source = str(args.config)
        data = load_yaml(args.config)
        for key, value in data.items():
            key = key.replace("-", "_")
            if key not in names:
                raise UserError(f"{source}: unknown field '{key}' for {cls.__name__}")
            values[key] = value
    if args is not None:
        for name in names:
            value = getattr(args, name, None)
            if value is not None:
                values[name] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    hints = typing.get_type_hints(cls)
    for name, value in list(values.items()):
        if typing.get_origin(hints[name]) is not dict:  # a mapping field (task sizes) is its stage's to check
            values[name] = _typed(value, _scalar_type(hints[name]), f"{source}: field '{name}'")
    return cls(**values)


def _typed(value: Any, tp: Any, where: str) -> Any:
    """``value`` as the field's type ``tp``, or a UserError: no silent truncation (2.5 for an int), no
    bool for a number (YAML's ``yes``), no list or mapping for a single value."""
    if value is None:
        return None
    if tp is list:
        if isinstance(value, str):
            return [x.strip() for x in value.split(",") if x.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(x, (str, int, float)) and not isinstance(x, bool)
                                                    for x in value):
            return list(value)
    elif isinstance(value, bool):
        if tp is bool:
            return value
    elif tp in (int, float):
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return tp(value)  # int("2.5") fails too: no silent truncation
        elif isinstance(value, (int, float)) and (tp is float or float(value).is_integer()):
            return tp(value)
    elif tp is str:
        if isinstance(value, (str, Path)):
            return str(value)
        if isinstance(value, (int, float)):  # a name that YAML read as a number (a seed-like id, a version)
            return str(value)
    elif tp is not bool:
        return value
    raise UserError(f"{where} must be {tp.__name__}, got {value!r}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-safe dict of a config (paths as strings) for lowrank.json and checkpoints."""
    out = {}
    for k, v in dataclasses.asdict(config).items():
        out[k] = str(v) if isinstance(v, Path) else v
    return out


_SIZE_UNITS = {"b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
               "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text, flag: str, *, bare: str = "b") -> int:
    """Bytes of a size such as '24GB' (10^9 bytes each), '24GiB' (2^30), '500MB' or '1.5gib'.

    The one reader of sizes for every flag (--gpu-memory, --fit, --max-shard-size), so '4GB' means
    the same everywhere: SI units for GB/MB, binary for GiB/MiB. A bare number is in ``bare`` units.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    unit = (match.group(2) or bare).lower() if match else None
    if not match or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise UserError(f"{flag}: cannot read size '{text}'; write a positive size such as 4GB (10^9 bytes) "
                        f"or 4GiB (2^30 bytes)" + (f"; a bare number is {bare}" if bare != "b" else ""))
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


# --- checks every stage's config gets when it is built -------------------------------------------

LR_SCHEDULERS = ("cosine", "linear", "constant")
_ABOVE_ZERO = ("temperature", "cliprange", "cliprange_value", "lora_alpha")
_AT_LEAST_ZERO = ("learning_rate", "max_grad_norm", "weight_decay", "warmup_steps", "cliprange_high")


def check_fields(config: Any) -> None:
    """The range and choice checks of the fields stages share, whichever of them ``config`` has; a
    UserError names the flag. Stage configs run this when they are built (``__post_init__``), so a
    bad value is refused before any model loads."""
    def has(name: str) -> bool:
        return hasattr(config, name) and getattr(config, name) is not None

    for name in _ABOVE_ZERO:
        if has(name) and not getattr(config, name) > 0:
            raise UserError(f"{_flag(name)} must be above 0, got {getattr(config, name)}")
    for name in _AT_LEAST_ZERO:
        if has(name) and not getattr(config, name) >= 0:
            raise UserError(f"{_flag(name)} must be at least 0, got {getattr(config, name)}")
    if has("lr_scheduler") and config.lr_scheduler not in LR_SCHEDULERS:
        raise UserError(f"--lr-scheduler: unknown '{config.lr_scheduler}'; choose cosine, linear or constant")
    if has("optim_bits") and config.optim_bits not in (8, 32):
        raise UserError(f"--optim-bits must be 8 or 32, got {config.optim_bits}")
    if has("top_p") and not 0 < config.top_p <= 1:
        raise UserError(f"--top-p must lie in (0, 1], got {config.top_p}")
    if has("lora_dropout") and not 0 <= config.lora_dropout < 1:
        raise UserError(f"--lora-dropout must be in [0, 1), got {config.lora_dropout}")
    if has("max_new_tokens") and config.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {config.max_new_tokens}")
    if has("eval_fraction") and not 0.0 <= config.eval_fraction < 1.0:
        raise UserError(f"--eval-fraction must be in [0, 1), got {config.eval_fraction}")
    if has("max_steps") and has("epochs") and (config.max_steps < 0 or config.epochs <= 0 and config.max_steps == 0):
        raise UserError("give --max-steps > 0 or --epochs > 0")
