"""`lowrank verify`: check a GGUF file against the Hugging Face model it came from (exit 1 on a mismatch)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gguf", metavar="GGUF", help="the GGUF file to check")
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="the merged Hugging Face dir it was exported from")
    parser.add_argument("--reference", default=None,
                        help="float GGUF (F16/BF16/F32) to measure a quantized file against (default: an F16 written "
                             "from MODEL_DIR for the check)")
    parser.add_argument("--reference-quant", default=True, action=argparse.BooleanOptionalAction,
                        help="hold a quantized file to llama.cpp's own quantization of the reference (default); "
                             "--no-reference-quant: to llama.cpp's published LLaMA 3 8B figures, which saves "
                             "quantizing a large model again but is too strict for small ones")
    parser.add_argument("--chat-template", default=None, help="template training used (a built-in name or Jinja)")
    parser.add_argument("--greedy-tokens", type=int, default=32, help="greedy continuation length to compare")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--lora", default=None, metavar="ADAPTER.gguf",
                        help="a LoRA adapter GGUF: check that it on --base-gguf gives GGUF's (the merged file's) logits")
    parser.add_argument("--base-gguf", default=None, metavar="BASE.gguf", help="the base GGUF the --lora adapter applies to")


def run(args: argparse.Namespace) -> int:
    from lowrank.exporting import resolve_chat_template
    from lowrank.export.verify import verify_gguf
    from lowrank.export.verify_report import format_report
    from lowrank.tiny import resolve_model_name

    model_dir = Path(resolve_model_name(args.model_dir))
    report = verify_gguf(args.gguf, model_dir, reference_gguf=args.reference,
                         chat_template=resolve_chat_template(args.chat_template, model_dir) if model_dir.is_dir() else None,
                         greedy_tokens=args.greedy_tokens, n_threads=args.threads,
                         lora_gguf=args.lora, base_gguf=args.base_gguf, reference_quant=args.reference_quant)
    print(format_report(report))
    return 0 if report.passed else 1
