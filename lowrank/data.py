"""Training data: records from files or the hub, chat messages, loss masks, packing, preference pairs.

Three record shapes become one list of chat messages (``{"role", "content"}``, roles
system/user/assistant):

- Alpaca: ``instruction``, optional ``input``, ``output``, optional ``system``;
- ShareGPT/Vicuna: ``conversations`` of ``{"from": human|user|gpt|assistant|system, "value"}``;
- OpenAI: ``messages`` of ``{"role", "content"}``.

The loss falls on every assistant turn (the Vicuna recipe) including the end-of-turn token(s)
the template writes after it (EOS, ``<|eot_id|>``, ``<|im_end|>``), so the model learns to
stop. Templates are plain Jinja (llama.cpp cannot run ``{% generation %}`` tags), so assistant
spans are found by rendering prefixes of the conversation; see :func:`assistant_spans`.

Shipped samples (``SAMPLE_FILES``; written by a generator script, plain English, no real data
set copied): ``alpaca`` (instruction pairs a tiny model can learn: arithmetic, sorting,
capitals, definitions, rewriting), ``sharegpt`` (multi-turn chats, some with a system turn),
``preferences`` and ``prompts``. The preference property is checkable by a program: every
**chosen** response contains the word "please" and no **rejected** one does (the rejected
reply is the same help, said without it). :func:`sample_property` is that check, so the
reward and PPO stages can measure how often a model shows it.
"""

from __future__ import annotations

import json
import logging
import re
from bisect import bisect_left, insort
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from lowrank.errors import UserError
from lowrank.templates import render
from lowrank.train import IGNORE_INDEX  # label of a position without loss

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
SAMPLE_FILES: dict[str, Path] = {
    "alpaca": ASSETS / "alpaca_sample.jsonl",
    "sharegpt": ASSETS / "sharegpt_sample.json",
    "preferences": ASSETS / "preferences_sample.jsonl",
    "prompts": ASSETS / "prompts_sample.jsonl",
}

_PLEASE = re.compile(r"\bplease\b", re.IGNORECASE)


def sample_property(text: str) -> bool:
    """True when ``text`` has the property the shipped preference pairs reward: the word "please"."""
    return bool(_PLEASE.search(text))


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------

def _is_local(source: str) -> bool:
    path = Path(source).expanduser()
    return path.exists() or source.endswith((".json", ".jsonl")) or source.startswith(("/", ".", "~"))


