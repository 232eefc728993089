"""What `lowrank verify` found in a GGUF file (VerifyReport: the numbers of each check of
lowrank/export/verify.py, the limits they were held to, the problems), the float files' logit
tolerances, and the report as the CLI prints it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


# Max |logit difference| / max |logit|: F32 files differ only by summation order (measured
# 1.9e-4 on the tiny model); F16/BF16 weights add rounding of every weight (2^-11 / 2^-8
# relative): measured 5.4e-4 for F16 on the tiny model, so 10x margin.
LOGIT_TOLERANCE = {"F32": 2e-3, "F16": 5e-3, "BF16": 3e-2}
# llama.cpp computes GELU (Gemma's MLP) through a table indexed by the fp16 input and holding fp16 outputs
# (ggml-cpu, GGML_GELU_FP16), so every activation is rounded to 11 bits even in an F32 file. Measured on the tiny
# Gemma models: F32 files 1.3e-3 (gemma2) and 1.8e-3 (gemma3), F16 files 1.8e-3 and 2.3e-3; with llama.cpp's KV
# cache in F32 an F32 file still differs by 6e-4, where a LLaMA's differs by 3e-7. Their float files are held to
# 1e-2, about 4x that; a mis-wired Gemma tensor or hparam moves logits by 0.1 or more (a sliding window one token
# off: 0.6, the global rope base: 0.12).
FP16_ACTIVATION_TOLERANCE = {"gemma2": 1e-2, "gemma3": 1e-2}


def logit_tolerance(file_type: str, architecture: str | None) -> float:
    """The max relative logit difference a float file of ``file_type`` may show against the HF model."""
    tolerance = LOGIT_TOLERANCE.get(file_type, 2e-2)
    return max(tolerance, FP16_ACTIVATION_TOLERANCE.get(architecture, 0.0))


@dataclass
class VerifyReport:
    path: str
    file_type: str
    architecture: str | None = None  # general.architecture
    texts_checked: int = 0
    tokenization_mismatches: list[dict] = field(default_factory=list)
    max_logit_diff: float | None = None  # relative to max |logit|
    logit_tolerance: float | None = None
    greedy_identical_tokens: int | None = None
    greedy_tokens: int = 0
    greedy_near_ties: int = 0  # positions where the two differ only within the logit tolerance
    kl_divergence: float | None = None  # mean over positions, nats, vs reference
    top1_agreement: float | None = None
    reference: str | None = None
    kl_limit: float | None = None
    top1_limit: float | None = None
    limits_source: str | None = None
    reference_quant_kl: float | None = None  # llama.cpp's own quantization of the reference, same type and text
    reference_quant_top1: float | None = None
    perplexity: float | None = None
    perplexity_hf: float | None = None
    chat_template_checked: bool = False
    chat_template_problem: str | None = None
    chat_tokens_checked: int = 0  # conversations whose llama.cpp token ids were compared with training's
    lora_path: str | None = None
    lora_base: str | None = None
    lora_max_diff: float | None = None  # max |logits(base + adapter) - logits(merged)| / max |logits(merged)|
    lora_effect: float | None = None  # max |logits(merged) - logits(base)| / max |logits(merged)|
    lora_tolerance: float | None = None  # None: quantized files, reported only
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def format_report(report: VerifyReport) -> str:
    """A few human-readable lines (the CLI prints them)."""
    lines = [f"{report.path} ({report.file_type}): {'PASS' if report.passed else 'FAIL'}",
             f"  tokenization: {report.texts_checked - len(report.tokenization_mismatches)}/{report.texts_checked} texts identical"]
    if report.max_logit_diff is not None:
        lines.append(f"  logits: max relative diff {report.max_logit_diff:.2e} (tolerance {report.logit_tolerance:.0e}); "
                     f"greedy: {report.greedy_identical_tokens}/{report.greedy_tokens} tokens identical"
                     + (f", {report.greedy_near_ties} near-tie(s) within tolerance" if report.greedy_near_ties else ""))
    if report.kl_divergence is not None:
        limits = (f" (limits: KL <= {report.kl_limit:.2e}, top-1 >= {report.top1_limit:.1%}, from {report.limits_source})"
                  if report.kl_limit is not None else " (no limits for this type)")
        lines.append(f"  vs {report.reference}: KL {report.kl_divergence:.2e} nats, top-1 agreement "
                     f"{report.top1_agreement:.1%}{limits}")
    if report.perplexity is not None:
        lines.append(f"  perplexity on held-out text: {report.perplexity:.2f} (HF model: {report.perplexity_hf:.2f})")
    if report.chat_template_checked:
        lines.append("  chat template: " + (report.chat_template_problem or
                                             f"identical rendering and token ids ({report.chat_tokens_checked} conversations)"))
    if report.lora_max_diff is not None:
        bound = f"tolerance {report.lora_tolerance:.0e}" if report.lora_tolerance else "reported only: quantized file or base"
        lines.append(f"  LoRA {Path(report.lora_path).name} on {Path(report.lora_base).name}: max relative diff from this "
                     f"file {report.lora_max_diff:.2e} ({bound}); the adapter moves logits by {report.lora_effect:.2e}")
    lines += [f"  problem: {p}" for p in report.problems]
    return "\n".join(lines)
