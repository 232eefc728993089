"""`lowrank run [RECIPE.yaml]`: a recipe's stages in turn, each skipped when its finished output is
already there, then one table of what the run measured.

The recipe format and the output dir are in lowrank/pipeline/, the rules for skipping in its state.py; the
measurements (task accuracy, verify, the table's numbers, curves.png) in lowrank/report.py. This
module parses, prints a line and a progress bar per stage, and formats the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from lowrank.errors import UserError


def register(parser: argparse.ArgumentParser) -> None:
    from lowrank.config import add_dataclass_arguments
    from lowrank.pipeline import DEFAULT_STAGES, STAGES, PipelineConfig

    parser.add_argument("recipe", nargs="?", type=Path, default=None, metavar="RECIPE.yaml",
                        help="the stages to run and their settings (default: " + ", ".join(DEFAULT_STAGES)
                        + " on --model with the shipped sample data)")
    add_dataclass_arguments(parser, PipelineConfig)  # its --config is the recipe too
    parser.epilog = (f"A recipe lists stages ({', '.join(STAGES)}), in that order, each with its own fields, "
                     "e.g. '- ppo: {steps: 200}', and the fields above; flags override the recipe. A stage whose "
                     "finished output is in --output-dir with the same settings is skipped, so running a recipe "
                     "again continues where it stopped. See recipes/ for examples.")


def build_pipeline_config(args: argparse.Namespace):
    """(PipelineConfig: recipe, then flags; the recipe's stages or None; the name errors use)."""
    from lowrank.config import build_config
    from lowrank.pipeline import PipelineConfig, read_recipe

    recipe, alias = getattr(args, "recipe", None), getattr(args, "config", None)
    if recipe and alias and Path(recipe) != Path(alias):
        raise UserError(f"two recipes: {recipe} and --config {alias}; give one")
    path = recipe or alias
    top, listed = read_recipe(path) if path else ({}, None)
    flags = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(PipelineConfig)}
    try:
        config = build_config(PipelineConfig, None, **{**top, **{k: v for k, v in flags.items() if v is not None}})
    except UserError as e:
        raise UserError(f"{path or 'lowrank run'}: {str(e).removeprefix('config: ')}") from None
    return config, listed, str(path) if path else "lowrank run"


def check_inputs(config, stages) -> None:
    """Fail on a bad model, GGUF type or data file before any stage starts (the first is minutes in)."""
    from lowrank.export.gguf import parse_types
    from lowrank.models import check_architecture
    from lowrank.tiny import resolve_model_name

    for flag, value in (("--data", config.data), ("--preferences", config.preferences), ("--prompts", config.prompts)):
        looks_local = value.endswith((".json", ".jsonl")) or value.startswith((".", "/", "~"))
        if value and looks_local and not Path(value).expanduser().is_file():
            raise UserError(f"{flag} {value}: file not found")
    for stage in stages:
        if stage.name == "export":
            parse_types(stage.config.type)
        try:
            if stage.name in ("grpo", "pairs"):
                from lowrank.grpo import check_config as check_grpo
                from lowrank.pairs import check_config as check_pairs
                from lowrank.rewards import load_reward_function

                (check_grpo if stage.name == "grpo" else check_pairs)(stage.config)
                for spec in stage.config.rewards:
                    load_reward_function(spec)
        except UserError as e:
            raise UserError(f"stage '{stage.name}': {e}") from None
    check_architecture(resolve_model_name(config.model))


# --- running the stages -----------------------------------------------------------------------------

def _fmt(record: dict, **keys: str) -> dict:
    return {label: f"{record[key]:.3f}" for label, key in keys.items() if isinstance(record.get(key), (int, float))}


# stage -> (values shown on its progress bar, from each step's record)
SHOWN = {
    "pretrain": lambda r: _fmt(r, loss="loss", eval="eval_loss"),
    "sft": lambda r: _fmt(r, loss="loss", eval="eval_loss"),
    "reward": lambda r: _fmt(r, loss="loss", acc="eval_accuracy"),
    "ppo": lambda r: _fmt(r, reward="score", kl="kl"),
    "dpo": lambda r: _fmt(r, loss="loss", margin="margin", acc="eval_accuracy"),
    "grpo": lambda r: _fmt(r, reward="reward", kl="kl"),
}


