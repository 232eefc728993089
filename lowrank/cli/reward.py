"""`lowrank reward`: train a reward adapter (LoRA + score head) on preference pairs."""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    from lowrank.config import add_dataclass_arguments
    from lowrank.reward import RewardConfig

    add_dataclass_arguments(parser, RewardConfig)


def run(args: argparse.Namespace) -> int:
    from lowrank import runrecord
    from lowrank.cli.progress import reporting_process, train_with_bar
    from lowrank.config import build_config
    from lowrank.reward import RewardConfig, train_reward

    config = build_config(RewardConfig, args)

    def show(record: dict) -> dict:
        held_out = ({"acc": f"{record['eval_accuracy']:.2f}", "margin": f"{record['eval_margin']:.2f}"}
                    if "eval_accuracy" in record else {})
        return {"loss": f"{record['loss']:.3f}", **held_out}

    out_dir = train_with_bar("reward", lambda on_step: train_reward(config, on_step=on_step), show)
    if not reporting_process():
        return 0
    metrics = runrecord.read(out_dir).metrics
    if "eval_accuracy" in metrics:  # none without held-out pairs (--eval-fraction 0)
        print(f"held-out pairwise accuracy {metrics['eval_accuracy']:.3f}, margin {metrics['eval_margin']:.4f}")
    print(f"reward adapter written to {out_dir}")
    return 0
