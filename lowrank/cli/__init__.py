"""The `lowrank` command: parses flags, sets up logging, and turns UserError into one line.

Each subcommand lives in its own module under lowrank/cli/ with two functions:
``register(subparsers)`` adds its parser and ``run(args) -> int`` does the work.
Modules are imported lazily so `lowrank --help` stays fast and a missing optional
dependency of one command does not break the others.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
import warnings

from lowrank.errors import UserError

# What `lowrank --help` says the tool is for (the docstring above is about this module).
DESCRIPTION = ("Fine-tune LLaMA-class models with LoRA or QLoRA (SFT, reward model, PPO, GRPO, DPO) on one GPU "
               "or a CPU, merge the adapters, export GGUF files for llama.cpp, and chat with the result.")

# subcommand name -> (module, one-line help). Order is the pipeline's order.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("lowrank.cli.pipeline", "run a recipe: every stage (task, pretrain, SFT, reward, PPO, merge, export, verify), each skipped when finished"),
    "pretrain": ("lowrank.cli.pretrain", "train every weight of a small base on plain text (no LoRA)"),
    "plan": ("lowrank.cli.plan", "predict a training run's peak GPU memory and the largest micro-batch that fits"),
    "sft": ("lowrank.cli.sft", "supervised fine-tuning of a LoRA adapter"),
    "pairs": ("lowrank.cli.pairs", "preference pairs from the SFT policy's own answers, ranked by reward functions (a checker)"),
    "reward": ("lowrank.cli.reward", "train a reward model (LoRA + score head) on preference pairs"),
    "score": ("lowrank.cli.score", "print reward scores of prompt/response pairs"),
    "ppo": ("lowrank.cli.ppo", "optimise the SFT policy against the reward model with PPO"),
    "grpo": ("lowrank.cli.grpo", "optimise the SFT policy with GRPO: groups of samples scored by reward functions or a reward adapter"),
    "dpo": ("lowrank.cli.dpo", "optimise the SFT policy on preference pairs with DPO, IPO, SimPO or ORPO (no reward model)"),
    "merge": ("lowrank.cli.merge", "merge adapters into the base and write a Hugging Face dir"),
    "export": ("lowrank.cli.export", "write GGUF files for llama.cpp"),
    "verify": ("lowrank.cli.verify", "check a GGUF file against the Hugging Face model it came from"),
    "chat": ("lowrank.cli.chat", "chat in the terminal with a GGUF file or an adapter"),
    "app": ("lowrank.cli.app", "a Gradio chat page over GGUF files and adapters"),
}


def _load(name: str):
    return importlib.import_module(COMMANDS[name][0])


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowrank", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        module = _load(name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.register(p)
        p.set_defaults(_run=module.run)
    return parser


class _CurrentStderr(logging.StreamHandler):
    """A handler that writes to whatever sys.stderr is at the time (a caller may have swapped it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(verbose: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(isinstance(h, _CurrentStderr) for h in root.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:  # peft reads a transformers attribute that transformers 5 deprecates
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    # bitsandbytes warns on the CPU that an optional faster kernel package is missing.
    # Offline, the `kernels` package (which bitsandbytes asks for that kernel) warns that it skips a
    # Hub trust check: nothing a user can act on either.
    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)
    # transformers warns about things a user cannot act on (config defaults, deprecations) in the
    # middle of our output; -v shows them. The variable covers a transformers imported later.
    # Its per-file "Loading weights" bars would interleave with our own progress bars too.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info" if verbose else "error")
    if not verbose:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(logging.INFO if verbose else logging.ERROR)
        if not verbose:
            hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Only build the parser of the command asked for: importing torch for every
    # subcommand would make `lowrank chat --help` take seconds.
    only = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    _setup_logging(args.verbose)
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"lowrank {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lowrank {args.command}: interrupted; {_how_to_continue(args)}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`lowrank plan | head`): stop quietly, as cat does. Output still
        # buffered would raise again when Python flushes at exit, so it goes to /dev/null.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (tests)
            pass
        return 141  # 128 + SIGPIPE, the status a shell gives a command the pipe closed on
    except OSError as e:
        message = _disk_error(e)
        if message is None:
            raise
        print(f"lowrank {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        from lowrank import locks

        locks.release_all()


_DISK_ERRORS = {errno.ENOSPC: "the disk is full; free some space and run again (an interrupted training run "
                              "keeps its last complete checkpoint: add --resume)",
                errno.EDQUOT: "the disk quota is used up; free some space and run again",
                errno.EROFS: "the file system is read-only; choose another output dir",
                errno.EACCES: "permission denied; choose an output dir you can write",
                errno.EPERM: "operation not permitted; choose an output dir you can write"}


def _disk_error(error: OSError) -> str | None:
    """One line for a write the machine refused (full disk, read-only or foreign dir), naming the file."""
    advice = _DISK_ERRORS.get(error.errno)
    if advice is None:
        return None
    return f"{error.filename or 'a file'}: {advice}"


def _how_to_continue(args) -> str:
    """What an interrupted command leaves behind, and the command that continues it."""
    if args.command == "run":
        return "run the same command again: finished stages are skipped and training resumes from its checkpoints"
    if not hasattr(args, "resume"):
        return "nothing was finished; run the command again"
    out_dir = getattr(args, "output_dir", None)
    if out_dir is None:  # given in a --config file
        return "add --resume to the same command to continue from its newest checkpoint (--save-every writes them)"
    from lowrank.checkpoints import list_checkpoints

    steps = list_checkpoints(out_dir)
    if not steps:
        return f"no checkpoint was written in {out_dir} (--save-every N writes them); run again with --overwrite"
    return f"add --resume to the same command to continue from step {steps[-1]} ({out_dir})"


if __name__ == "__main__":
    sys.exit(main())
