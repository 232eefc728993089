"""`lowrank run`: the whole pipeline in one command, each stage's Python API called in turn.

SFT -> reward model (initialised from the SFT adapter) -> PPO -> merge the PPO policy into the base
-> GGUF export -> verify against the merged model. Everything goes under --output-dir::

    sft/ reward/ ppo/   adapters (PEFT dir + lowrank.json, metrics.jsonl, a plot)
    merged/             the PPO policy merged into the base, a Hugging Face dir
    gguf/               one GGUF per --type, with an Ollama Modelfile each
    pipeline.json       the summary, written last: its presence marks a finished run

Each stage runs with its own defaults, except on the embedded tiny models (random weights, where
the defaults of a real model would take an hour on a CPU): there TINY_RECIPE gives short runs whose
metrics still move. A YAML recipe (--config) may hold the pipeline's flags and one section per stage
(sft, reward, ppo, merge, export) with that stage's fields; flags override the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from lowrank.errors import UserError

MARKER = "pipeline.json"
STAGE_DIRS = {"sft": "sft", "reward": "reward", "ppo": "ppo", "merge": "merged", "export": "gguf"}
# Fields the pipeline sets itself: a recipe section may not (it would break the chain of stages).
_WIRED = {"model", "output_dir", "out", "base", "adapters", "sft_adapter", "reward_adapter", "quant", "seed",
          "overwrite", "resume", "type"}

# The embedded tiny models have random weights and train at a fraction of a second per step on a
# CPU: these settings run the whole pipeline in under a minute on 2 idle cores. Their LM head is
# frozen random (std 0.02) behind an RMSNorm of weight 1, so a LoRA on the other linears alone cannot
# lift any token's probability above ~1.4% (entropy stays ~6.9 nats, SFT's loss ~6.3, PPO's policy
# cannot move): SFT also puts a LoRA on lm_head, which the PPO policy inherits. The reward model
# leaves the head out (the score never passes through it).
_TINY_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
TINY_RECIPE = {
    "sft": {"learning_rate": 5e-3, "epochs": 2.0, "eval_every": 0, "save_every": 0, "gradient_checkpointing": False,
            "target_modules": _TINY_LORA_TARGETS},
    "reward": {"learning_rate": 1e-3, "gradient_checkpointing": False},
    # every rollout is logged (log_samples), so the summary can count the rewarded property in them
    "ppo": {"steps": 16, "rollout_batch_size": 8, "minibatch_size": 4, "ppo_epochs": 2, "max_new_tokens": 16,
            "learning_rate": 1e-3, "init_kl_coef": 0.2, "log_samples": 8},
}
# --quick: a smoke test of the plumbing (two optimizer steps per training stage).
QUICK_RECIPE = {
    "sft": {"max_steps": 2, "eval_every": 0, "save_every": 0, "gradient_checkpointing": False},
    "reward": {"max_steps": 2, "gradient_checkpointing": False},
    "ppo": {"steps": 1, "rollout_batch_size": 2, "minibatch_size": 2, "ppo_epochs": 1, "max_new_tokens": 8,
            "log_samples": 0},
}


@dataclass
class PipelineConfig:
    """Settings of `lowrank run`; each stage's own settings go in its section of a --config recipe."""

    model: str = field(default="tiny", metadata={"help": "base model: Hugging Face dir or hub id, or 'tiny' / 'tiny-bpe'"})
    output_dir: str = field(default="", metadata={"help": "where sft/ reward/ ppo/ merged/ gguf/ and pipeline.json go"})
    quant: str = field(default="auto", metadata={"help": "base weights of all training stages: nf4, int8, none, or auto (nf4 on CUDA, none on a CPU, where bitsandbytes' 4-bit is ~20x slower)"})
    type: list[str] = field(default_factory=lambda: ["f16", "q8_0", "q4_k_m"], metadata={"help": "GGUF types to export (default: f16,q8_0,q4_k_m)"})
    data: str = field(default="", metadata={"help": "SFT data (default: the shipped alpaca sample)"})
    preferences: str = field(default="", metadata={"help": "reward model preference pairs (default: the shipped sample)"})
    prompts: str = field(default="", metadata={"help": "PPO prompts (default: the shipped sample)"})
    quick: bool = field(default=False, metadata={"help": "two steps per training stage: checks the plumbing, trains nothing"})
    seed: int = field(default=0, metadata={"help": "seed of every stage"})
    overwrite: bool = field(default=False, metadata={"help": "replace a finished run in output_dir"})


