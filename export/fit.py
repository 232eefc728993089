"""Will it fit? File size plus estimated RAM at a context length, against a RAM budget.

RAM while llama.cpp runs a GGUF on a CPU (mmap'd weights are resident once touched):
    weights            = the file size
    KV cache (f16)     = 2 (K and V) * n_layer * n_ctx * n_kv_head * head_dim * 2 bytes
    compute buffers    = 256 MiB + logits for a batch of 512 (n_vocab * 512 * 4 bytes), an
                         estimate: llama.cpp sizes them from the graph at load time.
A Raspberry Pi 4 or 5 keeps about 1 GB for the OS and everything else, so a 4 GB board has
3 GB for the model and an 8 GB board 7 GB. An 8 GB laptop runs a desktop and a browser beside it:
3 GB kept. For each machine the report recommends the largest file that fits (the most bits per
weight among the files written), or says which file comes closest and by how much.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lowrank.errors import UserError

GiB = 1024**3
MiB = 1024**2
OS_RESERVE = 1 * GiB  # left to the OS and other processes on a Pi
PI_BOARDS = {"Raspberry Pi 4 (4 GB)": 4 * GiB, "Raspberry Pi 4 (8 GB)": 8 * GiB}  # a Pi 5 has the same sizes
LAPTOP = ("8 GB laptop", 8 * GiB, 3 * GiB)  # (name, RAM, kept for a desktop session and a browser)


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

    def fits(self, ram_total: int, reserve: int = OS_RESERVE) -> bool:
        """True when the model fits a machine with ``ram_total`` bytes after ``reserve``."""
        return self.ram_bytes <= ram_total - reserve


def parse_size(text: str) -> int:
    """A --fit budget: '4GiB' (2^30 bytes each; what a '4 GB' board has), '4GB' (10^9), '512MiB'."""
    from lowrank.config import parse_size as parse

    return parse(text, "--fit", bare="GiB")


def kv_cache_bytes(n_layer: int, n_ctx: int, n_kv_head: int, head_dim: int, bytes_per_value: int = 2) -> int:
    return 2 * n_layer * n_ctx * n_kv_head * head_dim * bytes_per_value


def estimate_fit(gguf_path: str | Path, config: dict, n_ctx: int) -> FitEstimate:
    from lowrank.export.hparams import head_dim

    n_head = int(config["num_attention_heads"])
    kv = kv_cache_bytes(int(config["num_hidden_layers"]), n_ctx, int(config.get("num_key_value_heads") or n_head),
                        head_dim(config))
    compute = 256 * MiB + int(config["vocab_size"]) * min(n_ctx, 512) * 4
    return FitEstimate(str(gguf_path), Path(gguf_path).stat().st_size, kv, compute, n_ctx)


def machines(budget: int | None = None) -> list[tuple[str, int, int]]:
    """(name, RAM, bytes kept for everything else) of each machine the report speaks of."""
    out = [(name, ram, OS_RESERVE) for name, ram in PI_BOARDS.items()] + [LAPTOP]
    if budget is not None:
        out.append((f"{budget / GiB:.3g} GiB budget", budget, OS_RESERVE))
    return out


def recommend(estimates: list[FitEstimate], ram: int, reserve: int = OS_RESERVE) -> tuple[FitEstimate | None, int]:
    """(the largest file that fits, 0), or (None, bytes the smallest file is short by) when none fits."""
    fitting = [e for e in estimates if e.fits(ram, reserve)]
    if fitting:
        return max(fitting, key=lambda e: e.file_bytes), 0
    closest = min(estimates, key=lambda e: e.ram_bytes)
    return None, closest.ram_bytes - (ram - reserve)


def closest_miss(estimates: list[FitEstimate], budget: int) -> str | None:
    """None when a file fits ``budget``; else which file comes closest and by how much (a --fit error)."""
    best, short = recommend(estimates, budget)
    if best is not None or not estimates:
        return None
    closest = min(estimates, key=lambda e: e.ram_bytes)
    return (f"no file fits {budget / GiB:.3g} GiB at n_ctx={closest.n_ctx}: the closest, {Path(closest.path).name}, "
            f"needs {short / MiB:.0f} MiB more; write a smaller type (q3_k_s, q2_k) or lower --context-length")


def format_fit(estimates: list[FitEstimate], budget: int | None = None) -> str:
    """A table: file, size, RAM at n_ctx, fit on the Pi boards, an 8 GB laptop (and ``budget`` if given),
    then the recommended file for each."""
    boards = machines(budget)
    n_ctx = estimates[0].n_ctx if estimates else 0
    lines = [f"fit (RAM = file + f16 KV cache at n_ctx={n_ctx} + compute buffers; {OS_RESERVE // GiB} GB kept for the OS"
             f", {LAPTOP[2] // GiB} GB on a laptop):"]
    for e in estimates:
        verdicts = ", ".join(f"{name}: {'fits' if e.fits(ram, reserve) else 'no'}" for name, ram, reserve in boards)
        lines.append(f"  {Path(e.path).name}: file {e.file_bytes / MiB:.1f} MiB, RAM ~{e.ram_bytes / MiB:.0f} MiB "
                     f"(KV {e.kv_cache_bytes / MiB:.0f} MiB) -> {verdicts}")
    for name, ram, reserve in boards if estimates else []:
        best, short = recommend(estimates, ram, reserve)
        lines.append(f"  recommended for {name}: {Path(best.path).name}" if best is not None else
                     f"  recommended for {name}: none fits; the smallest needs {short / MiB:.0f} MiB more")
    return "\n".join(lines)
