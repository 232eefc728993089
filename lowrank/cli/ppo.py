"""`lowrank ppo`: optimise the SFT policy against a reward adapter with PPO, on one shared base."""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    from lowrank.config import add_dataclass_arguments
    from lowrank.ppo import PPOConfig

    add_dataclass_arguments(parser, PPOConfig)


def run(args: argparse.Namespace) -> int:
    from lowrank.cli.progress import reporting_process, sample_line, train_with_bar
    from lowrank.config import build_config
    from lowrank.ppo import PPOConfig, train_ppo

    config = build_config(PPOConfig, args)

    def show(record: dict) -> dict:
        return {"score": f"{record['score']:.3f}", "kl": f"{record['kl']:.3f}", "ent": f"{record['entropy']:.2f}",
                "clip": f"{record['clip_fraction']:.2f}", "vloss": f"{record['value_loss']:.3f}",
                "len": f"{record['response_length']:.1f}"}

    out_dir = train_with_bar("ppo", lambda on_step: train_ppo(config, on_step=on_step), show,
                             lambda record: sample_line(record, "score"))
    if reporting_process():
        print(f"policy adapter written to {out_dir}")
    return 0
