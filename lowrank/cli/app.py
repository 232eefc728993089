"""`lowrank app --models-dir DIR`: a Gradio chat page over the GGUF files and adapters in DIR."""

from __future__ import annotations

import argparse
from pathlib import Path

from lowrank.config import add_dataclass_arguments, build_config


def register(parser: argparse.ArgumentParser) -> None:
    from lowrank.apps.app import AUTH_ENV, AppConfig
    from lowrank.cli.chat import add_model_arguments

    add_dataclass_arguments(parser, AppConfig)
    # --auth takes no value: a password in argv is visible to every user in `ps`. A value given anyway is
    # caught in run() and refused without echoing it.
    parser.add_argument("--auth", dest="auth", nargs="?", const=True, default=None,
                        help=f"require a login, read from --auth-file or {AUTH_ENV}")
    parser.add_argument("--no-auth", dest="auth", action="store_false",
                        help="serve a --host other than loopback (or --share) without a login; the page says so")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from lowrank.apps.app import AUTH_ENV, AppConfig, ModelPool, build_app, resolve_auth
    from lowrank.errors import UserError

    if isinstance(args.auth, str):
        raise UserError(f"--auth takes no value: a password in the command line is visible to every user in `ps`; "
                        f"put user:pass in a file given with --auth-file, or in the {AUTH_ENV} environment variable")
    from lowrank.cli.chat import check_model_arguments

    config = build_config(AppConfig, args)
    check_model_arguments(args)
    auth, notice = resolve_auth(config)
    if not Path(config.models_dir).is_dir():
        raise UserError(f"--models-dir {config.models_dir}: not a directory")
    pool = ModelPool(config.models_dir, keep=config.keep_loaded, base=args.base, n_ctx=args.ctx,
                     n_threads=args.threads, device=args.device)
    names = pool.choices()
    print(f"{len(names)} model(s) under {pool.models_dir}: {', '.join(names) or 'none (add some and press Rescan)'}")
    demo = build_app(pool, queue_size=config.queue_size, notice=notice)
    # show_error=False: an unexpected exception reaches the client as a bare "Error", not as its text
    # (which may carry the server's paths); the messages the page means to show are gr.Error.
    demo.launch(server_name=config.host, server_port=config.port, auth=auth, share=config.share,
                show_error=False, quiet=False)
    return 0