def register(parser: argparse.ArgumentParser) -> None:
    from lowrank.config import add_dataclass_arguments

    add_dataclass_arguments(parser, PipelineConfig)
    parser.epilog = ("A --config recipe holds these fields and one section per stage (sft, reward, ppo, merge, "
                     "export) with that stage's own fields, e.g. 'ppo: {steps: 200}'. On the embedded tiny models "
                     "the stages run short demo settings unless the recipe says otherwise.")


# --- configuration ------------------------------------------------------------------------------

def _stage_classes() -> dict[str, type]:
    from lowrank.export.gguf import ExportConfig
    from lowrank.ppo import PPOConfig
    from lowrank.quantize.merge import MergeConfig
    from lowrank.reward import RewardConfig
    from lowrank.sft import SFTConfig

    return {"sft": SFTConfig, "reward": RewardConfig, "ppo": PPOConfig, "merge": MergeConfig, "export": ExportConfig}


def read_recipe(path: Path | None) -> tuple[dict, dict[str, dict]]:
    """(pipeline fields, {stage: fields}) of a YAML recipe, checked field by field."""
    from lowrank.config import load_yaml

    if path is None:
        return {}, {}
    recipe = {k.replace("-", "_"): v for k, v in load_yaml(path).items()}
    classes = _stage_classes()
    sections: dict[str, dict] = {}
    for stage in classes:
        section = recipe.pop(stage, None) or {}
        if not isinstance(section, dict):
            raise UserError(f"{path}: '{stage}' must be a mapping of {classes[stage].__name__} fields")
        names = {f.name for f in dataclasses.fields(classes[stage])}
        section = {k.replace("-", "_"): v for k, v in section.items()}
        for key in section:
            if key in _WIRED:
                raise UserError(f"{path}: {stage}.{key} is set by `lowrank run` itself; "
                                f"use its flag (--model, --quant, --type, --seed, --output-dir) instead")
            if key not in names:
                raise UserError(f"{path}: unknown field '{key}' in section '{stage}' ({classes[stage].__name__})")
        sections[stage] = section
    known = {f.name for f in dataclasses.fields(PipelineConfig)}
    for key in recipe:
        if key not in known:
            raise UserError(f"{path}: unknown field '{key}'; expected pipeline fields ({', '.join(sorted(known))}) "
                            f"or a section ({', '.join(classes)})")
    return recipe, sections


def build_pipeline_config(args: argparse.Namespace) -> tuple[PipelineConfig, dict[str, dict]]:
    """The pipeline's config (recipe, then flags) and each stage's recipe section."""
    from lowrank.config import build_config

    top, sections = read_recipe(getattr(args, "config", None))
    flags = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(PipelineConfig)}
    config = build_config(PipelineConfig, None, **{**top, **{k: v for k, v in flags.items() if v is not None}})
    return config, sections


def resolve_quant(quant: str) -> str:
    import torch

    from lowrank.models import QUANT_CHOICES

    if quant == "auto":
        return "nf4" if torch.cuda.is_available() else "none"
    if quant not in QUANT_CHOICES:
        raise UserError(f"--quant: unknown value '{quant}'; choose auto or one of {', '.join(QUANT_CHOICES)}")
    return quant


