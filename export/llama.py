"""Loading GGUF files in llama.cpp (llama-cpp-python) for checks: quiet, all logits kept, safe on AMX VMs."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lowrank.errors import UserError


def silence_llama_cpp() -> None:
    """Route llama.cpp's C logging to nowhere (it writes to stderr otherwise)."""
    import llama_cpp

    global _LOG_CALLBACK
    if "_LOG_CALLBACK" not in globals():
        _LOG_CALLBACK = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_LOG_CALLBACK, None)


def cpu_advertises_amx() -> bool:
    """True when /proc/cpuinfo lists Intel AMX (amx_tile)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_tile" in line for line in f)
    except OSError:
        return False


@contextmanager
def plain_cpu_weights():
    """Load llama.cpp models without its extra CPU weight buffers (AMX, repacking) on AMX CPUs.

    llama.cpp built with -march=native on a CPU that advertises AMX moves quantized weights
    (Q4_0, Q8_0, K-quants) into AMX buffers. Virtual machines can advertise AMX and grant the
    kernel permission, yet fault on the tile instructions: on this project's Firecracker VMs
    (Xeon with amx_tile/amx_int8 in cpuinfo) the first Q8_0 matmul dies with SIGILL at
    ``tilezero``. Elsewhere (no AMX: laptops, a Raspberry Pi) nothing changes. llama-cpp-python
    has no argument for llama_model_params.use_extra_bufts, so its default params are
    wrapped while a model loads.
    """
    import llama_cpp.llama_cpp as C

    if not cpu_advertises_amx():
        yield
        return
    default = C.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    C.llama_model_default_params = params
    try:
        yield
    finally:
        C.llama_model_default_params = default


def load_llama(path: Path, *, n_ctx: int = 256, n_threads: int = 2, vocab_only: bool = False,
               lora_path: str | Path | None = None):
    """A llama-cpp-python Llama with every position's logits kept; UserError when llama.cpp refuses the file."""
    from llama_cpp import Llama

    silence_llama_cpp()
    try:
        with plain_cpu_weights():
            return Llama(str(path), n_ctx=n_ctx, n_threads=n_threads, logits_all=not vocab_only, vocab_only=vocab_only,
                         lora_path=str(lora_path) if lora_path else None, verbose=False)
    except (ValueError, RuntimeError) as e:
        what = f"{path} with the LoRA adapter {lora_path}" if lora_path else str(path)
        raise UserError(f"{what}: llama.cpp cannot load this ({e})") from e


def gguf_logits(llm, ids: list[int]) -> np.ndarray:
    """(len(ids), vocab) float32 logits of llama.cpp for a token sequence."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)