def _parse_local(path: Path) -> tuple[list, list[str]]:
    """Records and where each one is (``file line N`` / ``file record N``), checked line by line.

    ``datasets`` reports a malformed file without a line number, so the file is parsed here
    first and a broken line is named exactly.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text (byte {error.start}); save the file as UTF-8 JSON") from None
    stripped = text.lstrip()
    if stripped.startswith("["):  # one JSON document (a list of records)
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} line {error.lineno}: malformed JSON ({error.msg}); "
                            "fix the file (a .json file holds one list of records)") from None
        return records, [f"{path} record {i + 1}" for i in range(len(records))]
    records, wheres = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} line {number}: malformed JSON ({error.msg}); "
                            "each line of a .jsonl file must be one JSON object") from None
        if not isinstance(record, dict):
            raise UserError(f"{path} line {number}: expected a JSON object, found {type(record).__name__}")
        records.append(record)
        wheres.append(f"{path} line {number}")
    return records, wheres


@contextmanager
def _quiet_datasets():
    """``datasets`` draws progress bars on stderr; only the CLI layer may show progress."""
    import datasets

    was_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def load_records_with_locations(source: str, *, split: str = "train") -> tuple[list[dict], list[str]]:
    """:func:`load_records` plus, for each record, where it is (used in error messages)."""
    with _quiet_datasets():
        return _load(source, split)


def _load(source: str, split: str) -> tuple[list[dict], list[str]]:
    import datasets

    if _is_local(source):
        path = Path(source).expanduser()
        if path.is_dir():
            raise UserError(f"data path {path} is a directory; give a .json or .jsonl file or a hub dataset name")
        if not path.is_file():
            raise UserError(f"data file {path} does not exist; give a .json or .jsonl file or a hub dataset name")
        parsed, wheres = _parse_local(path)
        if parsed and not all(isinstance(r, dict) for r in parsed):
            bad = next(i for i, r in enumerate(parsed) if not isinstance(r, dict))
            raise UserError(f"{wheres[bad]}: expected a JSON object with the record's fields")
        if not parsed:
            raise UserError(f"{path} holds no records; add examples to it")
        try:
            dataset = datasets.load_dataset("json", data_files=str(path), split="train")
            records = dataset.to_list()
        except Exception as error:  # a mix of shapes Arrow cannot hold in one column (str and list)
            log.debug("datasets could not load %s (%s); using the parsed records", path, error)
            records = parsed
        if len(records) != len(parsed):
            records = parsed
        return records, wheres
    name, _, subset = source.partition(":")  # "openai/gsm8k:main": a dataset with named configurations
    try:
        dataset = datasets.load_dataset(name, subset or None, split=split)
    except Exception as error:
        raise UserError(f"could not load dataset '{source}' (split '{split}') from the Hugging Face hub: "
                        f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}; "
                        "give a local .json/.jsonl file or check the name") from None
    records = dataset.to_list()
    if not records:
        raise UserError(f"dataset '{source}' split '{split}' holds no records")
    return records, [f"{source} row {i + 1}" for i in range(len(records))]


def load_records(source: str, *, split: str = "train") -> list[dict]:
    """Records of a local .json/.jsonl file or a hub dataset, loaded with ``datasets``."""
    return load_records_with_locations(source, split=split)[0]


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "system": "system"}
_ROLES = ("system", "user", "assistant")


def _text(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        found = "missing" if value is None else f"a {type(value).__name__}"
        raise UserError(f"{where}: field '{field}' must be a string, it is {found}")
    return value


def _conversation(messages: list[dict], where: str, field: str) -> list[dict]:
    """A training conversation: leading replies dropped, at least one assistant turn left."""
    # A reply with nothing before it answers no prompt (FastChat drops it too).
    start = 1 if messages and messages[0]["role"] == "system" else 0
    while len(messages) > start and messages[start]["role"] == "assistant":
        messages = messages[:start] + messages[start + 1:]
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: the conversation in '{field}' has no assistant turn after a user turn; "
                        "there is nothing to learn from it")
    return messages


def parse_message_list(value, where: str, field: str, role_key: str = "role", content_key: str = "content",
                       roles: dict[str, str] | None = None) -> list[dict]:
    """A list of message objects -> ``[{"role", "content"}]``; roles checked, a system message only first."""
    roles = roles or {r: r for r in _ROLES}
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: field '{field}' must be a non-empty list of messages")
    messages = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise UserError(f"{where}: {field}[{i}] must be an object with '{role_key}' and '{content_key}'")
        role = turn.get(role_key)
        if role not in roles:
            raise UserError(f"{where}: {field}[{i}].{role_key} is {role!r}; known roles: {', '.join(roles)}")
        content = _text(turn.get(content_key), where, f"{field}[{i}].{content_key}")
        messages.append({"role": roles[role], "content": content})
        if messages[-1]["role"] == "system" and i > 0:
            raise UserError(f"{where}: {field}[{i}] is a system message after the start; "
                            "a system message may only open the conversation")
    return messages


def to_messages(record: dict, where: str) -> list[dict]:
    """One record (Alpaca, ShareGPT or OpenAI ``messages``) as chat messages; UserError naming the field."""
    if record.get("messages") is not None:
        return _conversation(parse_message_list(record["messages"], where, "messages"), where, "messages")
    if record.get("conversations") is not None:
        messages = parse_message_list(record["conversations"], where, "conversations", "from", "value", _SHAREGPT_ROLES)
        return _conversation(messages, where, "conversations")
    if record.get("instruction") is not None or record.get("output") is not None:
        instruction = _text(record.get("instruction"), where, "instruction")
        output = _text(record.get("output"), where, "output")
        extra = record.get("input")
        user = instruction + ("\n\n" + _text(extra, where, "input") if extra else "")
        system = record.get("system")
        messages = [{"role": "system", "content": _text(system, where, "system")}] if system else []
        return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    fields = ", ".join(sorted(k for k, v in record.items() if v is not None)) or "none"
    raise UserError(f"{where}: no 'instruction'/'output' (Alpaca), 'conversations' (ShareGPT) or 'messages' "
                    f"(OpenAI) field; the record has: {fields}")


# --------------------------------------------------------------------------------------------
# Tokens and loss masks
# --------------------------------------------------------------------------------------------

def assistant_spans(template: str, messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans (start, end) that carry loss.

    For assistant turn k, ``render(messages[:k], add_generation_prompt=True)`` is where the
    reply starts and ``render(messages[:k+1])`` ends right after its end-of-turn marker; both
    must be prefixes of the whole rendering. Whitespace after the marker (chatml's newline)
    is separator, not part of what the model should say before it stops.
    """
    from jinja2 import TemplateError

    try:
        full = render(template, messages, tokenizer)
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = render(template, messages[:k], tokenizer, add_generation_prompt=True)
            upto = render(template, messages[:k + 1], tokenizer)
            spans.append((k, prompt, upto))
    except TemplateError as error:  # e.g. a template that insists on alternating user/assistant turns
        raise UserError(f"the chat template cannot render this conversation: {error}") from None
    return full, [_span(k, prompt, upto, full) for k, prompt, upto in spans]


