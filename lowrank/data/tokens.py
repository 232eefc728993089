"""Conversations as tokens: rendering with the chat template, loss masks, packing and batches.

The loss falls on every assistant turn (the Vicuna recipe) including the end-of-turn token(s)
the template writes after it (EOS, ``<|eot_id|>``, ``<|im_end|>``), so the model learns to
stop. Templates are plain Jinja (llama.cpp cannot run ``{% generation %}`` tags), so assistant
spans are found by rendering prefixes of the conversation; see :func:`assistant_spans`.
Examples are packed padding-free into rows with per-example position ids (:func:`pack_examples`).
"""

from __future__ import annotations

import logging
from bisect import bisect_left, insort

import torch

from lowrank.data.records import load_records_with_locations, to_messages
from lowrank.errors import UserError
from lowrank.templates import render
from lowrank.lm_loss import IGNORE_INDEX  # label of a position without loss

log = logging.getLogger(__name__)


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
