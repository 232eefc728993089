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
    parser.add_argument("--stage", default="sft", choices=["sft", "reward", "ppo", "grpo", "dpo"],
                        help="training stage")
    parser.add_argument("--quant", default="auto", choices=["auto", "nf4", "int8", "none"],
                        help="base weights (auto: nf4, what the training stages take on CUDA)")
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
                        help="default: the stage's (on for sft, reward and dpo, off for ppo and grpo)")
    parser.add_argument("--gpu-memory", default="24GiB",
                        help="the card: 24GB is 10^9 bytes, 24GiB 2^30 (default 24GiB, an RTX 4090)")
    parser.add_argument("--gpus", type=int, default=1,
                        help="cards an FSDP run (recipes/accelerate/fsdp-qlora.yaml, sft) shards weights, adapters "
                             "and optimizer state over; the plan is each card's")
    ppo = parser.add_argument_group("ppo and grpo")
    ppo.add_argument("--rollout-batch", type=int, default=8, help="PPO: prompts per step")
    ppo.add_argument("--minibatch", "--minibatch-size", dest="minibatch", type=int, default=None,
                     help="PPO: rollouts per update (default 4); GRPO: completions per optimizer step (default: all "
                          "of a step's)")
    ppo.add_argument("--prompt-length", type=int, default=256, help="tokens of the longest prompt")
    ppo.add_argument("--new-tokens", "--max-new-tokens", dest="new_tokens", type=int, default=256,
                     help="response length limit")
    ppo.add_argument("--reference-adapter", action=argparse.BooleanOptionalAction, default=True,
                     help="the reference is a frozen copy of the SFT adapter (off: the bare base; also dpo)")
    ppo.add_argument("--fast-rollout", default="off", choices=["off", "merged", "merged-graphs"],
                     help="count the merged copy of the model that --fast-rollout samples from")
    grpo = parser.add_argument_group("grpo")
    grpo.add_argument("--group-size", type=int, default=8, help="completions sampled per prompt")
    grpo.add_argument("--prompts-per-step", type=int, default=4, help="prompts per step")
    grpo.add_argument("--reward-adapter", action=argparse.BooleanOptionalAction, default=False,
                      help="a reward adapter scores the completions (default: reward functions only)")
    dpo = parser.add_argument_group("grpo and dpo")
    dpo.add_argument("--micro-batch-size", type=int, default=None,
                     help="GRPO: completions per forward/backward (default: the minibatch); DPO: pairs per "
                          "forward/backward, two rows of --max-length each (default 2)")
    dpo.add_argument("--batch-size", type=int, default=8, help="DPO: pairs per optimizer step")


def run(args: argparse.Namespace) -> int:
    from lowrank.plan import GiB, estimate, format_plan, largest_tokens_per_step

    card = parse_memory(args.gpu_memory)
    if not args.model:
        raise UserError("no model: give --model (a named shape such as llama2-7b, a model dir or a hub id)")
    for name in ("tokens_per_step", "micro_batch_tokens", "max_length", "rollout_batch", "minibatch",
                 "prompt_length", "new_tokens", "group_size", "prompts_per_step", "micro_batch_size", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    settings = dict(stage=args.stage, quant=args.quant, lora_r=args.lora_r, target_modules=[args.target_modules],
                    lora_dropout=args.lora_dropout, max_length=args.max_length, optim_bits=args.optim_bits,
                    gradient_checkpointing=args.gradient_checkpointing, ppo_rollout_batch=args.rollout_batch,
                    ppo_minibatch=args.minibatch or 4, ppo_prompt_len=args.prompt_length,
                    ppo_new_tokens=args.new_tokens, ppo_reference_adapter=args.reference_adapter,
                    reference_adapter=args.reference_adapter, grpo_group_size=args.group_size,
                    grpo_prompts_per_step=args.prompts_per_step, grpo_minibatch=args.minibatch,
                    grpo_micro_batch=args.micro_batch_size, grpo_reward_adapter=args.reward_adapter,
                    fast_rollout=args.fast_rollout, gpus=args.gpus)
    tokens_per_step, micro_tokens = args.tokens_per_step, args.micro_batch_tokens
    if args.stage == "dpo":  # pairs: a chosen and a rejected row of --max-length each
        pairs = args.micro_batch_size or 2
        if args.batch_size % pairs:
            raise UserError(f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size {pairs}")
        micro_tokens = micro_tokens or 2 * pairs * args.max_length
        tokens_per_step = tokens_per_step or 2 * args.batch_size * args.max_length
    plan = estimate(args.model, tokens_per_step=tokens_per_step, tokens_per_micro_batch=micro_tokens, **settings)
    print(format_plan(plan, card))
    largest = largest_tokens_per_step(args.model, card, **settings)
    unit = args.prompt_length + args.new_tokens
    if args.stage == "ppo":
        fitting = f"{largest // unit} rollouts per minibatch" if largest else "none: not one rollout per minibatch"
    elif args.stage == "grpo":
        fitting = (f"{largest // unit} completions per micro-batch" if largest
                   else "none: not one completion per micro-batch")
    elif args.stage == "dpo":
        fitting = (f"{largest // (2 * args.max_length)} pairs per micro-batch ({largest // args.max_length} rows "
                   f"of {args.max_length})" if largest else f"none: not one pair of {args.max_length}-token rows")
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
        elif args.stage == "grpo":
            one, what = estimate(args.model, **{**settings, "grpo_micro_batch": 1}), "one completion per micro-batch"
        elif args.stage == "dpo":
            one, what = estimate(args.model, tokens_per_micro_batch=2 * args.max_length, **settings), "one pair"
        else:
            one, what = estimate(args.model, tokens_per_micro_batch=args.max_length, **settings), "one row"
        smallest = f"; {what} needs {one.needed / GiB:.1f} GiB"
        if args.stage == "grpo" and one.phase == "generation":
            smallest += " (in generation: lower --group-size, --prompts-per-step or --new-tokens)"
    print(f"does not fit: needs {plan.needed / GiB:.1f} GiB of {card / GiB:.1f} GiB{smallest}")
    return 1