# how the base of a training stage is named in its line (the pipeline has resolved "auto")
BASE_WORDS = {"nf4": "4-bit NF4, QLoRA", "int8": "8-bit", "none": "unquantized"}


def describe(stage) -> str:
    c = stage.config
    return {
        "task": lambda: f"'{c.name}' problems (seed {c.seed}) -> {stage.dir}",
        "pretrain": lambda: f"every weight of {c.model} on {c.data}",
        "sft": lambda: (f"LoRA on {c.model} ({BASE_WORDS.get(c.quant, c.quant)}) with "
                        f"{c.data or 'the shipped alpaca sample'}"),
        "pairs": lambda: (f"{c.samples_per_prompt} answer{'s' if c.samples_per_prompt != 1 else ''} of the SFT "
                          f"policy to each prompt of {c.prompts}, "
                          f"ranked by {', '.join(c.rewards)}"),
        "reward": lambda: ((f"{c.ensemble} reward models" if c.ensemble > 1 else "reward model") + f" on {c.data}"
                           + (" from the SFT adapter" if c.sft_adapter else "")),
        "ppo": lambda: f"policy against the reward model, {c.steps} steps of {c.rollout_batch_size * c.samples_per_prompt} rollouts",
        "dpo": lambda: f"policy on the preference pairs ({c.loss} loss, beta {c.beta}), reference: the SFT adapter",
        "grpo": lambda: (f"policy against {', '.join(c.rewards + (['the reward model'] if c.reward_adapter else []))}, "
                         f"{c.steps} steps of {c.prompts_per_step} prompts x {c.group_size} samples"),
        "merge": lambda: f"{c.adapters[-1]} into {c.base}",
        "export": lambda: f"GGUF {', '.join(c.type)} -> {c.out}",
        "verify": lambda: "each GGUF against the merged model in llama.cpp, and one sample answer",
    }[stage.name]()


def run_stage(stage, stages: dict, resume: bool) -> None:
    """Run one stage through its Python API, with a progress bar for the training stages."""
    from lowrank.cli.progress import StepBar

    config = stage.config
    if hasattr(config, "resume"):
        config.resume = resume
    if stage.name == "task":
        from lowrank.tasks import write_task

        write_task(stage.dir, config.name, config.seed, config.length, config.sft_errors, **config.sizes)
    elif stage.name == "pairs":
        from lowrank.pairs import make_pairs

        with StepBar("pairs", unit="batch") as bar:
            make_pairs(config, on_batch=lambda record: bar(record, pairs=str(record["pairs"])))
    elif stage.name in SHOWN:
        from lowrank.dpo import train_dpo
        from lowrank.grpo import train_grpo
        from lowrank.ppo import train_ppo
        from lowrank.pretrain import train_base
        from lowrank.reward import train_reward
        from lowrank.sft import train_sft

        train = {"pretrain": train_base, "sft": train_sft, "reward": train_reward, "ppo": train_ppo, "dpo": train_dpo,
                 "grpo": train_grpo}[stage.name]
        with StepBar(stage.name) as bar:
            train(config, on_step=lambda record: bar(record, **SHOWN[stage.name](record)))
    elif stage.name == "merge":
        from lowrank.quantize.merge import merge

        merge(config)
    elif stage.name == "export":
        from lowrank.cli.export import export_and_report

        export_and_report(config, stages["merge"].dir)  # prints each path and the fit report
    elif stage.name == "verify":
        from lowrank.export.verify_report import format_report
        from lowrank.report import run_verify

        run_verify(stage, stages, on_report=lambda report: print(format_report(report), flush=True))


