"""The config fields the stages share, declared once each, in groups a stage's config is composed of.

A stage's config (SFTConfig, PPOConfig, ...) is a dataclass whose bases are the groups it uses:
``class DPOConfig(EpochFields, SchedulerField, AdapterFields)``, the group that holds StageFields last
so that --model, --output-dir and the other fields every stage has come first in --help (a
dataclass lists the fields of its bases in reverse order of the MRO). Each shared field, with its type,
default and help text, stands here only; `lowrank.config` turns every field into a flag and a YAML
key, so the groups give the same ``--learning-rate`` to every stage that has one.

A stage that wants another default, or says in its own words what a field means for it, restates
the field in its class body and is decorated with :func:`stage_config` instead of ``@dataclass``::

    @stage_config
    class PPOConfig(RLFields):
        learning_rate = restate(1e-5, help="AdamW learning rate (policy and value)")
        gradient_checkpointing = False  # a plain value: a new default, the group's help text

The field keeps the group's type, help (unless restated) and place; only what is restated changes.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

from lowrank.config import check_fields
from lowrank.metrics import check_report_to

_MISSING = dataclasses.MISSING


@dataclass(frozen=True)
class _Restated:
    default: Any = _MISSING
    help: str | None = None


def restate(default: Any = _MISSING, *, help: str | None = None) -> Any:
    """In a :func:`stage_config` class body: an inherited field with a new default and/or help text."""
    return _Restated(default, help)


def stage_config(cls: type) -> type:
    """``dataclass(cls)``, after turning each class attribute that names an inherited field (a plain
    value, or :func:`restate`) into that field with the new default and/or help text."""
    inherited = {f.name: f for base in reversed(cls.__mro__[1:]) if dataclasses.is_dataclass(base)
                 for f in dataclasses.fields(base)}
    annotations = dict(inspect.get_annotations(cls))  # the class's own, in order
    for name, value in list(cls.__dict__.items()):
        if name not in inherited or name in annotations:
            continue
        old = inherited[name]
        change = value if isinstance(value, _Restated) else _Restated(value)
        default = old.default if change.default is _MISSING else change.default
        factory = old.default_factory if change.default is _MISSING else _MISSING
        if isinstance(default, list):  # a mutable default: a factory of copies, as dataclasses require
            default, factory = _MISSING, (lambda items=tuple(default): list(items))
        metadata = {**old.metadata, **({"help": change.help} if change.help is not None else {})}
        setattr(cls, name, field(default=default, default_factory=factory, init=old.init, repr=old.repr,
                                 compare=old.compare, metadata=metadata))
        annotations[name] = old.type
    cls.__annotations__ = annotations
    return dataclass(cls)


def _help(text: str, default: Any) -> Any:
    """A field with help ``text`` and ``default`` (a list default becomes a factory of copies)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


# --- what every stage has ------------------------------------------------------------------------

@dataclass
class StageFields:
    """The base of every stage's config: the model, the output dir and its run record, the seed and
    the tracker; on building the config, the checks of the fields the stages share
    (config.check_fields), so bad values stop before any model loads."""
    report_to: str = _help("also log metrics to tensorboard, wandb (offline unless WANDB_MODE says otherwise) or "
                           "mlflow; none: metrics.jsonl and PNGs only", "none")
    model: str = _help("base model: HF dir or hub id (as used for SFT)", "tiny")
    output_dir: str = _help("where the policy adapter is written", "")
    seed: int = _help("seed of sampling, prompt order and init", 0)
    overwrite: bool = _help("replace a finished run in output_dir", False)

    def __post_init__(self):
        check_report_to(self.report_to)
        check_fields(self)


# Help of --quant for a stage that takes the base as its SFT adapter was trained on.
QUANT_OF_SFT_ADAPTER = "base weights: nf4, int8, none, or auto (what the SFT adapter was trained on)"


@dataclass
class BaseModelFields(StageFields):
    """A stage that loads the base (possibly quantized) under adapters."""
    quant: str = _help("base weights: nf4 (QLoRA), int8, none, or auto (nf4 on CUDA, none on a CPU, where "
                       "bitsandbytes' 4-bit is ~20x slower)", "auto")


@dataclass
class TrainingFields(StageFields):
    """A stage that takes optimizer steps."""
    learning_rate: float = _help("peak learning rate (AdamW)", 2e-4)
    max_grad_norm: float = _help("gradient clipping norm (0: off)", 1.0)


