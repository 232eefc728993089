"""Records that start from a prompt: preference pairs (reward model, DPO) and prompt rows (PPO, GRPO).

A prompt is a string or a list of messages ending with the user turn to answer; a pair adds a
chosen and a rejected response, as text or as whole conversations whose shared prefix is the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowrank.data.records import load_records_with_locations, parse_message_list
from lowrank.errors import UserError


def _prompt_messages(value, where: str, field: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{where}: field '{field}' is empty")
        return [{"role": "user", "content": value}]
    messages = parse_message_list(value, where, field)
    if messages[-1]["role"] == "assistant":
        raise UserError(f"{where}: the prompt in '{field}' ends with an assistant message; it must end with "
                        "the user turn to be answered")
    return messages


def _response(value, prompt: list[dict] | None, where: str, field: str) -> tuple[list[dict] | None, str | list[dict]]:
    """(prompt messages found in a whole conversation, the response after it: text or messages)."""
    if value is None:
        raise UserError(f"{where}: field '{field}' is missing")
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{where}: the {field} response is empty; every pair needs two non-empty responses")
        return None, value
    messages = parse_message_list(value, where, field)
    if prompt is not None and messages[:len(prompt)] == prompt:
        messages = messages[len(prompt):]
    return messages, messages


def _split_conversations(chosen: list[dict], rejected: list[dict]) -> int:
    """Length of the shared prefix of two conversations that ends before the first difference."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and chosen[n - 1]["role"] == "assistant":  # the prompt ends with a user turn
        n -= 1
    return n


def _simplify(messages: list[dict], where: str, field: str) -> str | list[dict]:
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: the {field} conversation has no assistant reply after the prompt")
    text = "".join(m["content"] for m in messages if m["role"] == "assistant")
    if not text.strip():
        raise UserError(f"{where}: the {field} response is empty; every pair needs two non-empty responses")
    if len(messages) == 1:
        return messages[0]["content"]
    return messages


def load_preference_pairs(source: str) -> list[dict]:
    """Pairs as dicts of ``prompt_messages``, ``chosen``, ``rejected`` (text or messages after the prompt), ``where``.

    ``prompt`` may be a string or a messages list, and ``chosen``/``rejected`` strings or whole
    conversations whose shared prefix is the prompt (then ``prompt`` may be left out).
    """
    records, wheres = load_records_with_locations(source)
    pairs = []
    for record, where in zip(records, wheres):
        raw_prompt = record.get("prompt") if record.get("prompt") is not None else record.get("messages")
        prompt = None if raw_prompt is None else _prompt_messages(raw_prompt, where, "prompt")
        chosen_full, chosen = _response(record.get("chosen"), prompt, where, "chosen")
        rejected_full, rejected = _response(record.get("rejected"), prompt, where, "rejected")
        if prompt is None:
            if chosen_full is None or rejected_full is None:
                raise UserError(f"{where}: field 'prompt' is missing (it may only be left out when chosen and "
                                "rejected are whole conversations)")
            n = _split_conversations(chosen_full, rejected_full)
            if n == 0:
                raise UserError(f"{where}: chosen and rejected conversations share no prompt; give a 'prompt' field")
            prompt, chosen, rejected = chosen_full[:n], chosen_full[n:], rejected_full[n:]
        chosen = chosen if isinstance(chosen, str) else _simplify(chosen, where, "chosen")
        rejected = rejected if isinstance(rejected, str) else _simplify(rejected, where, "rejected")
        same_text = isinstance(chosen, str) and isinstance(rejected, str) and chosen.strip() == rejected.strip()
        if chosen == rejected or same_text:
            raise UserError(f"{where}: chosen and rejected responses are identical; such a pair has no preference")
        pairs.append({"prompt_messages": prompt, "chosen": chosen, "rejected": rejected, "where": where})
    return pairs


@dataclass(frozen=True)
class PromptRow:
    """One record of a prompts file (PPO and GRPO rollouts)."""

    prompt_messages: list[dict]  # the prompt as chat messages, ending with the user turn to answer
    fields: dict  # the record's other fields, e.g. {"answer": "a b c"}: what a reward function may check
    where: str  # "file line N" / "file record N" / "dataset row N", for error messages


_PROMPT_FIELDS = ("prompt", "messages")


def load_prompt_rows(source: str, prompt_field: str = "") -> list[PromptRow]:
    """Each record's prompt (``prompt``: a string or messages, else ``messages``; or ``prompt_field``,
    e.g. GSM8K's "question") and its other fields.

    ``fields`` holds every key except ``prompt`` and ``messages``; a null value counts as absent
    and is left out, because ``datasets`` gives a field that only some records have to every
    record, as null where it is missing.
    """
    records, wheres = load_records_with_locations(source)
    rows = []
    for record, where in zip(records, wheres):
        names = (prompt_field,) if prompt_field else _PROMPT_FIELDS
        field = next((f for f in names if record.get(f) is not None), None)
        if field is None:
            raise UserError(f"{where}: no {' or '.join(repr(n) for n in names)} field")
        fields = {key: value for key, value in record.items() if key not in names and value is not None}
        rows.append(PromptRow(_prompt_messages(record[field], where, field), fields, where))
    return rows


def load_prompts(source: str) -> list[list[dict]]:
    """Prompts for PPO rollouts: the messages of :func:`load_prompt_rows`."""
    return [row.prompt_messages for row in load_prompt_rows(source)]