def run(args: argparse.Namespace) -> int:
    import warnings

    from lowrank import locks, pipeline
    from lowrank.pipeline import state as pipeline_state
    from lowrank.report import collect_results, measure_task_accuracy, plot_curves

    config, listed, source = build_pipeline_config(args)
    stages = pipeline.plan_stages(config, listed, source)
    check_inputs(config, stages)
    out = pipeline.output_path(config)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output dir is a file; choose another --output-dir")
    locks.hold(out)  # one `lowrank run` per output dir; its stages take their own dirs' locks too
    state = pipeline_state.read_state(out)
    actions = pipeline_state.decide(stages, state, config.overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create the output dir ({e.strerror})") from None
    # bitsandbytes warns once per int8 matmul on the CPU that it casts fp32 inputs to fp16.
    warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")
    by_name = {s.name: s for s in stages}
    ran = any(action != "skip" for action in actions)
    if ran:
        to_run = sum(action == "run" for action in actions)
        print(f"lowrank run{'' if source == 'lowrank run' else ' ' + source} -> {out}: {to_run} of {len(stages)} "
              "stages to run", flush=True)
    for number, (stage, action) in enumerate(zip(stages, actions), 1):
        prefix = f"[{number}/{len(stages)}] {stage.name}"
        if action == "skip":
            if ran:
                print(f"{prefix}: done (skipped)", flush=True)
            continue
        started = time.perf_counter()
        if action == "run":
            resume = pipeline_state.may_resume(stage, state)
            print(f"{prefix}: {describe(stage)}" + (" (resuming from its newest checkpoint)" if resume else ""),
                  flush=True)
            pipeline_state.clear_output(stage)
            state["stages"][stage.name] = {"settings": pipeline_state.settings(stage), "status": "started"}
            pipeline_state.write_state(out, state)
            run_stage(stage, by_name, resume)
        else:
            print(f"{prefix}: done; measuring its task accuracy", flush=True)
        if stage.eval_file is not None:
            result = measure_task_accuracy(stage, by_name["task"])
            print(f"  task accuracy on {result['problems']} held-out problems: {result['accuracy']:.1%}", flush=True)
            if result.get("practice_accuracy") is not None:
                print(base_skill_line(result["practice_accuracy"]), flush=True)
        record = state["stages"][stage.name]
        seconds = (record.get("seconds") or 0) if action == "eval" else 0
        record.update(status="done", seconds=round(seconds + time.perf_counter() - started, 1))
        pipeline_state.write_state(out, state)
    if ran or not (out / pipeline.CURVES).is_file():
        plot_curves(out, stages)
    results = collect_results(stages, state)
    print(format_table(results, source, out, ran))
    return 1 if any(g.get("passed") is False for g in results.get("gguf", [])) else 0


# Below this share of held-out problems answered right in the practice format, the base has not learned the
# task: SFT then teaches the chat format around answers that are wrong, and no RL stage finds a right one
# to reinforce.
BASE_SKILL_FLOOR = 0.1


def base_skill_line(share: float) -> str:
    """The base's accuracy in its practice format, with a warning when it is too low for SFT and RL to build on."""
    line = f"  in its practice format (the skill without the chat): {share:.1%}"
    if share < BASE_SKILL_FLOOR:
        line += ("\n  warning: the base has not learned the task, and SFT and RL shape a skill the base has, they do "
                 "not teach one: give them a base that has it (more pretraining, a larger model, an easier task length)")
    return line


# --- the table -------------------------------------------------------------------------------------

def _num(value, spec: str = ".3f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def _one_line(text: str, limit: int = 90) -> str:
    text = text.strip().replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def format_table(results: dict, source: str, out: Path, ran: bool) -> str:
    import shlex

    recipe = "" if source == "lowrank run" else f" {source}"
    lines = ["", f"lowrank run{recipe} -> {out}" + ("" if ran else "  (every stage finished earlier: nothing ran)")]

    def row(label: str, text: str) -> None:
        lines.append(f"  {label:<16} {text}")

    for name, label, unit in (("pretrain", "pretrain", "documents"), ("sft", "SFT", "examples")):
        if f"{name}_loss" in results:
            before, after = results[f"{name}_loss"]
            row(label, f"held-out loss {_num(before)} -> {_num(after)}  ({results[f'{name}_eval_examples']} held-out {unit})")
    accuracy = results.get("accuracy") or {}
    if accuracy:
        labels = {"base": "base", "sft": "after SFT", "ppo": "after PPO", "dpo": "after DPO", "grpo": "after GRPO"}
        parts = [f"{labels[k]} {_num((v or {}).get('accuracy'), '.1%')}" for k, v in accuracy.items()]
        practice = (accuracy.get("base") or {}).get("practice_accuracy")
        if practice is not None:
            parts[0] += f" (practice format {practice:.1%})"
        problems = next((v["problems"] for v in accuracy.values() if v), "?")
        row("task accuracy", ",  ".join(parts) + f"  (greedy exact match, {problems} held-out problems)")
    if "pairs" in results:
        p = results["pairs"]
        row("pairs", f"{p.get('pairs')} from {p.get('prompts')} prompts; {p.get('rejected_from_policy')} rejected "
                     f"answers are the SFT policy's own (its samples' mean reward {_num(p.get('mean_sample_reward'))})")
    if "reward" in results:
        r = results["reward"]
        others = (f"; the ensemble's other {len(r['members'])}: " + ", ".join(_num(a, '.1%') for a in r["members"])
                  if r.get("members") else "")
        row("reward model", f"pairwise accuracy {_num(r['accuracy'], '.1%')} on {r['pairs']} held-out pairs, "
                            f"margin {_num(r['margin'])}{others}")
    def held_out_kl(r: dict) -> str:
        return f"; KL to SFT on held-out prompts {_num(r['held_out_kl'])} nats" if r.get("held_out_kl") is not None else ""

    def held_out_score(r: dict, label: str) -> None:
        if r.get("held_out_score"):
            h = r["held_out_score"]
            row("", f"reward-model score of the greedy answers to the held-out prompts: SFT {_num(h['reference'])}, "
                    f"{label} {_num(h['policy'])}")

    if "ppo" in results:
        p = results["ppo"]
        row("PPO", f"mean reward {_num(p['score'][0])} -> {_num(p['score'][1])} (first / last {p['window']} of "
                   f"{p['steps']} steps), KL to the reference {_num(p['kl'])} nats (last {p['window']})"
                   + held_out_kl(p))
        held_out_score(p, "PPO")
        if p.get("property_rate") and None not in p["property_rate"]:
            row("", "responses with \"please\" (what the shipped preferences reward) "
                    f"{p['property_rate'][0]:.0%} -> {p['property_rate'][1]:.0%}")
    if "dpo" in results:
        d = results["dpo"]
        row("DPO", f"held-out pairwise accuracy {_num(d['accuracy'][0], '.1%')} -> {_num(d['accuracy'][1], '.1%')}, "
                   f"margin {_num(d['margin'][0])} -> {_num(d['margin'][1])} ({d['pairs']} pairs)" + held_out_kl(d))
    if "grpo" in results:
        g = results["grpo"]
        row("GRPO", f"mean reward {_num(g['score'][0])} -> {_num(g['score'][1])} (first / last {g['window']} of "
                    f"{g['steps']} steps), KL to the reference {_num(g['kl'])} nats (last {g['window']})"
                    + held_out_kl(g))
        held_out_score(g, "GRPO")
    gguf = results.get("gguf", [])
    width = max((len(Path(g["path"]).name) for g in gguf), default=0)
    for i, g in enumerate(gguf):
        size = f"{g['bytes'] / 2**20:7.1f} MiB" if g.get("bytes") is not None else "    missing"
        verdict = {True: "verify PASS", False: "verify FAIL", None: "not verified"}[g.get("passed")]
        problem = f" ({g['problems'][0]})" if g.get("problems") else ""
        row("GGUF" if i == 0 else "", f"{Path(g['path']).name:<{width}} {size}  {verdict}{problem}")
    sample = results.get("sample")
    if sample:
        row("llama.cpp says", f"{Path(sample['file']).name}, greedy, {sample['source']}:")
        for message in sample["messages"]:
            lines.append(f"    {message['role']:<10} {_one_line(message['content'])}")
        verdict = ("" if sample["correct"] is None else "  (correct)" if sample["correct"]
                   else f"  (wrong: expected {_one_line(str(sample['expected']), 40)})")
        lines.append(f"    {'assistant':<10} {_one_line(sample['answer']) or '(empty answer)'}{verdict}")
    seconds = {k: v for k, v in results["seconds"].items() if isinstance(v, (int, float))}
    if seconds:
        row("time", ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + f"; total {sum(seconds.values()):.0f} s")
    if (out / "curves.png").is_file():
        row("curves", str(out / "curves.png"))
    files = [g["path"] for g in results.get("gguf", [])]
    if files:
        chat = next((f for f in files if f.endswith("-q4_k_m.gguf")), files[-1])
        row("chat with it", f"lowrank chat {shlex.quote(chat)}")
    return "\n".join(lines)
