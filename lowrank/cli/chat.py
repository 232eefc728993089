"""`lowrank chat MODEL`: chat in the terminal with a GGUF file, an adapter dir or a model dir."""

from __future__ import annotations

import argparse
import logging
import sys

from lowrank.config import add_dataclass_arguments, build_config


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that say how to load a model; shared with `lowrank app`."""
    parser.add_argument("--base", default=None,
                        help="base model of an adapter (default: the one its lowrank.json names)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--ctx", type=int, default=None,
                        help="context size in tokens (default: 2048 or the model's training context if smaller)")
    parser.add_argument("--device", default=None, help="device for adapters: cuda or cpu (default: cuda if there is one)")


def check_model_arguments(args: argparse.Namespace) -> None:
    """Refuse a context or thread count below 1 before anything loads."""
    from lowrank.errors import UserError

    for name in ("ctx", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")


def register(parser: argparse.ArgumentParser) -> None:
    from lowrank.apps.backends import SamplingConfig

    parser.add_argument("model", metavar="MODEL", help="a .gguf file, an adapter dir, or a Hugging Face model dir")
    parser.add_argument("--system", default=None, help="system prompt")
    add_model_arguments(parser)
    add_dataclass_arguments(parser, SamplingConfig)


def run(args: argparse.Namespace) -> int:
    from lowrank.apps.backends import SamplingConfig
    from lowrank.apps.loading import load_backend
    from lowrank.apps.chat import chat_loop

    sampling = build_config(SamplingConfig, args)
    check_model_arguments(args)
    if not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)  # keep log lines out of the conversation
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    print(f"loading {args.model} ...", flush=True)
    backend = load_backend(args.model, base=args.base, n_ctx=args.ctx, n_threads=args.threads, device=args.device)
    try:
        return chat_loop(backend, sampling, system=args.system, out=sys.stdout)
    finally:
        backend.close()
