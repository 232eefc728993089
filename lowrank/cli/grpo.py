"""`lowrank grpo`: optimise the SFT policy with GRPO against reward functions and/or a reward adapter."""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    from lowrank.config import add_dataclass_arguments
    from lowrank.grpo import GRPOConfig

    add_dataclass_arguments(parser, GRPOConfig)


def run(args: argparse.Namespace) -> int:
    from lowrank.cli.progress import StepBar
    from lowrank.config import build_config
    from lowrank.grpo import GRPOConfig, train_grpo

    config = build_config(GRPOConfig, args)
    bar = StepBar("grpo")

    def on_step(record: dict) -> None:
        bar(record, reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.3f}", ent=f"{record['entropy']:.2f}",
            clip=f"{record['clip_fraction']:.2f}", len=f"{record['response_length']:.1f}")
        if record.get("samples"):
            sample = record["samples"][0]
            bar.write(f"step {record['step']}: {sample['response']!r} (reward {sample['reward']:.3f})")

    with bar:
        out_dir = train_grpo(config, on_step=on_step)
    print(f"policy adapter written to {out_dir}")
    return 0