def _span(k: int, prompt: str, upto: str, full: str) -> tuple[int, int]:
    if not (upto.startswith(prompt) and full.startswith(upto)):
        raise UserError("the chat template does not render a conversation as a growing prefix (turn "
                        f"{k} changes earlier text), so assistant turns cannot be located for the loss; "
                        "pick a built-in template with --template")
    return len(prompt), len(prompt) + len(upto[len(prompt):].rstrip())


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def tokenize_text(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of rendered text, with exactly one BOS where the model wants one.

    The built-in templates write ``bos_token`` themselves, so the text is tokenized without
    special tokens; a template that does not write it gets the BOS the tokenizer would add
    (LLaMA-2's SentencePiece adds one), never a second one.
    """
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoding["input_ids"]), [tuple(o) for o in encoding["offset_mapping"]]
    if _adds_bos(tokenizer) and (not ids or ids[0] != tokenizer.bos_token_id):
        ids, offsets = [tokenizer.bos_token_id] + ids, [(0, 0)] + offsets
    return ids, offsets


def tokenize_prompt(tokenizer, template: str, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` plus the generation prompt, tokenized as :func:`tokenize_conversation` does."""
    return tokenize_text(tokenizer, render(template, messages, tokenizer, add_generation_prompt=True))[0]


def tokenize_conversation(tokenizer, template: str, messages: list[dict], max_length: int) -> dict:
    """``input_ids`` and ``labels`` of a conversation, cut to ``max_length`` (the start is kept).

    A token carries loss (label = its id) when it starts inside an assistant span; every other
    label is IGNORE_INDEX. The fast tokenizer's offsets map character spans to tokens, so the
    text is tokenized once, exactly as it will be seen at inference.
    """
    text, spans = assistant_spans(template, messages, tokenizer)
    ids, offsets = tokenize_text(tokenizer, text)
    labels = [IGNORE_INDEX] * len(ids)
    for i, (start, end) in enumerate(offsets):
        if end > start and any(s <= start < e for s, e in spans):
            labels[i] = ids[i]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def build_sft_dataset(tokenizer, template: str, source: str, max_length: int) -> list[dict]:
    """Tokenized examples of a data source; drops examples left without loss tokens by truncation."""
    records, wheres = load_records_with_locations(source)
    examples = []
    for record, where in zip(records, wheres):
        messages = to_messages(record, where)
        try:
            example = tokenize_conversation(tokenizer, template, messages, max_length)
        except UserError as error:
            raise UserError(f"{where}: {error}") from None
        if any(label != IGNORE_INDEX for label in example["labels"][1:]):
            examples.append(example)
    if not examples:
        raise UserError(f"{source}: every example is longer than --max-length {max_length} before its first "
                        "assistant token, so none is left to train on; raise --max-length")
    if len(examples) < len(records):
        log.warning("%s: dropped %d of %d examples with no assistant token within %d tokens",
                    source, len(records) - len(examples), len(records), max_length)
    return examples


# --------------------------------------------------------------------------------------------
# Packing and batches
# --------------------------------------------------------------------------------------------

def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Pack examples into rows of at most ``max_length`` tokens, without padding (best-fit decreasing).

    Each row has ``input_ids``, ``labels`` and ``position_ids`` restarting at 0 for each example.
    transformers reads the restarts as packed sequences and keeps attention inside each example
    (masking_utils.find_packed_sequence_indices) when no attention_mask and no KV cache is given,
    so call the model with ``use_cache=False``. The first label of each example is IGNORE_INDEX:
    after the causal shift it would be predicted from the previous example's last token.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    rows: list[list[int]] = []  # example indices per row
    free: list[tuple[int, int]] = []  # (space left, row index), sorted
    for i in order:
        size = min(len(examples[i]["input_ids"]), max_length)
        slot = bisect_left(free, (size, -1))
        if slot < len(free):
            space, row = free.pop(slot)
        else:
            space, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if space - size > 0:
            insort(free, (space - size, row))
    packed = []
    for members in rows:
        row = {"input_ids": [], "labels": [], "position_ids": []}
        for i in sorted(members):  # data order inside a row
            ids = examples[i]["input_ids"][:max_length]
            row["input_ids"] += ids
            row["labels"] += [IGNORE_INDEX] + list(examples[i]["labels"][1:len(ids)])
            row["position_ids"] += list(range(len(ids)))
        packed.append(row)
    return packed


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (input_ids, attention_mask), each (batch, longest): generation then continues every
    row from the same column."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


def collate(rows: list[dict], pad_id: int | None) -> dict[str, torch.Tensor]:
    """Right-padded tensors (batch, longest) of packed or unpacked rows.

    Returns ``input_ids``, ``labels`` (IGNORE_INDEX on padding) and ``position_ids``; unpacked
    rows (no ``position_ids``) also get ``attention_mask``. Packed rows get none: the padding
    after them is one more "example" (positions restart at 0) that attends only to itself.
    """
    pad_id = 0 if pad_id is None else pad_id
    packed = all("position_ids" in row for row in rows)
    longest = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(longest).repeat(len(rows), 1)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[b, :n] = torch.tensor(row["input_ids"])
        labels[b, :n] = torch.tensor(row["labels"])
        attention_mask[b, :n] = 1
        if packed:
            position_ids[b, :n] = torch.tensor(row["position_ids"])
            position_ids[b, n:] = torch.arange(longest - n)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if not packed:
        batch["attention_mask"] = attention_mask
    return batch


# --------------------------------------------------------------------------------------------
# Preference pairs and prompts (reward model, PPO)
# --------------------------------------------------------------------------------------------

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
