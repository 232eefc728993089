"""Synthetic instruction tasks a tiny model can learn on a CPU, and their exact-match accuracy.

The demo (`lowrank run recipes/demo.yaml`) needs a task whose learning shows in numbers, not
noise: each problem here has one right answer that a program checks, so "accuracy on held-out
problems" means the same for the base, the SFT adapter and the PPO policy. The default, ``sort``
(put 3 to 6 distinct letters in alphabetical order), is the one a 1M-parameter model learns best
in a minute of CPU: the answer is a function of the input alone, and the tiny vocabulary keeps 21 of
the 26 letters as one token each (j, k, q, v and z take two).

:func:`write_task` writes, deterministically for a seed, the files every stage reads with the
project's own loaders (lowrank.data, lowrank.pretrain):

- ``pretrain.jsonl``: ``{"text"}`` documents, one practice problem each in a raw format
  (``sort: q d m a = a d m q``). No chat template and no instruction wording: the base learns the
  skill, not how to answer in a chat. One problem a document, because lowrank.pretrain packs
  documents with an attention mask between them: each problem is then seen alone, as at
  evaluation. With 8 problems a document (task files before version 7) every letter of a problem
  also stood in the lines above it, and the tiny base never learned the tasks that need positions
  within the current line (reverse: 0.5% in the practice format after 300 steps, against 78%).
- ``sft.jsonl``: Alpaca records (``instruction``, ``output``), the training split.
- ``eval.jsonl``: Alpaca records of held-out problems, plus ``practice``: the problem in the practice
  format, up to its answer (``sort: q d m a =``). A problem is identified by its *answer* (for sort:
  the sorted letters), and no held-out answer occurs in any other file, so a model cannot score by
  remembering a training answer.
- ``preferences.jsonl``: ``prompt``, ``chosen`` (the right answer), ``rejected`` (a plausible
  wrong one, see :func:`_wrong_sequence`) and ``answer`` (the right answer again, for a
  programmatic reward: lowrank.pairs ranks the SFT policy's own answers to these prompts with it).
- ``prompts.jsonl``: ``prompt`` and ``answer`` records for PPO and GRPO rollouts, training problems
  only. The answer is the problem's right answer, for a programmatic reward: lowrank.rewards'
  built-in ``exact`` is lowrank.task_scoring.is_correct on it.

Scoring a model's answers to these problems is lowrank.task_scoring.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lowrank.errors import UserError
from lowrank.files import write_text_atomic

log = logging.getLogger(__name__)

FILES = ("pretrain", "sft", "eval", "preferences", "prompts")
MARKER = "task.json"  # written last: names the task, seed and sizes, and the digest of each file
VERSION = 7  # bump when the generated text changes, so an old task dir is not taken for a new one


# --------------------------------------------------------------------------------------------
# The tasks: one generator of (problem key, instruction, answer, raw practice line) each
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    key: str  # identity for the held-out split: equal keys are the same problem
    instruction: str  # the user's message
    answer: str  # the one right response
    practice: str  # the same problem in the raw pretraining format
    items: tuple  # the task's own data, for making wrong answers


def _letters(rng: random.Random, low: int, high: int) -> list[str]:
    return rng.sample(string.ascii_lowercase, rng.randint(low, high))


def _sort_problem(rng: random.Random, length: tuple[int, int] = (3, 6)) -> Problem:
    letters = _letters(rng, *length)
    answer = " ".join(sorted(letters))
    return Problem(answer, f"Sort these letters: {' '.join(letters)}", answer,
                   f"sort: {' '.join(letters)} = {answer}", tuple(letters))


def _reverse_problem(rng: random.Random, length: tuple[int, int] = (3, 6)) -> Problem:
    letters = _letters(rng, *length)
    answer = " ".join(reversed(letters))
    return Problem(answer, f"Reverse these letters: {' '.join(letters)}", answer,
                   f"reverse: {' '.join(letters)} = {answer}", tuple(letters))


def _add_problem(rng: random.Random, length: tuple[int, int] = (1, 2)) -> Problem:
    low, high = 10 ** (length[0] - 1) if length[0] > 1 else 0, 10 ** length[1] - 1
    a, b = rng.randint(low, high), rng.randint(low, high)
    key = f"{min(a, b)}+{max(a, b)}"  # 3 + 5 and 5 + 3 are one problem
    return Problem(key, f"What is {a} plus {b}?", str(a + b), f"{a} + {b} = {a + b}", (a, b))


def _wrong_sequence(problem: Problem, rng: random.Random) -> str:
    """A plausible wrong answer to a letter task, of the kinds a half-trained model gives.

    A tiny model that has learned to sort mostly errs by writing a letter that is not in the input
    (a neighbour in the alphabet of one that is), one letter too many or too few, or by running on
    past the answer; less often it swaps two letters or leaves the input as it was.
    """
    right = problem.answer.split()
    ordered = right == sorted(right)  # sort's answers are sorted, so a wrong one should look sorted too
    foreign = [c for c in string.ascii_lowercase if c not in problem.items]
    while True:
        kind = rng.choices(("near", "insert", "drop", "swap", "input", "run-on"), weights=(30, 20, 25, 10, 5, 10))[0]
        wrong = list(right)
        if kind == "near":  # one letter replaced by a neighbour of it that is not in the input
            i = rng.randrange(len(wrong))
            near = [c for c in foreign if 0 < abs(ord(c) - ord(wrong[i])) <= 2] or foreign
            wrong[i] = rng.choice(near)
        elif kind == "insert":  # one letter that is not in the input, added
            wrong.insert(rng.randrange(len(wrong) + 1), rng.choice(foreign))
        elif kind == "drop":
            del wrong[rng.randrange(len(wrong))]
        elif kind == "swap":
            i = rng.randrange(len(wrong) - 1)
            wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
        elif kind == "input":
            wrong = list(problem.items)
        else:  # the answer, then the start of another practice line: a policy that runs on past its answer
            return problem.answer + "\n" + problem.practice.split(" = ", 1)[0]
        if ordered and kind in ("near", "insert"):
            wrong.sort()
        if wrong != right:
            return " ".join(wrong)


def _wrong_sum(problem: Problem, rng: random.Random) -> str:
    a, b = problem.items
    while True:
        wrong = a + b + rng.choice((-10, -1, 1, 10)) if rng.random() < 0.8 else abs(a - b)
        if wrong >= 0 and wrong != a + b:
            return str(wrong)


def _slip(problem: Problem, name: str) -> str:
    """The task's typical mistake, made the same way every time: the last letter left out (sort,
    reverse), or the carries forgotten (add: each column's sum mod 10, the leftmost in full, as
    49 + 62 = 101)."""
    if name == "add":
        a, b = (str(x) for x in problem.items)
        width = max(len(a), len(b))
        a, b = a.zfill(width), b.zfill(width)
        columns = [int(x) + int(y) for x, y in zip(a, b)]
        return str(columns[0]) + "".join(str(c % 10) for c in columns[1:])
    return " ".join(problem.answer.split()[:-1])


def _is_harder(problem: Problem, name: str, length: tuple[int, int]) -> bool:
    """The harder half of a task's problems: more letters than the middle of the length range (sort,
    reverse), or a carry that the slip gets wrong (add)."""
    if name == "add":
        return _slip(problem, name) != problem.answer
    return len(problem.items) > sum(length) / 2


_GENERATORS: dict[str, tuple[Callable[[random.Random], Problem], Callable[[Problem, random.Random], str]]] = {
    "sort": (_sort_problem, _wrong_sequence),
    "reverse": (_reverse_problem, _wrong_sequence),
    "add": (_add_problem, _wrong_sum),
}
TASKS: tuple[str, ...] = tuple(_GENERATORS)
DEFAULT_TASK = "sort"
# The difficulty knob: letters per problem (sort, reverse) or digits per operand (add), low to high.
DEFAULT_LENGTH = {"sort": (3, 6), "reverse": (3, 6), "add": (1, 2)}
MAX_LENGTH = {"sort": 26, "reverse": 26, "add": 9}
# How many problems go into each file by default (the demo's sizes).
DEFAULT_SIZES = {"pretrain": 20000, "sft": 1000, "eval": 200, "preferences": 1500, "prompts": 500}


def _check(name: str, sizes: dict) -> dict[str, int]:
    if name not in _GENERATORS:
        raise UserError(f"task: unknown name '{name}'; choose one of {', '.join(TASKS)}")
    for key, value in sizes.items():
        if key not in DEFAULT_SIZES:
            raise UserError(f"task: unknown size '{key}'; sizes are {', '.join(DEFAULT_SIZES)}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"task: size '{key}' must be a positive integer, got {value!r}")
    return {**DEFAULT_SIZES, **sizes}


def check_length(name: str, length) -> tuple[int, int]:
    """``length`` ([low, high], or None for the task's default) as a checked (low, high)."""
    if length is None:
        return DEFAULT_LENGTH[name]
    what = "digits per operand" if name == "add" else "letters per problem"
    if (not isinstance(length, (list, tuple)) or len(length) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in length)):
        raise UserError(f"task: length must be [low, high], the {what}, got {length!r}")
    low, high = length
    if not 1 <= low <= high <= MAX_LENGTH[name]:
        raise UserError(f"task: length [{low}, {high}] must have 1 <= low <= high <= {MAX_LENGTH[name]} ({what})")
    return low, high


