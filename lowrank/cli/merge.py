"""`lowrank merge`: base + adapters (applied in order) -> a merged Hugging Face dir, streamed shard by shard."""

from __future__ import annotations

import argparse

from lowrank.config import add_dataclass_arguments, build_config


def register(parser: argparse.ArgumentParser) -> None:
    from lowrank.quantize.merge import MergeConfig

    parser.add_argument("--base", required=True, help="base model dir the adapters were trained on (or `tiny`)")
    parser.add_argument("--adapter", dest="adapter_dirs", action="append", required=True, metavar="DIR",
                        help="adapter dir; repeat to apply several, in the order given")
    parser.add_argument("--out", required=True, help="output dir (written to a temporary name, renamed when complete)")
    add_dataclass_arguments(parser, MergeConfig)


def run(args: argparse.Namespace) -> int:
    from lowrank.cli.progress import StepBar
    from lowrank.quantize.merge import MergeConfig, merge

    config = build_config(MergeConfig, args, base=args.base, adapters=args.adapter_dirs, out=args.out)
    bar = StepBar("merge", unit="shard", total_key="total")
    with bar:
        out = merge(config, on_shard=bar)
    print(out)
    return 0
