"""`lowrank plan`: predict the peak GPU memory of a training run before it starts (no GPU needed).

Exit status: 0 when the run fits the card, 1 when it does not ("does not fit: needs X GiB of Y GiB"),
2 for bad input (an unknown shape, an unreadable config, a malformed --gpu-memory).
"""

from __future__ import annotations

import argparse

from lowrank.errors import UserError

def parse_memory(text: str) -> int:
    """Bytes of a card size such as "24GB" (10^9 bytes), "24GiB" (2^30) or "24" (GiB)."""
    from lowrank.config import parse_size

    return parse_size(text, "--gpu-memory", bare="GiB")


def register(parser: argparse.ArgumentParser) -> None:
    from lowrank.plan import SHAPES

    parser.add_argument("--model", default=None,
                        help=f"a named shape ({', '.join(SHAPES)}, tiny), a model dir or a hub id (config only)")
    parser.add_argument("--stage", default="sft", choices=["sft", "reward", "ppo"], help="training stage")
    parser.add_argument("--quant", default="nf4", choices=["nf4", "int8", "none"], help="base weights")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--target-modules", default="all-linear",
                        help="modules that get LoRA: all-linear or names such as q_proj,v_proj")
    parser.add_argument("--lora-dropout", type=float, default=None, help="LoRA dropout (default: the stage's)")
    parser.add_argument("--tokens-per-step", type=int, default=None,
                        help="tokens per optimizer step (default: one micro-batch)")
    parser.add_argument("--micro-batch-tokens", type=int, default=None,
                        help="tokens per micro-batch, rows x max length (default: --tokens-per-step, no accumulation)")
    parser.add_argument("--max-length", type=int, default=1024, help="tokens per row")
    parser.add_argument("--optim-bits", type=int, default=32, choices=[8, 32], help="paged AdamW state bits")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="default: the stage's (on for sft and reward, off for ppo)")
    parser.add_argument("--gpu-memory", default="24GiB",
                        help="the card: 24GB is 10^9 bytes, 24GiB 2^30 (default 24GiB, an RTX 4090)")
    ppo = parser.add_argument_group("ppo")
    ppo.add_argument("--rollout-batch", type=int, default=8, help="prompts per PPO step")
    ppo.add_argument("--minibatch", type=int, default=4, help="rollouts per PPO update")
    ppo.add_argument("--prompt-length", type=int, default=256, help="tokens of the longest prompt")
    ppo.add_argument("--new-tokens", type=int, default=256, help="response length limit")


def run(args: argparse.Namespace) -> int:
    from lowrank.plan import GiB, estimate, format_plan, largest_tokens_per_step

    card = parse_memory(args.gpu_memory)
    if not args.model:
        raise UserError("no model: give --model (a named shape such as llama2-7b, a model dir or a hub id)")
    for name in ("tokens_per_step", "micro_batch_tokens", "max_length", "rollout_batch", "minibatch",
                 "prompt_length", "new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    settings = dict(stage=args.stage, quant=args.quant, lora_r=args.lora_r, target_modules=[args.target_modules],
                    lora_dropout=args.lora_dropout, max_length=args.max_length, optim_bits=args.optim_bits,
                    gradient_checkpointing=args.gradient_checkpointing, ppo_rollout_batch=args.rollout_batch,
                    ppo_minibatch=args.minibatch, ppo_prompt_len=args.prompt_length, ppo_new_tokens=args.new_tokens)
    plan = estimate(args.model, tokens_per_step=args.tokens_per_step,
                    tokens_per_micro_batch=args.micro_batch_tokens, **settings)
    print(format_plan(plan, card))
    largest = largest_tokens_per_step(args.model, card, **settings)
    if args.stage == "ppo":
        unit = args.prompt_length + args.new_tokens
        fitting = f"{largest // unit} rollouts per minibatch" if largest else "none: not one rollout per minibatch"
    else:
        fitting = (f"{largest} tokens per micro-batch ({largest // args.max_length} rows of {args.max_length})"
                   if largest else f"none: not one row of {args.max_length} tokens")
    print(f"largest that fits: {fitting}")
    if plan.fits(card):
        return 0
    smallest = ""
    if not largest:  # not even the smallest micro-batch fits: say what it needs
        if args.stage == "ppo":
            one, what = estimate(args.model, **{**settings, "ppo_minibatch": 1}), "one rollout per minibatch"
        else:
            one, what = estimate(args.model, tokens_per_micro_batch=args.max_length, **settings), "one row"
        smallest = f"; {what} needs {one.needed / GiB:.1f} GiB"
    print(f"does not fit: needs {plan.needed / GiB:.1f} GiB of {card / GiB:.1f} GiB{smallest}")
    return 1
