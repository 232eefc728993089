"""The LoRA of a reward adapter: which linear layers get one (never the LM head or the score head),
taken from the SFT adapter's own config when the reward model starts from it, else fresh.

Cheap checks that need no model (``read_sft_lora_config``) run before the base loads; the SFT
weights are copied into the built adapter by lowrank/reward.py.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lowrank.errors import UserError
from lowrank.scoring import SCORE_HEAD
from lowrank.lm_loss import causal_lm

# Module names that must never get a LoRA: the LM head (tied to embeddings in some models) and our head.
_NOT_LORA_TARGETS = ("lm_head", SCORE_HEAD)


def linear_target_modules(model) -> list[str]:
    """Names (leaf) of the linear layers a LoRA should adapt: all of them but the LM head and score.

    peft's "all-linear" would also pick up our score head (a plain nn.Linear) and write it into
    target_modules; listing the names ourselves keeps adapter_config.json clean for merge/export.
    bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear, so quantized bases work too.
    """
    names = {name.rsplit(".", 1)[-1] for name, module in causal_lm(model).named_modules()
             if isinstance(module, nn.Linear) and name}
    return sorted(names - set(_NOT_LORA_TARGETS))


def is_excluded_target(name: str) -> bool:
    """True for a module name (leaf or dotted path) that a reward adapter must not give a LoRA."""
    return name.rsplit(".", 1)[-1] in _NOT_LORA_TARGETS


_ONLY_LM_HEAD = ("{}: its LoRA adapts only the LM head, which the reward model does not use; "
                 "give an SFT adapter with LoRA on the decoder layers, or none")


def read_sft_lora_config(sft_adapter: str | Path):
    """The LoraConfig of an SFT adapter dir; UserError when it is not one, or when its LoRA is on the LM
    head alone (nothing a reward adapter could start from). Cheap: call it before loading the model."""
    from peft import LoraConfig

    try:
        config = LoraConfig.from_pretrained(str(sft_adapter))
    except Exception as e:  # not JSON, not a LoRA config, unknown fields of another peft version
        raise UserError(f"{sft_adapter}/adapter_config.json: not a LoRA adapter config "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    targets = config.target_modules
    if isinstance(targets, (list, set, tuple)) and not [t for t in targets if not is_excluded_target(t)]:
        raise UserError(_ONLY_LM_HEAD.format(sft_adapter))
    return config


def reward_lora_config(model, *, r: int, alpha: int, dropout: float, sft_adapter: str | Path | None = None):
    """LoraConfig of a reward adapter: the SFT adapter's own (so its weights load) or a fresh one,
    with the score head in ``modules_to_save``.

    From an SFT adapter, the LM head is dropped from the LoRA targets (and any SFT
    ``modules_to_save`` with it): the score reads the last hidden state, before the LM head, so a
    LoRA there would do nothing for the reward. ``_load_sft_lora`` skips those weights, saying so.
    """
    import re

    if sft_adapter:  # "" (an empty flag or YAML value) is none, as in lowrank.reward
        config = read_sft_lora_config(sft_adapter)
        config.inference_mode = False
        targets = config.target_modules
        if targets == "all-linear":
            targets = linear_target_modules(model)
        elif isinstance(targets, str):  # a regex over full module names: resolve it, then drop the heads
            targets = sorted(name for name, _ in causal_lm(model).named_modules()
                             if name and re.fullmatch(targets, name) and not is_excluded_target(name))
        else:
            targets = sorted(t for t in targets if not is_excluded_target(t))
        if not targets:
            raise UserError(_ONLY_LM_HEAD.format(sft_adapter))
        config.target_modules = targets
        # Whole modules the SFT adapter trained (other than the LM head) stay trained modules here.
        kept = [m for m in (config.modules_to_save or []) if not is_excluded_target(m)]
    else:
        from lowrank.models import lora_config

        config = lora_config(r=r, alpha=alpha, dropout=dropout, target_modules=linear_target_modules(model))
        kept = []
    config.modules_to_save = [*kept, SCORE_HEAD]
    config.task_type = None  # a custom head: no peft task wrapper (it would expect AutoModelFor*)
    return config
