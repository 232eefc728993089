"""What `lowrank run` measures and shows: each model's accuracy on the task's held-out split, the
verify stage (every GGUF checked against the merged model, one held-out prompt answered by
llama.cpp), the numbers of the final table read back from the files the stages wrote, and
curves.png.

Every measurement is written to a JSON file beside what it measures (``task_eval.json``,
``gguf/verify.json``) when it is made, so the table of a later run is read from files: no model is
loaded to print it again.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from lowrank import runrecord
from lowrank.files import check_weights_dir
from lowrank.pipeline import CURVES, POLICY_STAGES, RL_STAGES, VERIFY_FILE, Stage
from lowrank.pipeline.state import gguf_paths, write_json

EXAMPLES_KEPT = 5  # answers kept in task_eval.json, to see what the model says


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


# --- task accuracy -------------------------------------------------------------------------------

def measure_task_accuracy(stage: Stage, task: Stage) -> dict:
    """Greedy exact-match accuracy on the task's held-out problems of the model ``stage`` made.

    sft/ppo/dpo/grpo: the base with the stage's adapter, in the template its lowrank.json records;
    pretrain/task: the plain base (Stage.evaluates), in the template SFT trains it in; a pretrained base
    also in the task's practice format (``practice_accuracy``: whether it has the skill at all). Written to
    ``stage.eval_file`` and returned. For ppo/dpo/grpo it also records ``kl_to_reference``, the KL
    of the stage's policy to the SFT adapter on the same held-out prompts (rollout.kl_to_reference).
    """
    from lowrank.data import load_records
    from lowrank.models import load_base_model, load_tokenizer
    from lowrank.task_scoring import generate_answers, is_correct, practice_answers, prompt_messages
    from lowrank.templates import resolve_template
    from lowrank.tiny import resolve_model_name

    eval_data = str(task.dir / "eval.jsonl")
    records = load_records(eval_data)
    adapter = stage.dir if stage.name in POLICY_STAGES else None
    if adapter is not None:
        model_id, quant = stage.config.model, stage.config.quant
        template = runrecord.read(adapter).chat_template.jinja
    else:
        model_id, quant = stage.evaluates["model"], stage.evaluates["quant"]
    model_path = resolve_model_name(model_id)
    tokenizer = load_tokenizer(model_path)
    if adapter is None:
        name = stage.evaluates.get("template")
        template = resolve_template(tokenizer, None if name in ("", "auto") else name)[1]
    model = load_base_model(model_path, quant, gradient_checkpointing=False)
    if adapter is not None:
        from peft import PeftModel

        check_weights_dir(adapter)
        model = PeftModel.from_pretrained(model, str(adapter))
    answers = generate_answers(model, tokenizer, template, records, max_new_tokens=task.config.eval_max_new_tokens,
                               batch_size=task.config.eval_batch_size)
    correct = [is_correct(r, a) for r, a in zip(records, answers)]
    result = {
        "model": model_id, "adapter": str(adapter) if adapter else None, "eval_data": eval_data,
        "problems": len(records), "correct": sum(correct), "accuracy": sum(correct) / len(records),
        "examples": [{"prompt": prompt_messages(r)[-1]["content"], "answer": a, "expected": r["output"], "correct": c}
                     for r, a, c in list(zip(records, answers, correct))[:EXAMPLES_KEPT]],
    }
    # Only a base pretrained on the practice text is asked in its format: another base (a task stage with no
    # pretrain stage) never saw it. Task files written before the practice prompts have none.
    if stage.name == "pretrain" and all("practice" in r for r in records):
        practice = practice_answers(model, tokenizer, records, max_new_tokens=task.config.eval_max_new_tokens,
                                    batch_size=task.config.eval_batch_size)
        right = [is_correct(r, a) for r, a in zip(records, practice)]
        result["practice_accuracy"] = sum(right) / len(records)
        result["practice_examples"] = [{"prompt": r["practice"], "answer": a, "correct": c}
                                       for r, a, c in list(zip(records, practice, right))[:EXAMPLES_KEPT]]
    reference = getattr(stage.config, "sft_adapter", None) if stage.name in RL_STAGES else None
    if reference:
        from lowrank.rollout import kl_to_reference
        from lowrank.templates import stop_token_ids

        check_weights_dir(reference)
        model.load_adapter(str(reference), adapter_name="reference")
        result["kl_to_reference"] = kl_to_reference(
            model, tokenizer, template, [prompt_messages(r) for r in records], policy="default", reference="reference",
            max_new_tokens=task.config.eval_max_new_tokens, stop_ids=stop_token_ids(tokenizer, template),
            batch_size=task.config.eval_batch_size)
    reward = getattr(stage.config, "reward_adapter", None) if reference else None
    if reward:
        result["reward_score"] = _held_out_scores(model, tokenizer, template, records, answers, reward, model_id,
                                                  task.config)
    write_json(stage.eval_file, result)
    return result


def _held_out_scores(model, tokenizer, template: str, records: list[dict], answers: list[str], reward: str,
                     model_id: str, task_config) -> dict:
    """The reward model's mean score of the policy's greedy answers to the held-out prompts, and of the
    reference's (SFT's) answers to the same prompts: whether RL raised what its reward measures, free of
    the prompt-to-prompt spread that a training step's mean score carries."""
    from lowrank.scoring import score_texts, using_adapter
    from lowrank.task_scoring import generate_answers, prompt_messages

    with using_adapter(model, "reference"):
        reference_answers = generate_answers(model, tokenizer, template, records,
                                             max_new_tokens=task_config.eval_max_new_tokens,
                                             batch_size=task_config.eval_batch_size)
    prompts = [prompt_messages(r) for r in records]
    # Into the model already loaded (its base with the policy and reference adapters), not a second base.
    scores = score_texts(reward, model_id, list(zip(prompts + prompts, answers + reference_answers)),
                         batch_size=task_config.eval_batch_size, model=model)
    n = len(records)
    return {"policy": sum(scores[:n]) / n, "reference": sum(scores[n:]) / n, "reward_adapter": str(reward)}


