"""Programmatic rewards for GRPO: Python functions that score completions, by name or from a file.

A reward function takes the prompts and completions of a batch and returns one number each::

    def my_reward(prompts: list[str], completions: list[str], **fields) -> list[float]:
        ...

- ``prompts``: the user's prompt text (its last user message) of each completion; a prompt
  sampled G times appears G times.
- ``completions``: the generated assistant text, cut at the end-of-turn marker.
- ``fields``: every other field of the prompts file, as a keyword argument holding a list aligned
  with the completions (``answer=[...]`` for a file with an ``answer`` field; None where a
  record lacks the field). A function may name only the fields it needs, plus ``**kwargs``::

      def ends_with_answer(prompts, completions, answer, **kwargs):
          return [1.0 if c.strip().endswith(a) else 0.0 for c, a in zip(completions, answer)]

- the result: a list, tuple, 1-D numpy array or tensor of finite real numbers (bool counts),
  one per completion.

Name a function on the command line or in a recipe as ``path/to/file.py:function``,
``package.module:function``, or a built-in name:

- ``exact``: 1.0 when the completion equals the row's ``answer`` up to whitespace (the checker
  of the synthetic tasks, lowrank.tasks), else 0.0.
- ``numeric``: 1.0 when the completion's final number equals the row's ``answer`` (a number, or
  text ending in ``#### <number>`` as in GSM8K), else 0.0. The completion's number is the one after
  its last ``####`` if it has one, else its last number; thousands separators ("1,234") are
  dropped and numbers compare by value ("3.0" equals "3").

Several functions add up, each times its weight (``reward_weights``). Anything wrong with a
function or what it returns is a one-line :class:`~lowrank.errors.UserError` naming it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import itertools
import math
import numbers
import re
import sys
import traceback
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Callable, Sequence

from lowrank.errors import UserError
from lowrank.task_scoring import normalise_answer


# --------------------------------------------------------------------------------------------
# Built-in reward functions
# --------------------------------------------------------------------------------------------

def _check_answers(answer: Sequence) -> None:
    missing = [i for i, a in enumerate(answer) if a is None]
    if missing:
        raise ValueError(f"completion {missing[0]} has no answer (its prompt record has no 'answer' field)")


def exact(prompts: list[str], completions: list[str], answer: list, **kwargs) -> list[float]:
    """1.0 where the completion is the row's answer up to whitespace (lowrank.task_scoring.is_correct), else 0.0."""
    _check_answers(answer)
    return [float(normalise_answer(c) == normalise_answer(str(a))) for c, a in zip(completions, answer)]


# A number, with thousands separators or not; a minus sign only where it cannot be a hyphen or
# a subtraction ("5-3" is 5 and 3, "-3" is minus three).
_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _final_number(text: str) -> Decimal | None:
    """The number after the last "####" if there is one, else the last number in ``text``."""
    if "####" in text:
        found = _NUMBER.search(text.rsplit("####", 1)[1])
    else:
        found = None
        for found in _NUMBER.finditer(text):
            pass
    return None if found is None else Decimal(found.group().replace(",", ""))


def _answer_number(answer, index: int) -> Decimal:
    if isinstance(answer, numbers.Real) and not isinstance(answer, bool):
        return Decimal(str(answer))
    number = _final_number(str(answer)) if isinstance(answer, str) else None
    if number is None:
        raise ValueError(f"the answer {answer!r} of completion {index} is not a number "
                         "nor text ending in '#### <number>'")
    return number


def numeric(prompts: list[str], completions: list[str], answer: list, **kwargs) -> list[float]:
    """1.0 where the completion's final number equals the row's numeric answer (GSM8K style), else 0.0."""
    _check_answers(answer)
    expected = [_answer_number(right, i) for i, right in enumerate(answer)]
    return [float(_final_number(completion) == number) for completion, number in zip(completions, expected)]


BUILTINS: dict[str, Callable[..., list[float]]] = {"exact": exact, "numeric": numeric}


# --------------------------------------------------------------------------------------------
# Loading a function from a spec
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RewardFunction:
    """A reward function and the spec it was loaded from (its name in logs, metrics and errors)."""

    name: str  # "exact", "rewards.py:length", "mypackage.rewards:format_ok"
    function: Callable[..., Sequence[float]]


