"""Training data: records from files or the hub, chat messages, loss masks, packing, preference pairs.

Three modules, re-exported here (``from lowrank.data import load_records``):
lowrank.data.records (reading files and hub datasets; Alpaca, ShareGPT and OpenAI records as chat
messages; the shipped samples), lowrank.data.tokens (rendering with the chat template, tokens and
assistant-only loss masks, packing, batches) and lowrank.data.prompts (preference pairs and prompt
rows for the reward, DPO, PPO and GRPO stages).
"""

from __future__ import annotations

from lowrank.data.prompts import PromptRow, load_preference_pairs, load_prompt_rows, load_prompts
from lowrank.data.records import (ASSETS, SAMPLE_FILES, load_records, load_records_with_locations,
                                  parse_message_list, sample_property, to_messages)
from lowrank.data.tokens import (assistant_spans, build_sft_dataset, collate, left_pad, pack_examples,
                                 tokenize_conversation, tokenize_prompt, tokenize_text)
from lowrank.lm_loss import IGNORE_INDEX  # label of a position without loss

__all__ = [
    "ASSETS", "IGNORE_INDEX", "SAMPLE_FILES", "PromptRow", "assistant_spans", "build_sft_dataset", "collate",
    "left_pad", "load_preference_pairs", "load_prompt_rows", "load_prompts", "load_records",
    "load_records_with_locations", "pack_examples", "parse_message_list", "sample_property", "to_messages",
    "tokenize_conversation", "tokenize_prompt", "tokenize_text",
]