def stage_configs(config: PipelineConfig, sections: dict[str, dict]) -> dict:
    """One config object per stage: stage defaults < TINY_RECIPE (tiny models) < recipe < --quick < wiring."""
    from lowrank.config import build_config
    from lowrank.data import SAMPLE_FILES
    from lowrank.tiny import NAMED_MODELS

    out = Path(config.output_dir).expanduser()
    dirs = {stage: str(out / name) for stage, name in STAGE_DIRS.items()}
    quant = resolve_quant(config.quant)
    wiring = {
        "sft": {"data": config.data or None, "output_dir": dirs["sft"]},
        "reward": {"data": config.preferences or str(SAMPLE_FILES["preferences"]), "output_dir": dirs["reward"],
                   "sft_adapter": dirs["sft"]},
        "ppo": {"prompts": config.prompts or str(SAMPLE_FILES["prompts"]), "output_dir": dirs["ppo"],
                "sft_adapter": dirs["sft"], "reward_adapter": dirs["reward"]},
    }
    configs = {}
    for stage, cls in _stage_classes().items():
        values = dict(TINY_RECIPE.get(stage, {})) if config.model in NAMED_MODELS else {}
        values.update(sections.get(stage, {}))
        if config.quick:
            values.update(QUICK_RECIPE.get(stage, {}))
        if stage in wiring:
            values.update(model=config.model, quant=quant, seed=config.seed, overwrite=True, **wiring[stage])
        configs[stage] = build_config(cls, None, **values)
    configs["merge"].base, configs["merge"].adapters = config.model, [dirs["ppo"]]
    configs["merge"].out, configs["merge"].overwrite = dirs["merge"], True
    configs["export"].type, configs["export"].out = list(config.type), dirs["export"]
    if configs["export"].name is None:  # runs/demo -> demo-q4_k_m.gguf
        configs["export"].name = out.resolve().name
    return configs


# --- the output dir -------------------------------------------------------------------------------

def _finished_stages(out: Path) -> list[str]:
    """Stage dirs under ``out`` that hold a finished output (an earlier run's, complete or not)."""
    found = [name for stage, name in STAGE_DIRS.items() if stage != "export" and (out / name / "lowrank.json").is_file()]
    if any((out / STAGE_DIRS["export"]).glob("*.gguf")):
        found.append(STAGE_DIRS["export"])
    return found


