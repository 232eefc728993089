"""`lowrank ppo`: optimise the SFT policy against a reward adapter with PPO, on one shared base."""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    from lowrank.config import add_dataclass_arguments
    from lowrank.ppo import PPOConfig

    add_dataclass_arguments(parser, PPOConfig)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lowrank.config import build_config
    from lowrank.ppo import PPOConfig, train_ppo

    config = build_config(PPOConfig, args)
    bar = None

    def on_step(record: dict) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=record["max_steps"], initial=record["step"] - 1, desc="ppo", unit="step")
        bar.set_postfix({"score": f"{record['score']:.3f}", "kl": f"{record['kl']:.3f}",
                         "ent": f"{record['entropy']:.2f}", "clip": f"{record['clip_fraction']:.2f}",
                         "vloss": f"{record['value_loss']:.3f}", "len": f"{record['response_length']:.1f}"},
                        refresh=False)
        bar.update(1)
        if record.get("samples"):
            bar.write(f"step {record['step']}: {record['samples'][0]['response']!r} "
                      f"(score {record['samples'][0]['score']:.3f})")

    try:
        out_dir = train_ppo(config, on_step=on_step)
    finally:
        if bar is not None:
            bar.close()
    print(f"policy adapter written to {out_dir}")
    return 0
