"""`lowrank grpo`: optimise the SFT policy with GRPO against reward functions and/or a reward adapter."""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    from lowrank.config import add_dataclass_arguments
    from lowrank.grpo import GRPOConfig

    add_dataclass_arguments(parser, GRPOConfig)


def run(args: argparse.Namespace) -> int:
    from lowrank.cli.progress import reporting_process, sample_line, train_with_bar
    from lowrank.config import build_config
    from lowrank.grpo import GRPOConfig, train_grpo

    config = build_config(GRPOConfig, args)

    def show(record: dict) -> dict:
        return {"reward": f"{record['reward']:.3f}", "kl": f"{record['kl']:.3f}", "ent": f"{record['entropy']:.2f}",
                "clip": f"{record['clip_fraction']:.2f}", "len": f"{record['response_length']:.1f}"}

    out_dir = train_with_bar("grpo", lambda on_step: train_grpo(config, on_step=on_step), show,
                             lambda record: sample_line(record, "reward"))
    if reporting_process():
        print(f"policy adapter written to {out_dir}")
    return 0
