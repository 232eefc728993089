"""Finding and opening models for the chat apps: what kind of model a path holds, the backend that runs
it (``gguf_backend`` or ``hf_backend``), and the models under a folder for the app's picker.

This sits above both backends and ``backends`` (their shared interface), so that neither backend
imports the other.
"""

from __future__ import annotations

from pathlib import Path

from lowrank.apps.backends import ChatBackend
from lowrank.errors import UserError

GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file (gguf spec, "File Structure")


def sniff_model(path: str | Path) -> str:
    """"gguf", "adapter" or "model" for what lies at ``path``; UserError when it is none of them."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file or directory; give a .gguf file, an adapter dir or a model dir")
    if p.is_dir():
        if (p / "adapter_config.json").is_file():
            return "adapter"
        if (p / "config.json").is_file():
            return "model"
        raise UserError(f"{p} is a directory but holds neither an adapter (adapter_config.json) "
                        "nor a model (config.json)")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(f"{p} is not a GGUF file (it does not start with the bytes 'GGUF'); "
                        "write one with `lowrank export` or give an adapter dir")
    return "gguf"


def load_backend(path: str | Path, *, base: str | None = None, n_ctx: int | None = None,
                 n_threads: int | None = None, device: str | None = None) -> ChatBackend:
    """Load whatever is at ``path``: a GGUF file, an adapter dir (on ``base`` or the one its lowrank.json
    names) or a plain/merged Hugging Face model dir."""
    kind = sniff_model(path)
    if kind == "gguf":
        from lowrank.apps.gguf_backend import GGUFBackend

        return GGUFBackend(str(path), n_ctx=n_ctx, n_threads=n_threads)
    from lowrank.apps.hf_backend import HFBackend

    return HFBackend(str(path), base=base, n_ctx=n_ctx, device=device, n_threads=n_threads)


def find_models(root: str | Path) -> list[Path]:
    """GGUF files, adapter dirs and model dirs under ``root``, sorted; what the app's model picker lists."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--models-dir {root}: not a directory")
    found = []
    for p in sorted(root.rglob("*")):
        if any(part.startswith(".") for part in p.relative_to(root).parts):
            continue  # temporary outputs of an unfinished write are hidden names
        if p.is_file() and p.suffix.lower() == ".gguf":
            found.append(p)
        elif p.is_dir() and ((p / "adapter_config.json").is_file()
                             or ((p / "config.json").is_file() and any(p.glob("*.safetensors")))):
            found.append(p)
    return found
