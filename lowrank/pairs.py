"""On-policy preference pairs: the SFT policy's own answers, ranked by a checker.

InstructGPT's reward model learns from people ranking the SFT model's own outputs, so it sees the
mistakes the policy it will judge actually makes. Where answers can be checked, a program can do
the ranking: `lowrank pairs` samples ``samples_per_prompt`` answers from the SFT adapter to each
prompt, scores them with reward functions (lowrank.rewards: the synthetic tasks' ``exact``
checker, ``numeric``, or the user's ``file.py:function``) and writes one pair per prompt:

- chosen: the best-scoring candidate, among the samples and the record's own ``chosen`` response
  when it has one (the record's wins a tie: it is the curated text);
- rejected: the lowest-scoring sample, when it scores below the chosen by more than ``margin``;
  otherwise the record's own ``rejected`` when that does; otherwise the prompt gives no pair.

So a prompts file makes pairs from samples alone (it needs ``samples_per_prompt`` >= 2 for a
pair), and a pairs file (prompt, chosen, rejected) gets the policy's wrong answers in place of its
own rejected ones wherever the policy errs. One pair per prompt keeps each chosen text to one
pair, as in the pairs files the reward stage is usually given.

The policy is an SFT adapter, or a PPO, GRPO or DPO one: a reward model trained on the pairs of
the policy RL produced learns the mistakes that policy makes, which the SFT policy's pairs never
showed it (another round of the loop).

Sampled text is stripped at both ends before it is scored or written: the chat template's own
spacing before the end-of-turn marker (llama2's ``" </s>"``) comes back in the decoded answer, and
training renders every response with that spacing again; a rejected answer that kept it would
differ from every chosen one in a way a reward model learns instead of the answer.

The output dir holds ``pairs.jsonl`` (``prompt``, ``chosen``, ``rejected``, ``rejected_from``:
"policy" or "record", the record's other fields kept) and, written last, lowrank.json with the
counts, with ``metrics.jsonl`` (one record per generate call, also sent to ``--report-to``). The
reward, DPO and pipeline stages read ``pairs.jsonl`` like any pairs file.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lowrank import locks, runrecord
from lowrank.errors import UserError
from lowrank.fields import (QUANT_OF_SFT_ADAPTER, BaseModelFields, RewardFunctionFields, SamplingFields, restate,
                            stage_config)
from lowrank.metrics import MetricsLog

log = logging.getLogger(__name__)

PAIRS_FILE = "pairs.jsonl"


@stage_config
class PairsConfig(SamplingFields, RewardFunctionFields, BaseModelFields):
    """Every knob of `lowrank pairs`."""

    sft_adapter: str = field(default="", metadata={"help": "the policy whose answers are ranked: an SFT adapter dir, "
                                                           "or a PPO, GRPO or DPO one for another round of pairs "
                                                           "(default: the base itself)"})
    prompts: str = field(default="", metadata={"help": "prompts (prompt + fields) or pairs (prompt, chosen, rejected): "
                                                       "JSON/JSONL file or hub dataset"})
    samples_per_prompt: int = field(default=2, metadata={"help": "answers sampled per prompt"})
    margin: float = field(default=0.0, metadata={"help": "a pair needs the chosen to score more than this above "
                                                         "the rejected"})
    batch_size: int = field(default=64, metadata={"help": "answers sampled per generate call"})
    # the shared fields (lowrank.fields) as pairs states them
    output_dir = restate(help="where pairs.jsonl and its lowrank.json go")
    quant = restate(help=QUANT_OF_SFT_ADAPTER)
    seed = restate(help="seed of the sampling")
    overwrite = restate(help="replace finished pairs in output_dir")
    prompt_field = restate(help="field holding the prompt (default: prompt, else messages)")
    rewards = restate(help="reward functions that rank the answers: exact, numeric or file.py:function")
    reward_weights = restate(help="weight of each reward function (default: 1 each)")
    max_new_tokens = restate(64, help="answer length limit")


def check_config(config: PairsConfig) -> None:
    """Refuse settings that cannot work, each naming its flag; nothing is loaded yet."""
    for name in ("samples_per_prompt", "max_new_tokens", "batch_size"):
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(config, name)})")
    if not (config.margin >= 0 and math.isfinite(config.margin)):
        raise UserError(f"--margin must be 0 or more (got {config.margin})")
    if not config.temperature > 0:
        raise UserError(f"--temperature must be above 0 (got {config.temperature}): the answers are sampled")
    if not config.rewards:
        raise UserError("no reward: give --rewards (e.g. exact, numeric, my_rewards.py:score) to rank the answers")
    for name in ("prompts", "output_dir"):
        if not getattr(config, name):
            raise UserError(f"no {name.replace('_', ' ')}: give --{name.replace('_', '-')}")


# --------------------------------------------------------------------------------------------
# Choosing the pair (pure)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    text: str
    score: float
    origin: str  # "policy" (a sample) or "record" (the record's own chosen or rejected)


def choose_pair(samples: list[Candidate], chosen: Candidate | None, rejected: Candidate | None,
                margin: float = 0.0) -> tuple[Candidate, Candidate] | None:
    """(chosen, rejected) for one prompt, by the rules in the module docstring, or None for no pair.

    ``samples`` are the policy's answers; ``chosen`` and ``rejected`` the record's own responses
    (None when it has none). Among samples of equal score the first sampled wins, so the result
    depends on the sampling seed only.
    """
    best = chosen
    for sample in samples:
        if best is None or sample.score > best.score:
            best = sample
    if best is None:
        return None
    worst = min(samples, key=lambda s: s.score, default=None)
    if worst is not None and worst.score < best.score - margin and worst.text != best.text:
        return best, worst
    if rejected is not None and rejected.score < best.score - margin and rejected.text != best.text:
        return best, rejected
    return None


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def _record_response(value) -> str | None:
    """A pairs record's chosen/rejected as text (a conversation's assistant turns joined), or None."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, list):
        text = "\n".join(str(m.get("content", "")) for m in value if isinstance(m, dict) and m.get("role") == "assistant")
        return text.strip() or None
    return None


