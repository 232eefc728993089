"""`lowrank pairs`: preference pairs from the SFT policy's own answers, ranked by reward functions."""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    from lowrank.config import add_dataclass_arguments
    from lowrank.pairs import PairsConfig

    add_dataclass_arguments(parser, PairsConfig)


def run(args: argparse.Namespace) -> int:
    from lowrank import runrecord
    from lowrank.cli.progress import StepBar
    from lowrank.config import build_config
    from lowrank.pairs import PAIRS_FILE, PairsConfig, make_pairs

    config = build_config(PairsConfig, args)
    bar = StepBar("pairs", unit="batch")
    with bar:
        out_dir = make_pairs(config, on_batch=lambda record: bar(record, pairs=str(record["pairs"])))
    counts = runrecord.read(out_dir).metrics
    print(f"{counts['pairs']} pairs from {counts['prompts']} prompts ({counts['rejected_from_policy']} rejected "
          f"answers are the policy's own; mean sample reward {counts['mean_sample_reward']:.3f}) written to "
          f"{out_dir / PAIRS_FILE}")
    return 0
