"""`lowrank score`: print the reward of prompt/response pairs under a trained reward adapter.

One line per pair, in the order given: ``score 1.234567  "the prompt" -> "the response"``, the word
``score``, the reward, then the pair cut to a few words so that a reader can tell the lines apart
(``awk '{print $2}'`` takes the numbers alone).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reward", required=True, type=Path, metavar="DIR", help="reward adapter dir (from `lowrank reward`)")
    parser.add_argument("--model", default=None, help="base model (default: the one recorded in the adapter's lowrank.json)")
    parser.add_argument("--quant", default=None, choices=["nf4", "int8", "none"], help="base weights (default: as in training)")
    parser.add_argument("--prompt", default=None, help="a user prompt (with --response)")
    parser.add_argument("--response", default=None, help="the response to score (with --prompt)")
    parser.add_argument("--pairs", default=None, type=Path, metavar="FILE.jsonl",
                        help="one JSON object per line with 'prompt' (text or messages) and 'response'")


def _read_pairs(path: Path) -> list[tuple]:
    """(prompt, response) of each record of a JSON/JSONL file (read like every data file); UserError
    naming the line at fault."""
    from lowrank.data import load_records_with_locations
    from lowrank.errors import UserError

    records, wheres = load_records_with_locations(str(path))
    for record, where in zip(records, wheres):
        if not isinstance(record.get("response"), str) or not isinstance(record.get("prompt"), (str, list)):
            raise UserError(f"{where}: expected fields 'prompt' (text or messages) and 'response' (text)")
    return [(record["prompt"], record["response"]) for record in records]


def _excerpt(turn, width: int = 40) -> str:
    """A prompt (text or messages: the last one's) or a response as one quoted line of at most ``width`` characters."""
    import json

    if isinstance(turn, list):
        turn = turn[-1].get("content", "") if turn and isinstance(turn[-1], dict) else ""
    line = " ".join(str(turn).split())
    return json.dumps(line if len(line) <= width else line[:width - 3] + "...", ensure_ascii=False)


def run(args: argparse.Namespace) -> int:
    from lowrank.errors import UserError
    from lowrank.scoring import score_texts

    pairs = []
    if (args.prompt is None) != (args.response is None):
        raise UserError("--prompt and --response go together")
    if args.prompt is not None:
        pairs.append((args.prompt, args.response))
    if args.pairs is not None:
        pairs.extend(_read_pairs(args.pairs))
    if not pairs:
        raise UserError("nothing to score: give --prompt and --response, or --pairs FILE.jsonl")
    for (prompt, response), score in zip(pairs, score_texts(args.reward, args.model, pairs, quant=args.quant)):
        print(f"score {score:.6f}  {_excerpt(prompt)} -> {_excerpt(response)}")
    return 0
