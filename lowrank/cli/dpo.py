"""`lowrank dpo`: optimise the SFT policy on preference pairs with DPO, IPO, SimPO or ORPO (no reward model)."""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    from lowrank.config import add_dataclass_arguments
    from lowrank.dpo import DPOConfig

    add_dataclass_arguments(parser, DPOConfig)


def run(args: argparse.Namespace) -> int:
    from lowrank import runrecord
    from lowrank.cli.progress import reporting_process, train_with_bar
    from lowrank.config import build_config
    from lowrank.dpo import DPOConfig, train_dpo

    config = build_config(DPOConfig, args)

    def show(record: dict) -> dict:
        held_out = ({"eval_acc": f"{record['eval_accuracy']:.2f}", "eval_margin": f"{record['eval_margin']:.3f}"}
                    if "eval_accuracy" in record else {})
        return {"loss": f"{record['loss']:.4f}", "margin": f"{record['margin']:.3f}",
                "acc": f"{record['accuracy']:.2f}", **held_out}

    out_dir = train_with_bar(config.loss if config.loss != "sigmoid" else "dpo",
                             lambda on_step: train_dpo(config, on_step=on_step), show)
    if not reporting_process():
        return 0
    metrics = runrecord.read(out_dir).metrics
    if "initial_eval_accuracy" in metrics:
        print(f"held-out pairwise accuracy {metrics['initial_eval_accuracy']:.3f} -> {metrics['eval_accuracy']:.3f}, "
              f"margin {metrics['initial_eval_margin']:.4f} -> {metrics['eval_margin']:.4f}")
    print(f"policy adapter written to {out_dir}")
    return 0
