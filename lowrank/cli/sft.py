"""`lowrank sft`: supervised fine-tuning of a LoRA adapter (by default QLoRA on nf4 with CUDA, unquantized on a CPU)."""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    from lowrank.config import add_dataclass_arguments
    from lowrank.sft import SFTConfig

    add_dataclass_arguments(parser, SFTConfig)


def run(args: argparse.Namespace) -> int:
    import warnings

    from lowrank.cli.progress import print_held_out_loss, reporting_process, train_with_loss_bar
    from lowrank.config import build_config
    from lowrank.sft import SFTConfig, train_sft

    # bitsandbytes warns once per int8 matmul on the CPU that it casts fp32 inputs to fp16.
    warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")
    config = build_config(SFTConfig, args)
    out_dir = train_with_loss_bar("sft", lambda on_step: train_sft(config, on_step=on_step))
    if not reporting_process():
        return 0
    print_held_out_loss(out_dir)
    print(f"adapter written to {out_dir}")
    return 0
