"""Limits on how far a quantized GGUF may drift from its float reference, and where they come from.

A quantized file passes when its KL divergence to the float reference (mean over the positions of a
held-out text, nats) is at most a limit and its top-1 agreement with the reference at least one.
Both limits come from one of two sources:

- **llama.cpp's own quantization of the same float file** (the default). ``llama_model_quantize`` turns the
  reference into the same type; its KL and top-1 agreement, measured on the same text, are what this
  model at this type should give. Ours may be worse by at most ``KL_FACTOR`` times its KL and
  ``TOP1_MARGIN`` of agreement. This works for any model size: a tiny random model's logits are almost
  uniform, so its KL is far below a 7B's and its top-1 agreement far noisier, and no absolute figure fits
  both. Measured on tiny models (hidden 64 and 256, 2026-12-05): our Q8_0/Q5_0/Q4_0 (written by gguf-py
  from the F32 weights) against llama.cpp's from the F16 file, KL ratio 0.9-1.6 and top-1 within 6
  points; K-quants are llama.cpp's own, so identical. Negating the block scales of the largest tensor
  raises KL 100-30000x and drops top-1 agreement to 0%.
- **llama.cpp's published figures for LLaMA 3 8B** against FP16 (examples/perplexity/README.md, revision
  f364eb6f, Wikitext-2, no importance matrix), when no reference quantization is made
  (``reference_quant=False``, or llama.cpp cannot make one). Limit: ``PUBLISHED_KL_FACTOR`` times the
  published mean KLD, and the published "same top p" less ``PUBLISHED_TOP1_MARGIN`` (types without a
  published figure take the next lower-bit type's). LLaMA 3 quantizes worse than LLaMA 2; models much
  smaller than 7B quantize worse still and may fail these limits with a sound file.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

KL_FACTOR = 2.0  # ours may have up to twice the KL of llama.cpp's quantization of the same file ...
KL_FLOOR = 1e-6  # ... plus this, so that a reference KL of ~0 does not demand bit-identical logits
TOP1_MARGIN = 0.10  # and up to 10 points less top-1 agreement

PUBLISHED_KL_FACTOR = 3.0
PUBLISHED_TOP1_MARGIN = 0.15
# type -> (mean KLD to FP16, same top-1 or None), LLaMA 3 8B, llama.cpp examples/perplexity/README.md.
PUBLISHED_8B: dict[str, tuple[float, float | None]] = {
    "Q8_0": (0.001355, 0.97674), "Q6_K": (0.005452, 0.96031), "Q5_K_M": (0.010762, None),
    "Q5_K_S": (0.016595, None), "Q5_0": (0.022239, None), "Q4_K_M": (0.031273, 0.91901),
    "Q4_K_S": (0.043136, None), "IQ4_XS": (0.036334, None), "Q4_0": (0.071940, None),
    "Q3_K_L": (0.087176, None), "Q3_K_M": (0.101913, None), "Q3_K_S": (0.228217, None),
    "Q2_K": (0.445132, 0.71138),
}
_BITS_ORDER = list(PUBLISHED_8B)  # highest precision first

FLOAT_TYPES = ("F32", "F16", "BF16")
# Temp dirs of a verification killed before it cleaned up (removed by the next one in that dir).
STALE_VERIFY_DIR = re.compile(r"\..+-verify-(?P<pid>\d+)")


@dataclass
class QualityLimits:
    kl: float
    top1: float
    source: str  # one line: where the limits come from
    reference_quant_kl: float | None = None
    reference_quant_top1: float | None = None


def published_limits(file_type: str) -> QualityLimits | None:
    """Limits from llama.cpp's LLaMA 3 8B figures, or None for a type it publishes nothing for."""
    if file_type not in PUBLISHED_8B:
        return None
    kl, _ = PUBLISHED_8B[file_type]
    top1 = next(t for name in _BITS_ORDER[_BITS_ORDER.index(file_type):] if (t := PUBLISHED_8B[name][1]) is not None)
    return QualityLimits(kl=kl * PUBLISHED_KL_FACTOR, top1=top1 - PUBLISHED_TOP1_MARGIN,
                         source=f"llama.cpp's published {file_type} figures for LLaMA 3 8B "
                                f"(KL x{PUBLISHED_KL_FACTOR:g}, top-1 -{PUBLISHED_TOP1_MARGIN:.0%})")


def relative_limits(file_type: str, kl: float, top1: float) -> QualityLimits:
    """Limits from llama.cpp's own ``file_type`` quantization of the reference, which measured ``kl``, ``top1``."""
    return QualityLimits(kl=kl * KL_FACTOR + KL_FLOOR, top1=max(0.0, top1 - TOP1_MARGIN),
                         source=f"llama.cpp's own {file_type} of the same reference: KL {kl:.2e}, top-1 {top1:.1%}; "
                                f"margin KL x{KL_FACTOR:g}, top-1 -{TOP1_MARGIN:.0%}",
                         reference_quant_kl=kl, reference_quant_top1=top1)


def check_limits(kl: float, top1: float, limits: QualityLimits, reference: str) -> list[str]:
    """The problems (measured figure and limit) of a file that measured ``kl`` and ``top1`` against ``reference``."""
    problems = []
    if kl > limits.kl:
        problems.append(f"KL to {reference} {kl:.2e} nats exceeds the limit {limits.kl:.2e} ({limits.source})")
    if top1 < limits.top1:
        problems.append(f"top-1 agreement with {reference} {top1:.1%} is below the limit {limits.top1:.1%} "
                        f"({limits.source})")
    return problems


@contextmanager
def scratch_dir(next_to: Path) -> Iterator[Path]:
    """A temp dir beside ``next_to`` (same disk as the files being checked), removed afterwards; dirs left by a
    killed verification in the same place are removed first."""
    from lowrank.files import remove_stale

    parent = next_to.parent
    for stale in remove_stale(parent, STALE_VERIFY_DIR):
        log.info("removed %s, left by a verification that was killed", stale)
    path = parent / f".{next_to.stem}-verify-{os.getpid()}"
    try:
        path.mkdir(exist_ok=True)
    except OSError:  # a read-only dir of GGUFs: the system's temp dir
        import tempfile

        path = Path(tempfile.mkdtemp(prefix=f".{next_to.stem}-verify-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_float_reference(model_dir: Path, path: Path) -> Path:
    """An F16 GGUF of the HF model in ``model_dir`` at ``path`` (when no float GGUF was given)."""
    from lowrank.export.gguf import TYPES, write_direct
    from lowrank.export.source import read_source
    from lowrank.export.vocab import load_gguf_vocab

    source = read_source(model_dir)
    vocab = load_gguf_vocab(source.model_dir, int(source.config["vocab_size"]), None)
    return write_direct(source, vocab, TYPES["f16"], path, source.model_dir.name)


def llama_cpp_quantization(reference: Path, file_type: str, out: Path) -> Path | None:
    """``reference`` (a float GGUF) quantized to ``file_type`` by llama.cpp at ``out``; None if llama.cpp cannot
    (a type that needs an importance matrix, say)."""
    import gguf

    from lowrank.export.gguf import GGUFType, write_llama_quantized

    try:
        ftype = gguf.LlamaFileType[f"MOSTLY_{file_type}"]
    except KeyError:
        return None
    try:
        return write_llama_quantized(reference, GGUFType(file_type.lower(), None, ftype.name, 0), out)
    except RuntimeError as e:
        log.warning("llama.cpp cannot make a %s reference quantization (%s); using published limits", file_type, e)
        return None