_module_numbers = itertools.count()


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _load_file(path_text: str, spec: str):
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise UserError(f"reward function {spec}: file {path} does not exist")
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    # A unique name: the file is the user's, not a package of ours, and may be loaded twice.
    module_name = f"lowrank_reward_{path.stem}_{digest}_{next(_module_numbers)}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"reward function {spec}: {path} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickle look a module up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise UserError(f"reward function {spec}: cannot import {path}: {_one_line(error)}{_where(error)}") from None
    return module


def _load_module(module_name: str, spec: str):
    try:
        return importlib.import_module(module_name)
    except Exception as error:
        raise UserError(f"reward function {spec}: cannot import module '{module_name}': {_one_line(error)}") from None


def _is_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _wrong_signature(function: Callable) -> str | None:
    """Why ``function`` cannot be called as f(prompts, completions, **fields), or None when it can."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a signature: trust it
        return None
    parameters = list(signature.parameters.values())
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required_positional_only = [p.name for p in positional[2:] if p.kind == p.POSITIONAL_ONLY and p.default is p.empty]
    if required_positional_only:  # fields are passed by keyword: this parameter could never get a value
        return f"parameter '{required_positional_only[0]}' is positional-only"
    try:  # the two lists, plus the fields it requires (checked against the file when it is called)
        signature.bind([], [], **{name: None for name in _parameters(function).required})
    except TypeError as error:
        return str(error)
    return None


def load_reward_function(spec: str) -> RewardFunction:
    """The function named by ``spec``: a built-in name, ``path/to/file.py:function`` or ``package.module:function``.

    The function is checked here, before any training: it exists, is callable and can be called
    as f(prompts, completions, **fields).
    """
    spec = spec.strip()
    if spec in BUILTINS:
        return RewardFunction(spec, BUILTINS[spec])
    if ":" not in spec:
        raise UserError(f"unknown reward function '{spec}'; built-ins are {', '.join(BUILTINS)}, "
                        "or give path/to/file.py:function or package.module:function")
    target, attribute = spec.rsplit(":", 1)  # rsplit: a Windows path has a colon of its own
    if not target or not attribute:
        raise UserError(f"reward function {spec}: give it as path/to/file.py:function or package.module:function")
    module = _load_file(target, spec) if _is_file(target) else _load_module(target, spec)
    function = module
    for part in attribute.split("."):  # "module:Class.method" too
        if not hasattr(function, part):
            defined = sorted(name for name, value in vars(module).items()
                             if callable(value) and not name.startswith("_")
                             and getattr(value, "__module__", None) == module.__name__)
            there = f"; functions there: {', '.join(defined)}" if defined else ""
            raise UserError(f"reward function {spec}: {target} has no function '{attribute}'{there}")
        function = getattr(function, part)
    if not callable(function):
        raise UserError(f"reward function {spec}: '{attribute}' is a {type(function).__name__}, not a function")
    problem = _wrong_signature(function)
    if problem:
        raise UserError(f"reward function {spec}: cannot be called as {attribute}(prompts, completions, **fields) "
                        f"({problem}); its signature is {attribute}{inspect.signature(function)}")
    return RewardFunction(spec, function)


# --------------------------------------------------------------------------------------------
# Calling functions and checking what they return
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Parameters:
    takes_lists: tuple[str, ...]  # the parameters that get prompts and completions (positionally)
    fields: frozenset[str] | None  # the fields it takes by name; None: all of them (**kwargs)
    required: tuple[str, ...]  # the fields it cannot do without (no default)


def _parameters(function: Callable) -> _Parameters:
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # no signature to read: give it the two lists only
        return _Parameters((), frozenset(), ())
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    named = [p for p in parameters if p not in positional[:2] and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes_all = any(p.kind == p.VAR_KEYWORD for p in parameters)
    return _Parameters(tuple(p.name for p in positional[:2]), None if takes_all else frozenset(p.name for p in named),
                       tuple(p.name for p in named if p.default is p.empty))


def _where(error: BaseException) -> str:
    """" (file line N)" of the innermost frame of ``error``'s traceback that is a real file: no traceback is shown."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith("<")]
    return f" ({frames[-1].filename} line {frames[-1].lineno})" if frames else ""


