"""`lowrank ppo`: optimise the SFT policy against a reward adapter with PPO, on one shared base."""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    from lowrank.config import add_dataclass_arguments
    from lowrank.ppo import PPOConfig

    add_dataclass_arguments(parser, PPOConfig)


def run(args: argparse.Namespace) -> int:
    from lowrank.cli.progress import StepBar
    from lowrank.config import build_config
    from lowrank.ppo import PPOConfig, train_ppo

    config = build_config(PPOConfig, args)
    bar = StepBar("ppo")

    def on_step(record: dict) -> None:
        bar(record, score=f"{record['score']:.3f}", kl=f"{record['kl']:.3f}", ent=f"{record['entropy']:.2f}",
            clip=f"{record['clip_fraction']:.2f}", vloss=f"{record['value_loss']:.3f}",
            len=f"{record['response_length']:.1f}")
        if record.get("samples"):
            bar.write(f"step {record['step']}: {record['samples'][0]['response']!r} "
                      f"(score {record['samples'][0]['score']:.3f})")

    with bar:
        out_dir = train_ppo(config, on_step=on_step)
    print(f"policy adapter written to {out_dir}")
    return 0
