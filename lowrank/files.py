"""Checks of weight files before a library reads them: a truncated, empty or garbled safetensors file
becomes one UserError naming it and what is wrong, instead of a SafetensorError traceback.

The safetensors layout (huggingface/safetensors, "Format"): 8 bytes little-endian N, then N bytes of
JSON header mapping each tensor to its dtype, shape and [begin, end) data offsets, then the data.
Reading the header alone (no tensor data) finds every fault a kill mid-write or a bad download leaves.

Also the small file writes that must never be seen half done (:func:`write_text_atomic`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from lowrank.errors import UserError

_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit on the header size


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to a temporary name beside ``path`` and rename it into place; the temporary
    file is removed when the write fails (the OSError is raised for the caller to word)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def check_safetensors(path: str | Path) -> tuple[dict, int]:
    """Raise UserError unless ``path`` is a complete safetensors file (header and every tensor's bytes).

    Returns its tensor entries (the JSON header without ``__metadata__``) and the offset its data starts at.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise UserError(f"{path}: not a safetensors file: {size} bytes, shorter than its 8-byte header "
                                "length (truncated or empty)")
            length = int.from_bytes(prefix, "little")
            if length > min(_MAX_HEADER, size - 8):
                raise UserError(f"{path}: corrupt safetensors file: its header length says {length} bytes, the file "
                                f"has {size - 8} after it")
            header = json.loads(f.read(length))
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: corrupt safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors file: its header is not a JSON object")
    ends = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise UserError(f"{path}: corrupt safetensors file: tensor {name!r} has no valid data_offsets")
        ends.append(offsets[1])
    needed = 8 + length + max(ends, default=0)
    if needed > size:
        raise UserError(f"{path}: truncated safetensors file: {size} bytes, its header describes {needed}")
    header.pop("__metadata__", None)
    return header, 8 + length


def check_weights_dir(directory: str | Path) -> None:
    """check_safetensors on every ``*.safetensors`` file directly in ``directory`` (a model or adapter dir)."""
    directory = Path(directory)
    if directory.is_dir():
        for path in sorted(directory.glob("*.safetensors")):
            check_safetensors(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(directory: str | Path, *patterns: re.Pattern) -> list[Path]:
    """Remove the entries of ``directory`` whose name matches one of ``patterns`` (each with a group ``pid``)
    and whose process is gone: the temp files and dirs a killed export or merge left. Returns what went."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        match = next((m for m in (p.fullmatch(entry.name) for p in patterns) if m), None)
        if match is None or int(match["pid"]) == os.getpid() or _alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