def make_pairs(config: PairsConfig, on_batch: Callable[[dict], None] | None = None) -> Path:
    """Sample, rank and write the pairs as configured; return the output dir.

    ``on_batch`` gets each generate call's record (step, max_steps, prompts and pairs so far, the
    batch's mean sample_reward and the share of answers that ended); the same go to metrics.jsonl.
    """
    from peft import PeftModel

    from lowrank import train
    from lowrank.config import config_to_dict
    from lowrank.data import load_prompt_rows
    from lowrank.models import load_base_model
    from lowrank.rewards import check_weights, load_reward_function, prompt_text
    from lowrank.rollout import context_length, decode_responses, load_policy_inputs, sample, tokenize_prompts
    from lowrank.templates import stop_token_ids

    check_config(config)
    weights = check_weights(config.rewards, [float(w) for w in config.reward_weights])
    functions = [load_reward_function(spec) for spec in config.rewards]
    # Any stage that makes a policy adapter can answer: SFT's for the first round, an RL or preference
    # stage's for the next (InstructGPT collected comparisons of its current policies' outputs, not only of SFT's).
    model_path, tokenizer, (template_name, template), _, _ = load_policy_inputs(config, log, runrecord.POLICY_STAGES)
    rows = load_prompt_rows(config.prompts, config.prompt_field)
    ids = tokenize_prompts(tokenizer, template, [row.prompt_messages for row in rows], source=config.prompts,
                           max_new_tokens=config.max_new_tokens, context=context_length(model_path))
    out = train.prepare_output_dir(config.output_dir, config.overwrite)
    metrics_log = MetricsLog(out, report_to=config.report_to, stage="pairs", config=config_to_dict(config))
    train.seed_everything(config.seed)
    model = load_base_model(model_path, config.quant, gradient_checkpointing=False)
    if config.sft_adapter:
        model = PeftModel.from_pretrained(model, config.sft_adapter)
    model.eval()
    device = next(model.parameters()).device
    stop_ids = stop_token_ids(tokenizer, template)
    k = config.samples_per_prompt
    per_call = max(1, config.batch_size // k)  # prompts per generate call
    texts_of = [prompt_text(row.prompt_messages) for row in rows]
    pairs, counts = [], {"prompts": len(rows), "samples": 0, "ended": 0, "pairs": 0, "rejected_from_policy": 0,
                         "no_pair": 0}
    score_sum = 0.0
    for start in range(0, len(rows), per_call):
        part = list(range(start, min(start + per_call, len(rows))))
        expanded = [i for i in part for _ in range(k)]
        torch.manual_seed(config.seed * 100003 + start)
        samples = sample(model, [ids[i] for i in expanded], max_new_tokens=config.max_new_tokens,
                         temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                         stop_ids=stop_ids, pad_id=tokenizer.pad_token_id, device=device)
        answers = [text.strip() for text in decode_responses(tokenizer, samples)]
        # The records' own chosen/rejected responses are scored in the same call as the samples.
        own = [(n, key, text) for n, i in enumerate(part) for key in ("chosen", "rejected")
               if (text := _record_response(rows[i].fields.get(key)))]
        scored = expanded + [part[n] for n, _, _ in own]
        every = _score(functions, weights, [texts_of[i] for i in scored], answers + [text for _, _, text in own],
                       [rows[i].fields for i in scored])
        scores = every[:len(answers)]
        records = [{} for _ in part]
        for (n, key, text), score in zip(own, every[len(answers):]):
            records[n][key] = Candidate(text, score, "record")
        counts["samples"] += len(answers)
        counts["ended"] += int(samples.ended.sum())
        score_sum += sum(scores)
        for n, i in enumerate(part):
            pair = _pair_for(rows[i], answers[n * k:(n + 1) * k], scores[n * k:(n + 1) * k], records[n],
                             config.margin)
            if pair is None:
                counts["no_pair"] += 1
                continue
            pairs.append(pair)
            counts["rejected_from_policy"] += pair["rejected_from"] == "policy"
        record = {"step": start // per_call + 1, "max_steps": math.ceil(len(rows) / per_call), "prompts": part[-1] + 1,
                  "pairs": len(pairs), "sample_reward": sum(scores) / len(scores),
                  "ended": samples.ended.float().mean().item()}
        metrics_log.log(record)
        if on_batch is not None:
            on_batch(record)
    metrics_log.close()
    if not pairs:
        raise UserError(f"{config.prompts}: no prompt gave a pair (every answer scored the same as the best); "
                        "raise --samples-per-prompt or give pairs with a rejected response")
    counts["pairs"] = len(pairs)
    counts["mean_sample_reward"] = score_sum / max(counts["samples"], 1)
    _write_lines(out / PAIRS_FILE, pairs)
    meta = runrecord.RunRecord(
        stage="pairs", base=runrecord.BaseRef.of(config.model, model_path),
        chat_template=runrecord.ChatTemplate(template_name, template),
        data={"source": config.prompts, "digest": train.data_digest(config.prompts), "prompts": len(rows)},
        config=config_to_dict(config), seed=config.seed, metrics=counts,
        extra={"sft_adapter": config.sft_adapter or None, "rewards": [f.name for f in functions],
               "pairs_file": str(out / PAIRS_FILE)},
    )
    runrecord.write(out, meta)
    locks.release(out)
    log.info("%s: %d pairs from %d prompts; %d rejected answers are the policy's own, %d prompts gave none",
             out / PAIRS_FILE, len(pairs), len(rows), counts["rejected_from_policy"], counts["no_pair"])
    return out


def _score(functions, weights, prompts: list[str], completions: list[str], fields: list[dict]) -> list[float]:
    from lowrank.rewards import combine_rewards, gather_fields

    summed, _ = combine_rewards(functions, weights, prompts, completions, gather_fields(fields))
    return [float(s) for s in summed]


def _pair_for(row, answers: list[str], scores: list[float], record: dict[str, Candidate],
              margin: float) -> dict | None:
    """The pair record of one prompt row, or None (see :func:`choose_pair`); ``record`` holds the row's own
    scored "chosen" / "rejected" responses, where it has them."""
    candidates = [Candidate(text, score, "policy") for text, score in zip(answers, scores) if text]
    chosen = choose_pair(candidates, record.get("chosen"), record.get("rejected"), margin)
    if chosen is None:
        return None
    best, worst = chosen
    fields = {key: value for key, value in row.fields.items() if key not in ("chosen", "rejected")}
    prompt_value = row.prompt_messages[0]["content"] if len(row.prompt_messages) == 1 else row.prompt_messages
    return {"prompt": prompt_value, "chosen": best.text, "rejected": worst.text, "rejected_from": worst.origin,
            **fields}


def _write_lines(path: Path, records: list[dict]) -> None:
    from lowrank.files import write_text_atomic

    try:
        write_text_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    except OSError as e:
        raise UserError(f"{path}: cannot write the pairs ({e.strerror})") from None
