"""`lowrank app --models-dir DIR`: a Gradio chat page over the GGUF files and adapters in DIR."""

from __future__ import annotations

import argparse
from pathlib import Path

from lowrank.config import add_dataclass_arguments, build_config


def register(parser: argparse.ArgumentParser) -> None:
    from lowrank.apps.app import AppConfig
    from lowrank.cli.chat import add_model_arguments

    add_dataclass_arguments(parser, AppConfig)
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from lowrank.apps.app import AppConfig, ModelPool, build_app, parse_auth
    from lowrank.errors import UserError

    config = build_config(AppConfig, args)
    auth = parse_auth(config.auth)
    if not Path(config.models_dir).is_dir():
        raise UserError(f"--models-dir {config.models_dir}: not a directory")
    pool = ModelPool(config.models_dir, keep=config.keep_loaded, base=args.base, n_ctx=args.ctx,
                     n_threads=args.threads, device=args.device)
    names = pool.choices()
    print(f"{len(names)} model(s) under {pool.models_dir}: {', '.join(names) or 'none (add some and press Rescan)'}")
    demo = build_app(pool, queue_size=config.queue_size)
    if config.host not in ("127.0.0.1", "localhost", "::1") and not auth:
        print(f"warning: serving on {config.host} without --auth: anyone on your network can use it")
    demo.launch(server_name=config.host, server_port=config.port, auth=auth, share=config.share,
                show_error=True, quiet=False)
    return 0
