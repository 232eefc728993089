"""The pipeline behind `lowrank run`: a recipe's stages made into stage configs chained through one
output dir, and the record that lets a later run skip what is finished.

A recipe (YAML) holds the pipeline's fields (PipelineConfig) and an ordered list of stages, each
with fields of that stage's config (SFTConfig, RewardConfig, ...)::

    model: tiny
    output_dir: runs/demo
    stages:
      - task: {name: sort}
      - pretrain: {max_steps: 300}
      - sft: {epochs: 2}
      - pairs: {}           # optional: the SFT policy's own wrong answers as the rejected ones
      - reward: {}
      - ppo: {steps: 16}
      - merge: {}
      - export: {type: [f16, q8_0, q4_k_m]}
      - verify: {}

Stages run in the order of STAGES, each reading what earlier ones wrote. The pipeline sets what
links them (model, data files of the task, adapters, output dirs, quant, seed); a recipe may not.
Under output_dir::

    task/         lowrank.tasks' files: pretrain, sft, eval (held out), preferences, prompts
    pretrain/     the base every later stage trains on (a Hugging Face dir)
    sft/ reward/ ppo/ dpo/ grpo/   adapters (PEFT dir + lowrank.json, metrics.jsonl)
    pairs/        pairs.jsonl (lowrank.pairs): what reward and dpo train on when the stage is listed
    merged/       the last adapter merged into the base
    gguf/         one GGUF per type (+ Modelfiles); verify.json: each file's check and a sample answer
    pipeline.json each stage's settings and state;  curves.png: the training curves

With a task stage, the held-out accuracy of each model is cached in ``task_eval.json`` next to it:
pretrain/, sft/, ppo/, dpo/, grpo/, and task/ for the base when there is no pretrain stage.

ppo, dpo and grpo each start from the SFT adapter (their reference), not from one another, so a
recipe can run them side by side and the table compares each with SFT; merge takes the last one
listed. grpo reads the reward model of a reward stage only when its fields give a non-zero
reward_adapter_weight and, with a task stage and no ``rewards`` of its own, scores with the task's
checker ("exact": the answer field of each prompt).

A second run skips a stage whose output is finished (its marker, written last, is there) and whose
recorded settings are today's. A stage without its marker (interrupted) runs again, from its newest
checkpoint when it has one; every stage after a stage that runs runs too, since its input changed.
A finished stage whose settings changed is refused unless ``overwrite``: then it and every stage
after it run again. That record and those decisions are lowrank/pipeline/state.py; this file holds the
recipe's fields, its stages wired into configs (``plan_stages``) and their checks.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowrank.errors import UserError
from lowrank.runrecord import POLICY_STAGES  # merge takes the last of these a recipe lists

STAGES = ("task", "pretrain", "sft", "pairs", "reward", "ppo", "dpo", "grpo", "merge", "export", "verify")
RL_STAGES = ("ppo", "dpo", "grpo")  # each starts from the SFT adapter, which is also its reference
DEFAULT_STAGES = ("sft", "reward", "ppo", "merge", "export", "verify")  # without a recipe: shipped data
STAGE_DIRS = {"task": "task", "pretrain": "pretrain", "sft": "sft", "pairs": "pairs", "reward": "reward", "ppo": "ppo", "dpo": "dpo",
              "grpo": "grpo", "merge": "merged", "export": "gguf", "verify": "gguf"}
STATE_FILE = "pipeline.json"
TASK_EVAL = "task_eval.json"
VERIFY_FILE = "verify.json"
CURVES = "curves.png"
DEFAULT_TYPES = ["f16", "q8_0", "q4_k_m"]
COMMAND_STAGES = ("pretrain", "sft", "pairs", "reward", "ppo", "dpo", "grpo", "merge", "export")  # stages whose fields are the flags of `lowrank <stage>`
# Fields the pipeline sets itself (they chain the stages), by stage.
WIRED = {
    "task": set(),
    "pretrain": {"model", "output_dir", "seed", "overwrite"},
    "sft": {"model", "output_dir", "quant", "seed", "overwrite", "resume"},
    "pairs": {"model", "output_dir", "sft_adapter", "quant", "seed", "overwrite"},
    "reward": {"model", "output_dir", "sft_adapter", "quant", "seed", "overwrite", "resume"},
    "ppo": {"model", "output_dir", "sft_adapter", "reward_adapter", "quant", "seed", "overwrite", "resume"},
    "dpo": {"model", "output_dir", "sft_adapter", "quant", "seed", "overwrite", "resume"},
    "grpo": {"model", "output_dir", "sft_adapter", "reward_adapter", "quant", "seed", "overwrite", "resume"},
    "merge": {"base", "adapters", "out", "overwrite"},
    "export": {"out", "verify", "lora", "lora_only"},
    "verify": set(),
}
# ... and, with a task stage, the data files it writes.
WIRED_BY_TASK = {"pretrain": {"data"}, "sft": {"data", "eval_data"}, "pairs": {"prompts"}, "reward": {"data"}, "ppo": {"prompts"},
                 "dpo": {"pairs"}, "grpo": {"prompts"}}

# The embedded tiny models have random weights: without a recipe, the default stages run these short
# settings, whose metrics still move. Their LM head is frozen random behind an RMSNorm of weight 1, so a
# LoRA on the other linears alone barely moves any token's probability: SFT also adapts lm_head,
# which the PPO policy inherits (the reward model leaves it out: the score never passes through it).
_TINY_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
TINY_RECIPE = {
    "sft": {"learning_rate": 5e-3, "epochs": 2.0, "eval_every": 0, "save_every": 0, "gradient_checkpointing": False,
            "target_modules": _TINY_LORA_TARGETS},
    "reward": {"learning_rate": 1e-3, "gradient_checkpointing": False},
    # every rollout is logged (log_samples), so the summary can count the rewarded property in them.
    # At 1e-3 (and 3e-4) each update moved the policy past PPO's clip (rollout.step_size_alarm) and
    # the responses collapsed to 1-2 tokens; at 1e-4 they keep 5-8 and the mean score still rises.
    "ppo": {"steps": 16, "rollout_batch_size": 8, "minibatch_size": 4, "ppo_epochs": 2, "max_new_tokens": 16,
            "learning_rate": 1e-4, "init_kl_coef": 0.2, "log_samples": 8},
}
# --quick: a smoke test of the plumbing (two optimizer steps per training stage).
QUICK_RECIPE = {
    "pretrain": {"max_steps": 2},
    "sft": {"max_steps": 2, "eval_every": 0, "save_every": 0, "gradient_checkpointing": False},
    "reward": {"max_steps": 2, "gradient_checkpointing": False},
    "ppo": {"steps": 1, "rollout_batch_size": 2, "minibatch_size": 2, "ppo_epochs": 1, "max_new_tokens": 8,
            "log_samples": 0},
    "pairs": {"max_new_tokens": 8},
    "dpo": {"max_steps": 2, "eval_every": 0, "save_every": 0, "gradient_checkpointing": False},
    "grpo": {"steps": 1, "group_size": 2, "prompts_per_step": 1, "minibatch_size": 0, "micro_batch_size": 0,
             "max_new_tokens": 8, "log_samples": 0},
}


@dataclass
class PipelineConfig:
    """Settings of `lowrank run` (a recipe's top-level fields; flags override them)."""

    model: str = field(default="tiny", metadata={"help": "base model: Hugging Face dir or hub id, or 'tiny' / 'tiny-bpe'"})
    output_dir: str = field(default="", metadata={"help": "where every stage's output and pipeline.json go"})
    quant: str = field(default="auto", metadata={"help": "base weights of the training stages: nf4, int8, none, or auto (nf4 on CUDA, none on a CPU, where bitsandbytes' 4-bit is ~20x slower)"})
    seed: int = field(default=0, metadata={"help": "seed of every stage"})
    type: list[str] = field(default_factory=list, metadata={"help": "GGUF types of the export stage (default: the recipe's, else f16,q8_0,q4_k_m)"})
    data: str = field(default="", metadata={"help": "SFT data when there is no task stage (default: the recipe's, else the shipped alpaca sample)"})
    preferences: str = field(default="", metadata={"help": "reward-model pairs when there is no task stage (default: the recipe's, else the shipped sample)"})
    prompts: str = field(default="", metadata={"help": "PPO prompts when there is no task stage (default: the recipe's, else the shipped sample)"})
    quick: bool = field(default=False, metadata={"help": "two steps per training stage: checks the plumbing, trains nothing"})
    overwrite: bool = field(default=False, metadata={"help": "run again a finished stage whose settings changed, and every stage after it"})


@dataclass
class TaskConfig:
    """The task stage: a synthetic task's data files (lowrank.tasks) and how accuracy on it is measured."""

    name: str = field(default="sort", metadata={"help": "task: sort, reverse or add"})
    seed: int | None = field(default=None, metadata={"help": "seed of the problems (default: the pipeline's)"})
    sizes: dict[str, int] = field(default_factory=dict, metadata={"help": "problems per file (pretrain, sft, eval, preferences, prompts); default lowrank.tasks.DEFAULT_SIZES"})
    length: list[int] | None = field(default=None, metadata={"help": "difficulty: [low, high] letters per problem (sort, reverse; default [3, 6]) or digits per operand (add; default [1, 2])"})
    sft_errors: float = field(default=0.0, metadata={"help": "share of the harder problems' SFT demonstrations written with the task's typical slip (the last letter left out; for add, the carries forgotten): imperfect demonstrations that RL against correctness can improve on"})
    eval_max_new_tokens: int = field(default=24, metadata={"help": "length limit of a greedy answer when measuring accuracy"})
    eval_batch_size: int = field(default=64, metadata={"help": "prompts per generate call when measuring accuracy"})


@dataclass
class VerifyConfig:
    """The verify stage: every GGUF checked against the merged model, and one held-out prompt answered."""

    greedy_tokens: int = field(default=32, metadata={"help": "greedy continuation compared token by token (float files)"})
    threads: int = field(default=2, metadata={"help": "llama.cpp threads"})
    sample_max_tokens: int = field(default=48, metadata={"help": "length limit of the sample answer"})


@dataclass
class Stage:
    name: str
    config: Any  # the stage's config dataclass, wired
    dir: Path
    eval_file: Path | None = None  # task_eval.json of the model this stage makes (with a task stage)
    evaluates: dict = field(default_factory=dict)  # task/pretrain: the plain base measured (model, quant, template)


def stage_classes() -> dict[str, type]:
    from lowrank.dpo import DPOConfig
    from lowrank.export.gguf import ExportConfig
    from lowrank.grpo import GRPOConfig
    from lowrank.pairs import PairsConfig
    from lowrank.ppo import PPOConfig
    from lowrank.pretrain import PretrainConfig
    from lowrank.quantize.merge import MergeConfig
    from lowrank.reward import RewardConfig
    from lowrank.sft import SFTConfig

    return {"task": TaskConfig, "pretrain": PretrainConfig, "sft": SFTConfig, "pairs": PairsConfig, "reward": RewardConfig,
            "ppo": PPOConfig, "dpo": DPOConfig, "grpo": GRPOConfig, "merge": MergeConfig, "export": ExportConfig, "verify": VerifyConfig}


# --- the recipe -----------------------------------------------------------------------------------

def read_recipe(path: Path) -> tuple[dict, list[tuple[str, dict]] | None]:
    """(pipeline fields, [(stage, fields), ...] in order, or None when it lists no stages), checked."""
    from lowrank.config import load_yaml

    recipe = {str(k).replace("-", "_"): v for k, v in load_yaml(path).items()}
    listed = recipe.pop("stages", None)
    known = [f.name for f in dataclasses.fields(PipelineConfig)]
    for key in recipe:
        if key not in known:
            raise UserError(f"{path}: unknown field '{key}'{_did_you_mean(key, known + ['stages'])}; a recipe holds "
                            f"'stages' and the pipeline's fields ({', '.join(known)})")
    if listed is None:
        return recipe, None
    if not isinstance(listed, list) or not listed:
        raise UserError(f"{path}: 'stages' must be a list, one '- stage: {{fields}}' item per stage")
    stages: list[tuple[str, dict]] = []
    for number, item in enumerate(listed, 1):
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise UserError(f"{path}: stage {number} must be one 'stage: {{fields}}' mapping, got {item!r}")
        (name, fields), = item.items()
        if name not in STAGES:
            raise UserError(f"{path}: stage {number}: unknown stage '{name}'{_did_you_mean(str(name), STAGES)}; "
                            f"stages are {', '.join(STAGES)}")
        if fields is not None and not isinstance(fields, dict):
            raise UserError(f"{path}: stage '{name}' must map to its fields ({{field: value}}), got {fields!r}")
        stages.append((name, {str(k).replace("-", "_"): v for k, v in (fields or {}).items()}))
    names = [name for name, _ in stages]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise UserError(f"{path}: stage '{name}' is listed twice; each stage runs once")
        later = [n for n in names[:i] if STAGES.index(n) > STAGES.index(name)]
        if later:
            raise UserError(f"{path}: stage '{name}' comes after '{later[0]}'; stages run in the order "
                            f"{' -> '.join(STAGES)}")
    return recipe, stages


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def output_path(config: PipelineConfig) -> Path:
    """The output dir as an absolute path: every stage records paths in it, valid from any working dir."""
    if not config.output_dir:
        raise UserError("no output dir: give --output-dir DIR (or output_dir in the recipe)")
    return Path(config.output_dir).expanduser().resolve()


def _check_dependencies(names: list[str], source: str) -> None:
    needs = [("ppo", ("reward",), "a 'reward' stage (its reward model)"),
             ("merge", POLICY_STAGES, "an 'sft', 'ppo', 'dpo' or 'grpo' stage (the adapter to merge)"),
             ("export", ("merge",), "a 'merge' stage (the model to export)"),
             ("verify", ("export",), "an 'export' stage (the files to check)")]
    for stage, any_of, what in needs:
        if stage in names and not any(n in names for n in any_of):
            raise UserError(f"{source}: stage '{stage}' needs {what} before it")


def plan_stages(config: PipelineConfig, listed: list[tuple[str, dict]] | None, source: str) -> list[Stage]:
    """The stages to run, each config filled: defaults < TINY_RECIPE (no recipe, tiny models) < recipe
    < --quick < wiring. Every field is checked here, before any stage runs."""
    from lowrank.config import build_config
    from lowrank.data import SAMPLE_FILES
    from lowrank.tasks import FILES
    from lowrank.tiny import NAMED_MODELS

    out = output_path(config)
    tiny_defaults = listed is None and config.model in NAMED_MODELS
    listed = listed if listed is not None else [(name, {}) for name in DEFAULT_STAGES]
    names = [name for name, _ in listed]
    _check_dependencies(names, source)
    has_task = "task" in names
    for flag, value in (("--data", config.data), ("--preferences", config.preferences), ("--prompts", config.prompts)):
        if value and has_task:
            raise UserError(f"{flag}: the task stage of {source} writes the data; leave {flag} out")
    dirs = {name: out / STAGE_DIRS[name] for name in STAGES}
    task_files = {f: str(dirs["task"] / f"{f}.jsonl") for f in FILES}
    base = str(dirs["pretrain"]) if "pretrain" in names else config.model
    preferences = task_files["preferences"] if has_task else config.preferences
    if "pairs" in names:  # reward and dpo train on the pairs the SFT policy's answers made
        from lowrank.pairs import PAIRS_FILE

        pairs_file = str(dirs["pairs"] / PAIRS_FILE)
    else:
        pairs_file = preferences
    from lowrank.models import resolve_quant

    quant = resolve_quant(config.quant)
    common = {"model": base, "quant": quant, "seed": config.seed, "overwrite": True}
    wiring = {
        "task": {},
        "pretrain": {"model": config.model, "seed": config.seed, "overwrite": True, "output_dir": str(dirs["pretrain"]),
                     **({"data": task_files["pretrain"]} if has_task else {})},
        "sft": {**common, "output_dir": str(dirs["sft"]),
                **({"data": task_files["sft"], "eval_data": task_files["eval"]} if has_task else {"data": config.data})},
        "pairs": {**common, "output_dir": str(dirs["pairs"]), "sft_adapter": str(dirs["sft"]) if "sft" in names else "",
                  "prompts": preferences},
        "reward": {**common, "output_dir": str(dirs["reward"]),
                   "sft_adapter": str(dirs["sft"]) if "sft" in names else None, "data": pairs_file},
        "ppo": {**common, "output_dir": str(dirs["ppo"]), "sft_adapter": str(dirs["sft"]) if "sft" in names else "",
                "reward_adapter": str(dirs["reward"]),
                "prompts": task_files["prompts"] if has_task else config.prompts},
        "dpo": {**common, "output_dir": str(dirs["dpo"]), "sft_adapter": str(dirs["sft"]) if "sft" in names else "",
                "pairs": pairs_file},
        "grpo": {**common, "output_dir": str(dirs["grpo"]), "sft_adapter": str(dirs["sft"]) if "sft" in names else "",
                 "reward_adapter": str(dirs["reward"]) if "reward" in names else "",
                 "prompts": task_files["prompts"] if has_task else config.prompts},
        "merge": {"base": base, "adapters": [str(dirs[[n for n in names if n in POLICY_STAGES][-1]])]
                  if any(n in POLICY_STAGES for n in names) else [], "out": str(dirs["merge"]), "overwrite": True},
        "export": {"out": str(dirs["export"]), "verify": False, "type": config.type},
        "verify": {},
    }
    shipped = {"pairs": ("prompts", SAMPLE_FILES["preferences"]), "reward": ("data", SAMPLE_FILES["preferences"]), "ppo": ("prompts", SAMPLE_FILES["prompts"]),
               "dpo": ("pairs", SAMPLE_FILES["preferences"]), "grpo": ("prompts", SAMPLE_FILES["prompts"])}
    classes = stage_classes()
    stages = []
    for name, fields in listed:
        cls = classes[name]
        known = [f.name for f in dataclasses.fields(cls)]
        wired = WIRED[name] | (WIRED_BY_TASK.get(name, set()) if has_task else set())
        for key in fields:
            if key in wired:
                raise UserError(f"{source}: {name}.{key} is set by `lowrank run` itself"
                                + (" from the task stage" if key in WIRED_BY_TASK.get(name, ()) else
                                   "; use the pipeline's field or flag (model, quant, seed, output_dir)"))
            if key not in known:
                listing = (f"see `lowrank {name} --help` for its fields" if name in COMMAND_STAGES else
                           f"its fields are {', '.join(k for k in known if k not in wired)}")
                raise UserError(f"{source}: unknown field '{key}' in stage '{name}' ({cls.__name__})"
                                f"{_did_you_mean(key, known)}; {listing}")
        values = dict(TINY_RECIPE.get(name, {})) if tiny_defaults else {}
        values.update(fields)
        if config.quick:
            values.update(QUICK_RECIPE.get(name, {}))
        values.update({k: v for k, v in wiring[name].items() if v not in ("", None, [])})
        if name in shipped and not values.get(shipped[name][0]):  # neither task, flag nor recipe gave the data
            values[shipped[name][0]] = str(shipped[name][1])
        if name == "task":
            values.setdefault("seed", config.seed)
        if name == "grpo":
            if not fields.get("reward_adapter_weight"):  # the reward model only when the recipe weighs it in
                values.pop("reward_adapter", None)
            if has_task and not values.get("rewards"):
                values["rewards"] = ["exact"]  # the task's checker: each prompt record carries its answer
        if name == "pairs" and has_task and not values.get("rewards"):
            values["rewards"] = ["exact"]  # the task's checker: each preference record carries its answer
        if name == "export":
            values.setdefault("type", DEFAULT_TYPES)
            values.setdefault("name", out.name)  # runs/demo -> demo-q4_k_m.gguf
        try:
            stage_config = build_config(cls, None, **values)
        except UserError as e:
            raise UserError(f"{source}: stage '{name}': {str(e).removeprefix('config: ')}") from None
        if name == "task":
            _check_task(stage_config, source)
        if name == "pretrain" and not stage_config.data:
            raise UserError(f"{source}: stage 'pretrain' needs text: give its data (.jsonl of {{\"text\"}} records) "
                            "or a task stage before it")
        stages.append(Stage(name, stage_config, dirs[name]))
    sft_template = next((s.config.template for s in stages if s.name == "sft"), "auto")
    evaluated = {name: dirs[name] for name in ("pretrain",) + POLICY_STAGES}
    if "pretrain" not in names:
        evaluated["task"] = dirs["task"]  # the plain base's accuracy, measured by the task stage
    for stage in stages:
        if has_task and stage.name in evaluated:
            stage.eval_file = evaluated[stage.name] / TASK_EVAL
        if stage.name in ("task", "pretrain") and stage.eval_file is not None:
            # the plain base, measured in the chat template SFT will train it in
            stage.evaluates = {"model": base, "quant": quant, "template": sft_template}
    return stages


def _check_task(config: TaskConfig, source: str) -> None:
    """lowrank.tasks' own check of the name, sizes and length, its message prefixed with the recipe."""
    from lowrank import tasks

    if not isinstance(config.sizes, dict):
        raise UserError(f"{source}: task.sizes must map files to problem counts, e.g. {{eval: 100}}")
    try:
        tasks._check(config.name, config.sizes)
        tasks.check_length(config.name, config.length)
        tasks.check_sft_errors(config.sft_errors)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