def check_sft_errors(share) -> float:
    """``sft_errors`` as a checked share in [0, 1]."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise UserError(f"task: sft_errors must be a share from 0 to 1, got {share!r}")
    return float(share)


# --------------------------------------------------------------------------------------------
# Writing the files
# --------------------------------------------------------------------------------------------

def generate(name: str = DEFAULT_TASK, seed: int = 0, length=None, sft_errors: float = 0.0,
             **sizes: int) -> dict[str, list[dict]]:
    """The records of every file, by file name (see the module docstring); deterministic for a seed.

    ``length`` ([low, high]): letters per problem (sort, reverse) or digits per operand (add); the
    difficulty knob (default DEFAULT_LENGTH).

    ``sft_errors``: the share of the SFT demonstrations of the harder half of the problems (more
    letters than the middle of the length range; for add, a carry) written with the task's typical
    mistake (:func:`_slip`) instead of the right answer: demonstrations as a careless labeller
    writes them. SFT imitates them; the pretraining practice, the preference pairs' chosen answers,
    the prompts' answers and the held-out answers stay right, so a correctness reward (the checker,
    a reward model, DPO's pairs) can take the policy past its demonstrations. With a share above
    one half SFT's greedy answer to most harder problems is the mistake, while sampling still
    gives the right one often enough for RL to find: SFT's accuracy then rests on the data, not on
    where in its training a run stops.

    The held-out problems are drawn first; every other file draws only problems whose key is not
    held out. Problems may repeat across the training files (pretraining practice, SFT,
    preferences, prompts): they are one training pool.
    """
    sizes = _check(name, sizes)
    length = check_length(name, length)
    sft_errors = check_sft_errors(sft_errors)
    generator, make_wrong = _GENERATORS[name]

    def make_problem(rng: random.Random) -> Problem:
        return generator(rng, length)

    rng = random.Random(f"lowrank-task-{name}-{seed}")
    held_out: dict[str, Problem] = {}
    for _ in range(100 * sizes["eval"]):  # the problem space is large: this never runs dry in practice
        if len(held_out) == sizes["eval"]:
            break
        problem = make_problem(rng)
        held_out.setdefault(problem.key, problem)
    if len(held_out) < sizes["eval"]:
        raise UserError(f"task: cannot draw {sizes['eval']} distinct held-out '{name}' problems; lower the eval size")

    def train_problems(count: int) -> list[Problem]:
        drawn = []
        while len(drawn) < count:
            problem = make_problem(rng)
            if problem.key not in held_out:
                drawn.append(problem)
        return drawn

    def alpaca(problem: Problem) -> dict:
        return {"instruction": problem.instruction, "output": problem.answer}

    def held_out_record(problem: Problem) -> dict:
        return {**alpaca(problem), "practice": problem.practice.split(" = ", 1)[0] + " ="}

    slips = random.Random(f"lowrank-task-{name}-{seed}-slips")  # its own stream: the other files do not move

    def demonstration(problem: Problem) -> dict:
        slipped = sft_errors > 0 and _is_harder(problem, name, length) and slips.random() < sft_errors
        return {"instruction": problem.instruction, "output": _slip(problem, name) if slipped else problem.answer}

    return {
        "pretrain": [{"text": p.practice} for p in train_problems(sizes["pretrain"])],
        "sft": [demonstration(p) for p in train_problems(sizes["sft"])],
        "eval": [held_out_record(p) for p in held_out.values()],
        "preferences": [{"prompt": p.instruction, "chosen": p.answer, "rejected": make_wrong(p, rng), "answer": p.answer}
                        for p in train_problems(sizes["preferences"])],
        "prompts": [{"prompt": p.instruction, "answer": p.answer} for p in train_problems(sizes["prompts"])],
    }


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_task(out_dir: Path, name: str = DEFAULT_TASK, seed: int = 0, length=None, sft_errors: float = 0.0,
               **sizes: int) -> dict[str, Path]:
    """Write the task's files (``<file>.jsonl`` for each of FILES) to ``out_dir``; return their paths by file.

    Every file is written to a temporary name and renamed; ``task.json`` (task, seed, sizes and
    each file's sha256) is renamed in last. When it already records the same task, seed and sizes
    and the files still match their digests, nothing is rewritten.
    """
    full_sizes = _check(name, sizes)
    length = list(check_length(name, length))
    sft_errors = check_sft_errors(sft_errors)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: task dir is a file; choose another dir")
    paths = {file: out / f"{file}.jsonl" for file in FILES}
    wanted = {"version": VERSION, "task": name, "seed": seed, "sizes": full_sizes, "length": length,
              "sft_errors": sft_errors}
    marker = out / MARKER
    if marker.is_file():
        try:
            recorded = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            recorded = {}
        digests = recorded.get("digests", {})
        if {k: recorded.get(k) for k in wanted} == wanted and all(
                p.is_file() and digests.get(f) == _digest(p) for f, p in paths.items()):
            log.info("%s: task '%s' (seed %d) already written", out, name, seed)
            return paths
    try:
        out.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)
        records = generate(name, seed, length, sft_errors, **full_sizes)
        for file, path in paths.items():
            write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[file]))
        summary = {**wanted, "digests": {f: _digest(p) for f, p in paths.items()},
                   "counts": {f: len(r) for f, r in records.items()}}
        write_text_atomic(marker, json.dumps(summary, indent=2) + "\n")
    except OSError as e:
        raise UserError(f"{out}: cannot write the task files ({e.strerror})") from None
    return paths
