"""Will it fit? File size plus estimated RAM at a context length, against a RAM budget.

RAM while llama.cpp runs a GGUF on a CPU (mmap'd weights are resident once touched):
    weights            = the file size
    KV cache (f16)     = 2 (K and V) * n_layer * n_ctx * n_kv_head * head_dim * 2 bytes
    compute buffers    = 256 MiB + logits for a batch of 512 (n_vocab * 512 * 4 bytes), an
                         estimate: llama.cpp sizes them from the graph at load time.
A Raspberry Pi 4 keeps about 1 GB for the OS and everything else, so a 4 GB board has
3 GB for the model and an 8 GB board 7 GB.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lowrank.errors import UserError

GiB = 1024**3
MiB = 1024**2
OS_RESERVE = 1 * GiB  # left to the OS and other processes on a Pi
PI_BOARDS = {"Raspberry Pi 4 (4 GB)": 4 * GiB, "Raspberry Pi 4 (8 GB)": 8 * GiB}


@dataclass
class FitEstimate:
    path: str
    file_bytes: int
    kv_cache_bytes: int
    compute_bytes: int
    n_ctx: int

    @property
    def ram_bytes(self) -> int:
        return self.file_bytes + self.kv_cache_bytes + self.compute_bytes

    def fits(self, ram_total: int) -> bool:
        """True when the model fits a machine with ``ram_total`` bytes after OS_RESERVE."""
        return self.ram_bytes <= ram_total - OS_RESERVE


def parse_size(text: str) -> int:
    """A --fit budget: '4GiB' (2^30 bytes each; what a '4 GB' board has), '4GB' (10^9), '512MiB'."""
    from lowrank.config import parse_size as parse

    return parse(text, "--fit", bare="GiB")


def kv_cache_bytes(n_layer: int, n_ctx: int, n_kv_head: int, head_dim: int, bytes_per_value: int = 2) -> int:
    return 2 * n_layer * n_ctx * n_kv_head * head_dim * bytes_per_value


def estimate_fit(gguf_path: str | Path, config: dict, n_ctx: int) -> FitEstimate:
    from lowrank.export.gguf import head_dim

    n_head = int(config["num_attention_heads"])
    kv = kv_cache_bytes(int(config["num_hidden_layers"]), n_ctx, int(config.get("num_key_value_heads") or n_head),
                        head_dim(config))
    compute = 256 * MiB + int(config["vocab_size"]) * min(n_ctx, 512) * 4
    return FitEstimate(str(gguf_path), Path(gguf_path).stat().st_size, kv, compute, n_ctx)


def format_fit(estimates: list[FitEstimate], budget: int | None = None) -> str:
    """A table: file, size, RAM at n_ctx, and fit on the Pi 4 boards (and ``budget`` if given)."""
    boards = dict(PI_BOARDS)
    if budget is not None:
        boards[f"{budget / GiB:.3g} GiB budget"] = budget
    n_ctx = estimates[0].n_ctx if estimates else 0
    lines = [f"fit (RAM = file + f16 KV cache at n_ctx={n_ctx} + compute buffers; {OS_RESERVE // GiB} GB kept for the OS):"]
    for e in estimates:
        verdicts = ", ".join(f"{name}: {'fits' if e.fits(ram) else 'no'}" for name, ram in boards.items())
        lines.append(f"  {Path(e.path).name}: file {e.file_bytes / MiB:.1f} MiB, RAM ~{e.ram_bytes / MiB:.0f} MiB "
                     f"(KV {e.kv_cache_bytes / MiB:.0f} MiB) -> {verdicts}")
    return "\n".join(lines)