def prepare_output_dir(config: PipelineConfig) -> Path:
    """Refuse a dir holding a run unless --overwrite; with it, remove the marker first, then our stage dirs.

    Only the dirs the pipeline writes are removed, so --output-dir . does not wipe a project.
    """
    out = Path(config.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output dir is a file; choose another --output-dir")
    earlier = _finished_stages(out)
    if not config.overwrite:
        if (out / MARKER).exists():
            raise UserError(f"{out}: already holds a finished run ({MARKER}); "
                            "pass --overwrite to replace it or choose another --output-dir")
        if earlier:
            raise UserError(f"{out}: holds the output of an earlier run ({', '.join(d + '/' for d in earlier)}); "
                            "pass --overwrite to replace it or choose another --output-dir")
    (out / MARKER).unlink(missing_ok=True)
    for name in STAGE_DIRS.values():
        shutil.rmtree(out / name, ignore_errors=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create the output dir ({e.strerror})") from None
    return out


def check_inputs(config: PipelineConfig) -> None:
    """Fail on a bad model, type or data file before any stage starts (the first stage is minutes in)."""
    from lowrank.export.gguf import parse_types
    from lowrank.models import check_architecture
    from lowrank.tiny import resolve_model_name

    if not config.output_dir:
        raise UserError("no output dir: give --output-dir DIR")
    parse_types(config.type)
    check_architecture(resolve_model_name(config.model))
    for flag, value in (("--data", config.data), ("--preferences", config.preferences), ("--prompts", config.prompts)):
        looks_local = value.endswith((".json", ".jsonl")) or value.startswith((".", "/", "~"))
        if value and looks_local and not Path(value).expanduser().is_file():
            raise UserError(f"{flag} {value}: file not found")


# --- progress -------------------------------------------------------------------------------------

def _fmt(record: dict, **keys: str) -> dict:
    return {label: f"{record[key]:.3f}" for label, key in keys.items() if isinstance(record.get(key), (int, float))}


# --- the run --------------------------------------------------------------------------------------

def _meta(path: Path) -> dict:
    return json.loads((path / "lowrank.json").read_text())


def _ppo_records(ppo_dir: Path) -> list[dict]:
    lines = (ppo_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _property_rates(records: list[dict], window: int) -> list[float] | None:
    """Share of the logged samples of the first and last ``window`` steps that have sample_property."""
    from lowrank.data import sample_property

    def rate(chunk):
        texts = [s["response"] for r in chunk for s in r.get("samples", [])]
        return sum(map(sample_property, texts)) / len(texts) if texts else None

    first, last = rate(records[:window]), rate(records[-window:])
    return None if first is None or last is None else [first, last]


def run_stages(config: PipelineConfig, configs: dict) -> dict:
    """Run every stage; return the summary that pipeline.json records (verify results included)."""
    import warnings

    from lowrank.cli.export import export_and_report
    from lowrank.cli.progress import StepBar
    from lowrank.ppo import train_ppo
    from lowrank.quantize.merge import merge
    from lowrank.reward import train_reward
    from lowrank.sft import train_sft

    # bitsandbytes warns once per int8 matmul on the CPU that it casts fp32 inputs to fp16.
    warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")
    seconds: dict[str, float] = {}

    def stage(number: int, name: str, what: str, fn, show=None):
        """Run ``fn``; with ``show`` (record -> values), ``fn`` gets an on_step that feeds a progress bar."""
        print(f"[{number}/5] {name}: {what}", flush=True)
        started = time.perf_counter()
        try:
            if show is None:
                return fn()
            with StepBar(name) as bar:
                return fn(lambda record: bar(record, **show(record)))
        finally:
            seconds[name] = round(time.perf_counter() - started, 1)

    sft_dir = stage(1, "sft", f"LoRA on {config.model} ({configs['sft'].quant} base)",
                    lambda on_step: train_sft(configs["sft"], on_step=on_step),
                    lambda r: _fmt(r, loss="loss", eval="eval_loss"))
    reward_dir = stage(2, "reward", "reward model from the SFT adapter",
                       lambda on_step: train_reward(configs["reward"], on_step=on_step),
                       lambda r: _fmt(r, loss="loss", acc="eval_accuracy"))
    ppo_dir = stage(3, "ppo", "policy against the reward model",
                    lambda on_step: train_ppo(configs["ppo"], on_step=on_step),
                    lambda r: _fmt(r, score="score", kl="kl"))
    merged_dir = stage(4, "merge", "PPO policy into the base", lambda: merge(configs["merge"]))
    reports: list = []
    export_code = stage(5, "export", f"GGUF {','.join(config.type)}" + (" and verify" if configs["export"].verify else ""),
                        lambda: export_and_report(configs["export"], merged_dir, reports))
    verified = {str(r.path): r for r in reports}
    gguf = []
    for path in sorted(Path(configs["export"].out).glob("*.gguf"), key=lambda p: (p.stat().st_mtime, p.name)):
        report = verified.get(str(path))
        gguf.append({"path": str(path), "verified": report is not None,
                     "passed": report.passed if report is not None else export_code == 0,
                     "problems": report.problems if report is not None else []})

    sft, reward = _meta(sft_dir)["metrics"], _meta(reward_dir)["metrics"]
    ppo_records = _ppo_records(ppo_dir)
    scores = [r["score"] for r in ppo_records]
    window = max(1, len(scores) // 4)  # one rollout batch's score is noisy: average a few steps
    return {
        "stage": "pipeline",
        "model": config.model,
        "quant": configs["sft"].quant,
        "dirs": {"sft": str(sft_dir), "reward": str(reward_dir), "ppo": str(ppo_dir), "merged": str(merged_dir),
                 "gguf": configs["export"].out},
        "metrics": {
            "sft_eval_loss": [sft.get("initial_eval_loss"), sft.get("eval_loss")],
            "reward_eval_accuracy": reward.get("eval_accuracy"),
            "reward_eval_margin": reward.get("eval_margin"),
            "ppo_score": [sum(scores[:window]) / window, sum(scores[-window:]) / window] if scores else None,
            "ppo_score_window": window,
            "ppo_kl": ppo_records[-1]["kl"] if ppo_records else None,
            "ppo_steps": len(scores),
            # share of logged rollouts with the shipped preferences' property ("please"), same windows
            "ppo_property_rate": _property_rates(ppo_records, window) if not config.preferences else None,
        },
        "gguf": gguf,
        "seconds": seconds,
        "config": {"pipeline": dataclasses.asdict(config),
                   **{name: dataclasses.asdict(c) for name, c in configs.items()}},
    }


def _num(value, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def format_summary(summary: dict, output_dir: str) -> str:
    m, seconds = summary["metrics"], summary["seconds"]
    loss_before, loss_after = m["sft_eval_loss"]
    score = m["ppo_score"] or [None, None]
    lines = [
        "",
        f"lowrank run: {summary['model']} ({summary['quant']} base) in {sum(seconds.values()):.0f} s -> {output_dir}",
        f"  sft     held-out loss {_num(loss_before)} -> {_num(loss_after)}  ({seconds['sft']:.0f} s)",
        f"  reward  held-out accuracy {_num(m['reward_eval_accuracy'], '.2f')}, "
        f"margin {_num(m['reward_eval_margin'], '.3f')}  ({seconds['reward']:.0f} s)",
        f"  ppo     reward {_num(score[0], '.3f')} -> {_num(score[1], '.3f')} (mean of the first and last "
        f"{m['ppo_score_window']} of {m['ppo_steps']} steps), KL to SFT {_num(m['ppo_kl'], '.3f')} nats  "
        f"({seconds['ppo']:.0f} s)",
        *([f"          responses with \"please\" (what the shipped preferences reward) {rate[0]:.0%} -> {rate[1]:.0%}"]
          if (rate := m.get("ppo_property_rate")) else []),
        f"  merge   {summary['dirs']['merged']}  ({seconds['merge']:.0f} s)",
        f"  gguf    ({seconds['export']:.0f} s)",
    ]
    lines += [f"          {g['path']}  " + (f"verify {'PASS' if g['passed'] else 'FAIL'}" if g["verified"] else "not verified")
              for g in summary["gguf"]]
    files = [g["path"] for g in summary["gguf"]]
    if files:
        small = next((f for f in files if "q4_k_m" in f.lower()), files[-1])
        lines += ["chat with it:",
                  f"  lowrank chat {shlex.quote(small)}",
                  f"  lowrank app --models-dir {shlex.quote(summary['dirs']['gguf'])}"]
    return "\n".join(lines)


def _write_marker(out: Path, summary: dict) -> None:
    tmp = out / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    os.replace(tmp, out / MARKER)


def run(args: argparse.Namespace) -> int:
    config, sections = build_pipeline_config(args)
    check_inputs(config)
    configs = stage_configs(config, sections)
    out = prepare_output_dir(config)
    summary = run_stages(config, configs)
    print(format_summary(summary, config.output_dir))
    failed = [g["path"] for g in summary["gguf"] if not g["passed"]]
    if failed:
        print(f"lowrank run: verification failed for {', '.join(failed)}; the run is not marked finished")
        return 1
    _write_marker(out, summary)
    return 0
