"""Training records: reading .json/.jsonl files and hub datasets, and turning each record into chat messages.

Three record shapes become one list of chat messages (``{"role", "content"}``, roles
system/user/assistant):

- Alpaca: ``instruction``, optional ``input``, ``output``, optional ``system``;
- ShareGPT/Vicuna: ``conversations`` of ``{"from": human|user|gpt|assistant|system, "value"}``;
- OpenAI: ``messages`` of ``{"role", "content"}``.

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
from contextlib import contextmanager
from pathlib import Path

from lowrank.errors import UserError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
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