def _real(value, index: int, name: str) -> float:
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a numpy or torch scalar
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise UserError(f"reward function {name} returned a {type(value).__name__} for completion {index} "
                        f"({value!r:.40}); return a real number per completion")
    number = float(value)
    if not math.isfinite(number):
        raise UserError(f"reward function {name} returned {number} for completion {index}; "
                        "rewards must be finite numbers")
    return number


def _as_list(result, name: str) -> list:
    if isinstance(result, (list, tuple)):
        return list(result)
    if type(result).__module__.split(".")[0] in ("numpy", "torch") and hasattr(result, "tolist"):
        if getattr(result, "ndim", None) == 1:
            return list(result.tolist())
        raise UserError(f"reward function {name} returned a {getattr(result, 'ndim', '?')}-D "
                        f"{type(result).__name__}; return one number per completion (1-D)")
    raise UserError(f"reward function {name} returned a {type(result).__name__}; "
                    "return a list of numbers, one per completion")


def call_reward_function(reward: RewardFunction, prompts: list[str], completions: list[str],
                         fields: dict[str, list]) -> list[float]:
    """Rewards of ``completions`` under ``reward``, checked: one finite float per completion.

    Passes the function only the ``fields`` it accepts (all of them when it has ``**kwargs``);
    each list in ``fields`` is aligned with ``completions``. Any exception inside the function
    becomes a one-line UserError naming the function.
    """
    if len(prompts) != len(completions) or any(len(v) != len(completions) for v in fields.values()):
        raise ValueError("prompts, completions and every field must be aligned (one entry per completion)")
    name, function = reward.name, reward.function
    parameters = _parameters(function)
    missing = [field for field in parameters.required if field not in fields]
    if missing:
        raise UserError(f"reward function {name} needs the field '{missing[0]}', which the prompts file does not "
                        f"have (its fields: {', '.join(sorted(fields)) or 'none'}); add it to every prompt record")
    # copies: a function that edits its lists must not change what the next function sees
    passed = {key: list(value) for key, value in fields.items()
              if (parameters.fields is None or key in parameters.fields) and key not in parameters.takes_lists}
    try:
        result = function(list(prompts), list(completions), **passed)
    except Exception as error:
        raise UserError(f"reward function {name} raised {_one_line(error)}{_where(error)}") from None
    values = _as_list(result, name)
    if len(values) != len(completions):
        raise UserError(f"reward function {name} returned {len(values)} values for {len(completions)} completions")
    return [_real(value, i, name) for i, value in enumerate(values)]


def check_weights(specs: Sequence[str], weights: Sequence[float]) -> list[float]:
    """One finite weight per reward function: ``weights`` itself, or all 1.0 when it is empty."""
    if not weights:
        return [1.0] * len(specs)
    if len(weights) != len(specs):
        raise UserError(f"reward_weights: {len(weights)} weights for {len(specs)} reward functions "
                        f"({', '.join(specs) or 'none'}); give one weight per function, or none for all 1.0")
    checked = []
    for i, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise UserError(f"reward_weights[{i}] is {weight!r}; each weight must be a finite number")
        checked.append(float(weight))
    return checked


def combine_rewards(functions: Sequence[RewardFunction], weights: Sequence[float], prompts: list[str],
                    completions: list[str], fields: dict[str, list]) -> tuple[list[float], dict[str, list[float]]]:
    """(weighted sum of the functions' rewards per completion, each function's own rewards by name)."""
    if len(functions) != len(weights):
        raise ValueError("one weight per reward function (see check_weights)")
    scores = [call_reward_function(reward, prompts, completions, fields) for reward in functions]
    total = [0.0] * len(completions)
    for weight, rewards in zip(weights, scores):
        total = [t + weight * r for t, r in zip(total, rewards)]
    return total, {reward.name: rewards for reward, rewards in zip(functions, scores)}


# --------------------------------------------------------------------------------------------
# From prompt rows to a function's arguments
# --------------------------------------------------------------------------------------------

def prompt_text(prompt_messages: list[dict]) -> str:
    """The text a reward function sees as the prompt: the content of the last user message."""
    return next(m["content"] for m in reversed(prompt_messages) if m["role"] == "user")


def gather_fields(row_fields: Sequence[dict]) -> dict[str, list]:
    """Per-row field dicts (one per completion) -> one list per field name, None where a row lacks it."""
    names = sorted({name for fields in row_fields for name in fields})
    return {name: [fields.get(name) for fields in row_fields] for name in names}
