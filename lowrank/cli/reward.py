"""`lowrank reward`: train a reward adapter (LoRA + score head) on preference pairs."""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    from lowrank.config import add_dataclass_arguments
    from lowrank.reward import RewardConfig

    add_dataclass_arguments(parser, RewardConfig)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lowrank.config import build_config
    from lowrank.reward import RewardConfig, train_reward

    config = build_config(RewardConfig, args)
    bar = None
    shown: dict[str, str] = {}

    def on_step(record: dict) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=record["max_steps"], desc="reward", unit="step")
        shown["loss"] = f"{record['loss']:.3f}"
        if "eval_accuracy" in record:  # held-out numbers stay shown until the next evaluation
            shown["acc"] = f"{record['eval_accuracy']:.2f}"
            shown["margin"] = f"{record['eval_margin']:.2f}"
        bar.set_postfix(shown, refresh=False)
        bar.update(1)

    try:
        out_dir = train_reward(config, on_step=on_step)
    finally:
        if bar is not None:
            bar.close()
    print(f"reward adapter written to {out_dir}")
    return 0
