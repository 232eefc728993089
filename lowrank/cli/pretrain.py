"""`lowrank pretrain`: full-parameter training of a small base on plain text (no LoRA)."""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    from lowrank.config import add_dataclass_arguments
    from lowrank.pretrain import PretrainConfig

    add_dataclass_arguments(parser, PretrainConfig)


def run(args: argparse.Namespace) -> int:
    from lowrank.cli.progress import print_held_out_loss, train_with_loss_bar
    from lowrank.config import build_config
    from lowrank.pretrain import PretrainConfig, train_base

    config = build_config(PretrainConfig, args)
    out_dir = train_with_loss_bar("pretrain", lambda on_step: train_base(config, on_step=on_step))
    print_held_out_loss(out_dir)
    print(f"model written to {out_dir}")
    return 0