# --- the verify stage ------------------------------------------------------------------------------

def sample_prompt(stages: dict[str, Stage]) -> tuple[list[dict], dict | None, str]:
    """(messages, the task record or None, where it comes from) of the sample conversation."""
    from lowrank.data import load_prompts, load_records
    from lowrank.task_scoring import prompt_messages

    if "task" in stages:
        record = load_records(str(stages["task"].dir / "eval.jsonl"))[0]
        return prompt_messages(record), record, "held-out task problem 1"
    if "ppo" in stages:
        return load_prompts(stages["ppo"].config.prompts)[0], None, "PPO prompt 1"
    return [{"role": "user", "content": "Name a prime number."}], None, "a fixed question"


def answer_with_llama_cpp(path: Path, messages: list[dict], max_tokens: int, threads: int) -> str:
    """llama.cpp's greedy answer, the conversation formatted with the file's own tokenizer.chat_template.

    llama-cpp-python's chat completion renders a GGUF's template (Jinja2ChatFormatter) and stops at
    its EOS, as `lowrank verify` checks it does; temperature 0 is greedy, and repeat_penalty 1 turns
    off its default penalty, so the answer is the model's argmax at each step. Loaded without
    load_llama's logits_all, which makes each generated token copy every position's logits (50x
    slower here).
    """
    from llama_cpp import Llama

    from lowrank.export.llama import plain_cpu_weights, silence_llama_cpp

    silence_llama_cpp()
    with plain_cpu_weights():  # see lowrank.export.llama: AMX VMs fault on llama.cpp's AMX buffers
        llm = Llama(str(path), n_ctx=1024, n_threads=threads, verbose=False)
    try:
        out = llm.create_chat_completion(messages=messages, temperature=0.0, repeat_penalty=1.0,
                                         max_tokens=max_tokens, seed=0)
    finally:
        llm.close()
    return out["choices"][0]["message"]["content"] or ""


def run_verify(stage: Stage, stages: dict[str, Stage], on_report=None) -> dict:
    """Check every exported GGUF against the merged model and answer one prompt with the Q4_K_M file
    (else the smallest); write gguf/verify.json and return it. ``on_report`` gets each VerifyReport."""
    from lowrank.export.verify import load_hf_model, verify_gguf
    from lowrank.task_scoring import is_correct

    merged = stages["merge"].dir
    record = runrecord.read_optional(merged)
    template = record.chat_template.jinja if record and record.chat_template else None
    paths = gguf_paths(stages["export"].config)
    reference = next((p for p in paths if p.name.endswith("-f16.gguf")), None)
    hf_model = load_hf_model(merged)  # loaded once for every file
    files = []
    for path in paths:
        report = verify_gguf(path, merged, chat_template=template, hf_model=hf_model,
                             reference_gguf=reference if path != reference else None,
                             greedy_tokens=stage.config.greedy_tokens, n_threads=stage.config.threads)
        if on_report is not None:
            on_report(report)
        files.append({"path": str(path), "type": report.file_type, "bytes": path.stat().st_size,
                      "passed": report.passed, "problems": report.problems, "report": dataclasses.asdict(report)})
    del hf_model
    chat_file = next((p for p in paths if p.name.endswith("-q4_k_m.gguf")), min(paths, key=lambda p: p.stat().st_size))
    messages, record, source = sample_prompt(stages)
    answer = answer_with_llama_cpp(chat_file, messages, stage.config.sample_max_tokens, stage.config.threads)
    sample = {"file": str(chat_file), "source": source, "messages": messages, "answer": answer,
              "expected": record["output"] if record else None,
              "correct": is_correct(record, answer) if record else None}
    result = {"merged": str(merged), "files": files, "sample": sample}
    write_json(stage.dir / VERIFY_FILE, result)
    return result


# --- the table's numbers, from files --------------------------------------------------------------

