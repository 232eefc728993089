"""`lowrank pretrain`: full-parameter training of a small base on plain text (no LoRA)."""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    from lowrank.config import add_dataclass_arguments
    from lowrank.pretrain import PretrainConfig

    add_dataclass_arguments(parser, PretrainConfig)


def run(args: argparse.Namespace) -> int:
    import json

    from lowrank.cli.progress import StepBar
    from lowrank.config import build_config
    from lowrank.pretrain import PretrainConfig, train_base

    config = build_config(PretrainConfig, args)
    bar = StepBar("pretrain")

    def on_step(record: dict) -> None:
        held_out = {"eval": f"{record['eval_loss']:.3f}"} if "eval_loss" in record else {}
        bar(record, loss=f"{record['loss']:.3f}", **{"tok/s": f"{record['tokens_per_second']:.0f}"}, **held_out)

    with bar:
        out_dir = train_base(config, on_step=on_step)
    metrics = json.loads((out_dir / "lowrank.json").read_text()).get("metrics", {})
    if metrics.get("initial_eval_loss") is not None and metrics.get("eval_loss") is not None:
        print(f"held-out loss {metrics['initial_eval_loss']:.4f} -> {metrics['eval_loss']:.4f}")
    print(f"model written to {out_dir}")
    return 0
