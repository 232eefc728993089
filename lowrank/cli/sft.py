"""`lowrank sft`: supervised fine-tuning of a LoRA adapter (QLoRA on nf4 by default)."""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    from lowrank.config import add_dataclass_arguments
    from lowrank.sft import SFTConfig

    add_dataclass_arguments(parser, SFTConfig)


def run(args: argparse.Namespace) -> int:
    import warnings

    from lowrank.cli.progress import StepBar
    from lowrank.config import build_config
    from lowrank.sft import SFTConfig, train_sft

    # bitsandbytes warns once per int8 matmul on the CPU that it casts fp32 inputs to fp16.
    warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")
    config = build_config(SFTConfig, args)
    bar = StepBar("sft")

    def on_step(record: dict) -> None:
        held_out = {"eval": f"{record['eval_loss']:.3f}"} if "eval_loss" in record else {}
        bar(record, loss=f"{record['loss']:.3f}", **{"tok/s": f"{record['tokens_per_second']:.0f}"}, **held_out)

    with bar:
        out_dir = train_sft(config, on_step=on_step)
    import json
    import os

    if int(os.environ.get("RANK", "0")) != 0:  # under `accelerate launch`, one process reports
        return 0
    metrics = json.loads((out_dir / "lowrank.json").read_text()).get("metrics", {})
    if metrics.get("initial_eval_loss") is not None and metrics.get("eval_loss") is not None:
        print(f"held-out loss {metrics['initial_eval_loss']:.4f} -> {metrics['eval_loss']:.4f}")
    print(f"adapter written to {out_dir}")
    return 0
