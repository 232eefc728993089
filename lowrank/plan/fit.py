"""What `lowrank plan` shows of a plan: its breakdown as a table, and the largest micro-batch a card fits."""

from __future__ import annotations

from lowrank.plan.estimates import DEFAULT_CARD_BYTES, GiB, Plan, estimate
from lowrank.plan.structure import as_architecture


def largest_tokens_per_step(model, card_bytes: int = DEFAULT_CARD_BYTES, **settings) -> int:
    """The most tokens per micro-batch that fit ``card_bytes``: whole rows of ``max_length`` (DPO: whole
    pairs of rows; PPO: whole rollouts per minibatch, at most the rollout batch; GRPO: whole
    completions per micro-batch, a divisor of the minibatch); 0 when not even one fits.

    Rule: memory depends on the micro-batch only, so with gradient accumulation a step of any size
    runs at this micro-batch; without accumulation it is also the largest step.
    """
    arch = as_architecture(model)
    stage = settings.get("stage", "sft")
    if stage in ("ppo", "grpo"):
        unit = settings.get("ppo_prompt_len", 256) + settings.get("ppo_new_tokens", 256)
        if stage == "ppo":
            batch = settings.get("ppo_rollout_batch", 8)
            return unit * _largest(lambda n: estimate(arch, **{**settings, "ppo_minibatch": n}).fits(card_bytes),
                                   batch)
        # GRPO: micro-batches must divide the minibatch (grpo.check_config); generation does not depend on them.
        minibatch = estimate(arch, **settings).settings["minibatch"]
        fitting = (n for n in range(minibatch, 0, -1) if minibatch % n == 0
                   and estimate(arch, **{**settings, "grpo_micro_batch": n}).fits(card_bytes))
        return unit * next(fitting, 0)
    max_length = settings.get("max_length", 1024)
    rest = {k: v for k, v in settings.items() if k not in ("tokens_per_step", "tokens_per_micro_batch")}
    row = 2 if stage == "dpo" else 1  # a DPO pair's chosen and rejected rows go into one micro-batch
    return row * max_length * _largest(
        lambda n: estimate(arch, **rest, tokens_per_micro_batch=n * row * max_length).fits(card_bytes), 1 << 20)


def _largest(fits, limit: int) -> int:
    """The largest n in [1, limit] with fits(n), for a monotone fits; 0 when fits(1) is false."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def format_plan(plan: Plan, card_bytes: int = DEFAULT_CARD_BYTES) -> str:
    """The breakdown as a small table in GiB, the totals, and whether it fits the card."""
    s = plan.settings
    if plan.stage == "ppo":
        what = (f"{s['rollout_batch']} rollouts of {s['prompt_len']} prompt + {s['new_tokens']} new tokens, "
                f"minibatch {s['minibatch']}")
    elif plan.stage == "grpo":
        plural = "s" if s["prompts_per_step"] > 1 else ""
        what = (f"{s['prompts_per_step']} prompt{plural} x {s['group_size']} completions of {s['prompt_len']} "
                f"prompt + {s['new_tokens']} new tokens, micro-batch {s['micro_batch']} of minibatch {s['minibatch']}"
                f"{', reward adapter' if s['reward_adapter'] else ''}")
    else:
        what = f"{s['tokens_per_micro_batch']} tokens per micro-batch ({s['rows']} x {s['max_length']})"
        if plan.stage == "dpo":
            what = f"{s['pairs']} pairs per micro-batch ({s['rows']} rows of {s['max_length']}: chosen, rejected)"
        if s["accumulation"] > 1:
            what += f", {s['accumulation']} per step"
    if s.get("gpus", 1) > 1:
        what += f"; each of {s['gpus']} GPUs (FSDP)"
    lines = [f"{plan.model}, {plan.stage}, {s['quant']}, LoRA r {s['lora_r']}, {what}, gradient checkpointing "
             f"{'on' if s['gradient_checkpointing'] else 'off'}; peak in: {plan.phase}"]
    width = max(len(k) for k in [*plan.breakdown, *plan.outside, "peak allocated (max_memory_allocated)"]) + 2

    def row(name, value):
        lines.append(f"  {name:<{width}}{value / GiB:7.2f} GiB")
    for name, value in plan.breakdown.items():
        row(name, value)
    row("peak allocated (max_memory_allocated)", plan.total)
    for name, value in plan.outside.items():
        row(f"+ {name}", value)
    row("needed on the card", plan.needed)
    row("card", card_bytes)
    if len(plan.phases) > 1:  # each phase's peak allocated, so the next largest is in view
        lines.append("peak allocated by phase: " + ", ".join(f"{name} {total / GiB:.2f} GiB"
                                                              for name, total in plan.phases.items()))
    lines.append(f"fits: {'yes' if plan.fits(card_bytes) else 'no'}")
    return "\n".join(lines)
