"""Scoring a model's answers to a task's held-out problems (lowrank.tasks writes them): exact match.

:func:`is_correct` and :func:`task_accuracy` score a model's greedy answers in the chat template
exactly as SFT renders it (lowrank.data.tokenize_prompt). :func:`practice_answers` are a base's
answers in the practice format it was pretrained on (``sort: q d m a =``): whether it has the skill
at all, before any chat. SFT and RL shape a skill the base has; they do not teach one it lacks.
"""

from __future__ import annotations

from lowrank.errors import UserError


def normalise_answer(text: str) -> str:
    """A response as exact-match scoring compares it: cut at the first end-of-turn marker, whitespace collapsed."""
    from lowrank.templates import END_OF_TURN_MARKERS

    for marker in END_OF_TURN_MARKERS:  # a response is cut at the first one
        text = text.split(marker, 1)[0]
    return " ".join(text.split())


def is_correct(record: dict, response: str) -> bool:
    """True when ``response`` (generated assistant text) is the record's answer, up to whitespace.

    Text after an end-of-turn marker (``</s>``, ``<|eot_id|>``, ...) is ignored; anything else
    the model adds (a second line, another problem) makes the answer wrong.
    """
    return normalise_answer(response) == normalise_answer(str(record["output"]))


def prompt_messages(record: dict) -> list[dict]:
    """The messages before the answer, exactly as SFT builds them from an Alpaca record."""
    from lowrank.data import to_messages

    messages = to_messages(record, "task record")
    return messages[:-1]


def _greedy(model, tokenizer, prompts: list[list[int]], stop_ids, *, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations of token-id ``prompts`` (left-padded batches), decoded without special tokens."""
    import torch

    from lowrank.data import left_pad

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    responses: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            input_ids, attention_mask = left_pad(chunk, pad_id)  # every answer starts in the same column
            width = input_ids.shape[1]
            with torch.no_grad():
                out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                     do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                                     pad_token_id=pad_id, use_cache=True,
                                     # greedy: no sampling settings from the model's generation_config
                                     temperature=None, top_p=None, top_k=None)
            responses += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return responses


def generate_answers(model, tokenizer, template: str, records: list[dict], *, max_new_tokens: int = 24,
                     batch_size: int = 64) -> list[str]:
    """Greedy responses to each record's prompt (left-padded batches, the chat template as in SFT)."""
    from lowrank.data import tokenize_prompt
    from lowrank.templates import stop_token_ids

    prompts = [tokenize_prompt(tokenizer, template, prompt_messages(r)) for r in records]
    return _greedy(model, tokenizer, prompts, stop_token_ids(tokenizer, template), max_new_tokens=max_new_tokens,
                   batch_size=batch_size)


def practice_answers(model, tokenizer, records: list[dict], *, max_new_tokens: int = 24,
                     batch_size: int = 64) -> list[str]:
    """Greedy continuations of each record's ``practice`` prompt, as a pretraining document starts (the
    tokenizer's BOS, no chat template), each cut at its first line break: the base's own answer (a base
    pretrained on documents of one problem ends there with EOS; one that saw several a document, as task
    files before version 7 had, goes on to the next problem)."""
    prompts = [tokenizer(r["practice"])["input_ids"] for r in records]
    texts = _greedy(model, tokenizer, prompts, tokenizer.eos_token_id, max_new_tokens=max_new_tokens,
                    batch_size=batch_size)
    return [text.split("\n", 1)[0] for text in texts]


def task_accuracy(model, tokenizer, template: str, records: list[dict], *, max_new_tokens: int = 24,
                  batch_size: int = 64) -> float:
    """Share of ``records`` the model answers exactly right, greedily, in the chat ``template``.

    ``model`` is a transformers causal LM or a PeftModel (its active adapter is used).
    """
    if not records:
        raise UserError("task accuracy: no records to score")
    responses = generate_answers(model, tokenizer, template, records, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size)
    return sum(is_correct(r, text) for r, text in zip(records, responses)) / len(records)
