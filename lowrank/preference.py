"""What the two stages that train on preference pairs, reward (lowrank/reward.py) and DPO
(lowrank/dpo.py), share around their loops: the pairs read, rendered in the SFT adapter's chat
template, tokenized and split; the finished adapter and its lowrank.json.

Each stage keeps what differs: its own checks, how a pair becomes tokens (``tokenize``), its model
and its loop.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lowrank import checkpoints, locks, loop, runrecord, train
from lowrank.config import config_to_dict


def read_sft_record(config) -> runrecord.RunRecord | None:
    """The lowrank.json of ``config.sft_adapter`` (a finished SFT run on ``config.model``), or None without one."""
    if not config.sft_adapter:
        return None
    return runrecord.read_adapter(config.sft_adapter, stage="sft", what="SFT adapter", base=config.model)


@dataclass
class PairInputs:
    """Everything a preference stage reads before it loads the model: all checked."""
    model_path: str
    tokenizer: Any
    template_name: str
    template: str
    source: str  # the pairs' file or dataset, as given
    examples: list[dict]  # the tokenized pairs (the stage's form)
    train_examples: list[dict]
    eval_examples: list[dict]


def load_pair_inputs(config, source: str, model_path: str, sft_record: runrecord.RunRecord | None,
                     tokenize: Callable[[Any, str, list[dict], int], list[dict]]) -> PairInputs:
    """Read the pairs of ``source`` and render them in the SFT adapter's recorded chat template (else
    ``config.template``: auto, tokenizer or a built-in name); ``tokenize(tokenizer, template, pairs,
    max_length)`` makes the stage's examples, split by ``loop.split_pairs`` (seeded by ``config.seed``)."""
    from lowrank.data import load_preference_pairs
    from lowrank.models import load_tokenizer
    from lowrank.templates import resolve_template

    tokenizer = load_tokenizer(model_path)
    if sft_record is not None and sft_record.chat_template:
        template_name, template = sft_record.chat_template.name, sft_record.chat_template.jinja
    else:
        template_name, template = resolve_template(tokenizer, config.template)
    examples = tokenize(tokenizer, template, load_preference_pairs(source), config.max_length)
    train_examples, eval_examples = loop.split_pairs(examples, config.eval_fraction, config.seed)
    return PairInputs(model_path, tokenizer, template_name, template, source, examples, train_examples, eval_examples)


def finish_run(accelerator, peft_model, out_dir: Path, stage: str, config, inputs: PairInputs, *, metrics: dict,
               extra: dict, adapter_name: str = "default") -> Path:
    """Write the trained adapter and its lowrank.json (the pairs' source, digest and counts) on the main
    process, drop the checkpoints (the run is finished), release the output dir; return it."""
    if accelerator.is_main_process:
        record = runrecord.RunRecord(
            stage=stage, base=runrecord.BaseRef.of(config.model, inputs.model_path),
            chat_template=runrecord.ChatTemplate(inputs.template_name, inputs.template),
            data={"source": inputs.source, "digest": train.data_digest(inputs.source), "pairs": len(inputs.examples),
                  "train_pairs": len(inputs.train_examples), "eval_pairs": len(inputs.eval_examples)},
            config=config_to_dict(config),
            seed=config.seed,
            metrics=metrics,
            extra=extra,
        )
        train.write_adapter(peft_model, out_dir, record, adapter_name=adapter_name)
        shutil.rmtree(out_dir / checkpoints.CHECKPOINTS, ignore_errors=True)  # resume data is done
    accelerator.wait_for_everyone()
    locks.release(out_dir)  # the output is complete
    return out_dir