@dataclass
class AdapterFields(TrainingFields, BaseModelFields):
    """A stage that trains a LoRA adapter on the base and can be resumed from its checkpoints."""
    lora_r: int = _help("rank of a fresh policy LoRA when no SFT adapter is given", 16)
    lora_alpha: int = _help("alpha of a fresh policy LoRA", 32)
    gradient_checkpointing: bool = _help("trade compute for activation memory", True)
    save_every: int = _help("checkpoint every N optimizer steps for --resume (0: never)", 50)
    resume: bool = _help("continue from the newest checkpoint in output_dir", False)


# --- what some stages add ------------------------------------------------------------------------

@dataclass
class EpochFields:
    """Passes over a fixed data set with a held-out share evaluated on the way (sft, reward, dpo, pretrain)."""
    epochs: float = _help("passes over the training pairs (when max_steps is 0)", 1.0)
    max_steps: int = _help("optimizer steps; overrides epochs when > 0", 0)
    warmup_steps: int = _help("linear warm-up steps", 0)
    max_length: int = _help("tokens per prompt + response (longer ones are cut)", 512)
    eval_fraction: float = _help("share of pairs held out for accuracy/margin", 0.1)
    eval_every: int = _help("evaluate every N steps (and at start and end; 0: only those)", 20)


@dataclass
class WeightDecayField:
    weight_decay: float = _help("AdamW weight decay", 0.0)


@dataclass
class SchedulerField:
    lr_scheduler: str = _help("cosine, linear or constant after warm-up", "cosine")


@dataclass
class AccumulationFields:
    """Micro-batches per step, counted or from a token budget, and the AdamW state's bits (sft, reward)."""
    gradient_accumulation_steps: int = _help("micro-batches per optimizer step", 1)
    tokens_per_step: int = _help("tokens per optimizer step (all processes); when > 0 it sets the micro-batches "
                                 "per step (replaces --gradient-accumulation-steps)", 0)
    optim_bits: int = _help("paged AdamW state bits on CUDA with a quantized base: 32 or 8", 32)
    lora_dropout: float = _help("dropout on the LoRA input", 0.05)


@dataclass
class SamplingFields:
    """Sampling answers from the policy (ppo, grpo, pairs)."""
    temperature: float = _help("sampling temperature", 1.0)
    top_p: float = _help("nucleus sampling (1: off)", 1.0)
    top_k: int = _help("top-k sampling (0: off)", 0)
    max_new_tokens: int = _help("completion length limit", 128)


@dataclass
class RewardFunctionFields:
    """Programmatic rewards over prompt records (grpo, pairs: lowrank/rewards.py)."""
    prompt_field: str = _help("field of the prompt in each record (default: prompt or messages; e.g. question for "
                              "GSM8K)", "")
    rewards: list[str] = _help("reward functions: built-in names (exact, numeric) or file.py:function / "
                               "module:function", [])
    reward_weights: list[float] = _help("one weight per --rewards entry (default: 1 each)", [])


@stage_config
class RLFields(SamplingFields, AdapterFields):
    """An RL stage: the SFT policy sampled and updated against a reward (ppo, grpo)."""
    sft_adapter: str = _help("SFT adapter dir: initial policy and the reference", "")
    reward_adapter: str = _help("reward adapter dir from `lowrank reward`", "")
    min_reward_accuracy: float = _help("warn when the reward adapter's held-out pairwise accuracy is below this "
                                       "(0: off)", 0.6)
    refuse_weak_reward: bool = _help("stop instead of warning below --min-reward-accuracy", False)
    missing_eos_penalty: float = _help("subtracted from the score of a response that hits --max-new-tokens "
                                       "unfinished", 0.0)
    cliprange: float = _help("ratio clip epsilon", 0.2)
    fast_rollout: str = _help("sample rollouts from a copy of the policy with the adapter merged into dequantized "
                              "weights: off, merged (costs the parameters again in the compute dtype) or "
                              "merged-graphs (and a static KV cache compiled with CUDA graphs, on CUDA)", "off")
    log_samples: int = _help("sample responses logged per step", 2)
    learning_rate = 1e-5
    gradient_checkpointing = False
    save_every = restate(0, help="checkpoint every N steps for --resume (0: off)")
    resume = restate(help="continue from the checkpoint in output_dir")
