"""`lowrank export`: the flags in, lowrank.exporting.export_model's paths, fit report and verify reports out.

With ``--adapter DIR`` (repeatable) the adapters are merged first; ``--lora`` also writes the base and each
adapter as a llama.cpp LoRA GGUF, ``--lora-only`` only the LoRA GGUFs (lowrank/exporting.py says more).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from lowrank.config import add_dataclass_arguments, build_config
from lowrank.errors import UserError


def register(parser: argparse.ArgumentParser) -> None:
    from lowrank.export.gguf import ExportConfig

    parser.add_argument("model_dir", metavar="MODEL_DIR", help="merged Hugging Face model dir (or the base, with --adapter)")
    parser.add_argument("--adapter", dest="adapter_dirs", action="append", default=[], metavar="DIR",
                        help="merge this adapter into MODEL_DIR first (repeat to apply several, in order)")
    add_dataclass_arguments(parser, ExportConfig)


class TensorBars:
    """One tqdm bar per file being written, fed export_gguf's per-tensor events."""

    def __init__(self) -> None:
        self.bars: dict = {}

    def __call__(self, event: dict) -> None:
        from tqdm import tqdm

        bar = self.bars.get(event["file"]) or self.bars.setdefault(
            event["file"], tqdm(total=event["total"], desc=event["file"], unit="tensor", leave=False))
        bar.update(1)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def export_and_report(config, model_dir: Path, adapters: Sequence[str] = (), *, base_name: str | None = None) -> int:
    """Export as lowrank.exporting.export_model does, printing each path, the fit report and each verify report.

    0 when every check passes, else 1.
    """
    from lowrank.export.fit import closest_miss, format_fit
    from lowrank.export.verify_report import format_report
    from lowrank.exporting import export_model

    logging.getLogger("gguf").setLevel(logging.WARNING)  # gguf-py logs every file it opens at INFO
    bars = TensorBars()

    def show_files(result) -> None:
        bars.close()
        for p in result.written:
            print(p)
        if not config.lora_only:
            print(format_fit(result.fits, result.budget))

    try:
        result = export_model(config, model_dir, adapters, base_name=base_name, on_tensor=bars, on_written=show_files,
                              on_report=lambda report: print(format_report(report)))
    finally:
        bars.close()
    if result.lora_check_skipped:
        print("LoRA check skipped: llama-cpp-python applies one adapter per model; verify each with "
              "`lowrank verify MERGED.gguf MERGED_DIR --lora ADAPTER.gguf --base-gguf BASE.gguf`")
    miss = closest_miss(result.fits, result.budget) if result.budget is not None and not config.lora_only else None
    if miss:
        raise UserError(f"--fit: {miss}")
    return 0 if result.passed else 1


def run(args: argparse.Namespace) -> int:
    from lowrank.export.gguf import ExportConfig
    from lowrank.tiny import resolve_model_name

    config = build_config(ExportConfig, args)
    model_dir = Path(resolve_model_name(args.model_dir))
    if config.name is None and not args.adapter_dirs and str(model_dir) != args.model_dir:
        config.name = args.model_dir  # `lowrank export tiny` -> tiny-f16.gguf, not the cache dir's hash
    code = export_and_report(config, model_dir, args.adapter_dirs, base_name=Path(args.model_dir).name)
    if config.lora_only:
        print(f"run with llama.cpp on a GGUF of {args.model_dir}: Llama(model_path=BASE.gguf, lora_path=ADAPTER.gguf); "
              "check with `lowrank verify MERGED.gguf MERGED_DIR --lora ADAPTER.gguf --base-gguf BASE.gguf`")
    return code