def _metrics_records(stage_dir: Path) -> list[dict]:
    try:
        lines = (stage_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def collect_results(stages: list[Stage], state: dict) -> dict:
    """Every number of the final table, read from the files the stages wrote (None where one is missing)."""
    from lowrank.data import sample_property

    by_name = {s.name: s for s in stages}
    meta = {name: runrecord.read_optional(s.dir) for name, s in by_name.items()
            if name in ("pretrain", "sft", "pairs", "reward") + RL_STAGES}
    meta = {name: record for name, record in meta.items() if record is not None}
    results: dict = {"stages": list(by_name),
                     "seconds": {name: (state["stages"].get(name) or {}).get("seconds") for name in by_name}}
    for name in ("pretrain", "sft"):
        if name in meta:
            metrics = meta[name].metrics
            results[f"{name}_loss"] = [metrics.get("initial_eval_loss"), metrics.get("eval_loss")]
            data = meta[name].data
            results[f"{name}_eval_examples"] = data.get("eval_examples", data.get("eval_documents"))
    base = by_name.get("pretrain") or by_name.get("task")
    results["accuracy"] = {label: read_json(s.eval_file) for label, s in
                           [("base", base)] + [(name, by_name.get(name)) for name in POLICY_STAGES]
                           if s is not None and s.eval_file is not None}
    if "pairs" in meta:
        results["pairs"] = dict(meta["pairs"].metrics)
    if "reward" in meta:
        metrics = meta["reward"].metrics
        results["reward"] = {"accuracy": metrics.get("eval_accuracy"), "margin": metrics.get("eval_margin"),
                             "pairs": meta["reward"].data.get("eval_pairs"),
                             "members": meta["reward"].extra.get("member_eval_accuracy") or []}
    for name, key in (("ppo", "score"), ("grpo", "reward")):
        if name not in by_name:
            continue
        records = _metrics_records(by_name[name].dir)
        scores, kls = [r[key] for r in records if key in r], [r["kl"] for r in records if "kl" in r]
        window = max(1, len(scores) // 4)  # one rollout batch's reward is noisy: average a few steps
        held_out = results["accuracy"].get(name) or {}
        results[name] = {"score": [_mean(scores[:window]), _mean(scores[-window:])], "kl": _mean(kls[-window:]),
                         "window": window, "steps": len(scores), "held_out_kl": held_out.get("kl_to_reference"),
                         "held_out_score": held_out.get("reward_score")}
        if name == "ppo" and "task" not in by_name:  # the shipped preferences reward "please": how often rollouts say it
            def rate(chunk):
                texts = [s["response"] for r in chunk for s in r.get("samples", [])]
                return sum(map(sample_property, texts)) / len(texts) if texts else None

            results["ppo"]["property_rate"] = [rate(records[:window]), rate(records[-window:])]
    if "dpo" in meta:
        metrics = meta["dpo"].metrics
        results["dpo"] = {"accuracy": [metrics.get("initial_eval_accuracy"), metrics.get("eval_accuracy")],
                          "margin": [metrics.get("initial_eval_margin"), metrics.get("eval_margin")],
                          "pairs": meta["dpo"].data.get("eval_pairs"),
                          "held_out_kl": ((results["accuracy"].get("dpo") or {}).get("kl_to_reference"))}
    if "verify" in by_name:
        verified = read_json(by_name["verify"].dir / VERIFY_FILE) or {}
        results["gguf"], results["sample"] = verified.get("files", []), verified.get("sample")
    elif "export" in by_name:
        results["gguf"] = [{"path": str(p), "bytes": p.stat().st_size if p.is_file() else None, "passed": None}
                           for p in gguf_paths(by_name["export"].config)]
    return results


# --- curves.png --------------------------------------------------------------------------------------

PANELS = [  # (stage, title, keys of its metrics.jsonl)
    ("pretrain", "pretraining loss", ("loss", "eval_loss")),
    ("sft", "SFT loss", ("loss", "eval_loss")),
    ("reward", "reward-model loss", ("loss", "eval_loss")),
    ("reward", "reward-model pairwise accuracy", ("train_accuracy", "eval_accuracy")),
    ("ppo", "PPO reward (reward-model score)", ("score",)),
    ("ppo", "PPO KL to the reference (nats)", ("kl",)),
    ("dpo", "DPO loss", ("loss",)),
    ("dpo", "DPO held-out pairwise accuracy", ("accuracy", "eval_accuracy")),
    ("grpo", "GRPO reward", ("reward",)),
    ("grpo", "GRPO KL to the reference (nats)", ("kl",)),
]


def plot_curves(out: Path, stages: list[Stage]) -> Path | None:
    """One PNG of the training curves (loss, reward, KL per step), written by rename; None without any."""
    dirs = {s.name: s.dir for s in stages}
    panels = []
    for name, title, keys in PANELS:
        records = _metrics_records(dirs[name]) if name in dirs else []
        lines = {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))] for k in keys}
        lines = {k: points for k, points in lines.items() if points}
        if lines:
            panels.append((title, lines))
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(10, 2.8 * rows), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, panels):
        for key, points in lines.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], label=key,
                    marker="." if len(points) < 50 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(out) / CURVES
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path
