"""Programmatic GRPO rewards: built-ins, user functions from files and modules, checked calls, weights."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest

from lowrank.data import load_prompt_rows
from lowrank.errors import UserError
from lowrank.rewards import (BUILTINS, RewardFunction, call_reward_function, check_weights, combine_rewards,
                             gather_fields, load_reward_function, prompt_text)
from lowrank.tasks import TASKS, generate, write_task

PROMPTS = ["Sort these letters: c a b", "What is 2 plus 2?", "Sort these letters: z y", "Reverse: a b"]
COMPLETIONS = ["a b c", "4", "y z", "b a"]
FIELDS = {"answer": ["a b c", "4", "y z", "a b"], "level": [1, 2, 3, 4]}


def _write(path, source: str) -> str:
    path.write_text(textwrap.dedent(source))
    return str(path)


def _user_error(spec_or_call, *args) -> str:
    """The message of the UserError raised by ``spec_or_call(*args)``, checked to be one line."""
    with pytest.raises(UserError) as error:
        spec_or_call(*args)
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def _call(spec: str, completions=COMPLETIONS, fields=FIELDS) -> list[float]:
    return call_reward_function(load_reward_function(spec), PROMPTS[:len(completions)], completions, fields)


# ------------------------------------------------------------------------------------ built-ins

def test_exact_scores_the_answer_up_to_whitespace_and_end_of_turn():
    completions = ["a b c", "  4\n", "y  z</s> USER: more", "a b extra"]
    # right, right (whitespace), right (after the end-of-turn marker nothing counts), wrong (runs on)
    assert _call("exact", completions) == [1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("completion, answer, score", [
    ("She sold 48 / 2 = 24 clips in May, so 48 + 24 = 72.", "Natalia sold 48/2 = 24 clips in May.\n#### 72", 1.0),
    ("The total is 1,234 dollars.", "#### 1,234", 1.0),  # thousands separators on both sides
    ("#### 1234", "1,234", 1.0),
    ("So the answer is #### 72. Then 5 more.", "72", 1.0),  # after '####' its first number, not the last
    ("It costs 3.0 dollars", 3, 1.0),  # compared by value; the answer may be a JSON number
    ("It is -5.", "-5", 1.0),
    ("5-3 leaves 2", "2", 1.0),  # '-3' here is a subtraction, not minus three; the last number is 2
    ("1, 2, 3", "123", 0.0),  # a list is not a number with separators
    ("72 clips, or 73", "#### 72", 0.0),  # the last number counts
    ("I do not know", "#### 72", 0.0),
    ("12.5", "12.50", 1.0),
    ("12.5", "#### 125", 0.0),
])
def test_numeric_compares_the_final_number_gsm8k_style(completion, answer, score):
    assert call_reward_function(load_reward_function("numeric"), ["q"], [completion], {"answer": [answer]}) == [score]


def test_numeric_refuses_an_answer_that_is_no_number():
    message = _user_error(call_reward_function, load_reward_function("numeric"), ["q"], ["7"], {"answer": ["seven"]})
    assert message.startswith("reward function numeric raised ValueError: the answer 'seven' of completion 0")


def test_builtin_without_the_answer_field_names_the_field():
    message = _user_error(call_reward_function, load_reward_function("exact"), PROMPTS, COMPLETIONS,
                          {"level": FIELDS["level"]})
    assert message.startswith("reward function exact needs the field 'answer', which the prompts file does not have")
    assert "its fields: level" in message


def test_builtin_with_a_row_lacking_its_answer_names_the_completion():
    fields = {"answer": ["a b c", None, "y z", "a b"]}
    message = _user_error(call_reward_function, load_reward_function("exact"), PROMPTS, COMPLETIONS, fields)
    assert "completion 1 has no answer" in message


@pytest.mark.parametrize("name", TASKS)
def test_exact_gives_task_prompts_one_for_the_answer_and_zero_for_the_rejected_answers(name, tmp_path):
    small = {"pretrain": 8, "sft": 4, "eval": 4, "preferences": 30, "prompts": 20}
    paths = write_task(tmp_path, name, seed=0, **small)
    rows = load_prompt_rows(str(paths["prompts"]))  # the file as GRPO reads it
    prompts = [prompt_text(row.prompt_messages) for row in rows]
    fields = gather_fields([row.fields for row in rows])
    assert call_reward_function(load_reward_function("exact"), prompts, fields["answer"], fields) == [1.0] * 20
    pairs = generate(name, seed=0, **small)["preferences"]  # each pair's chosen answer is right, rejected wrong
    pair_fields = {"answer": [p["chosen"] for p in pairs]}
    rejected = [p["rejected"] for p in pairs]
    assert call_reward_function(load_reward_function("exact"), [p["prompt"] for p in pairs], rejected,
                                pair_fields) == [0.0] * 30
    if name == "add":  # the sums are numbers: the GSM8K-style checker agrees
        assert call_reward_function(load_reward_function("numeric"), [p["prompt"] for p in pairs], rejected,
                                    pair_fields) == [0.0] * 30
        assert call_reward_function(load_reward_function("numeric"), prompts, fields["answer"], fields) == [1.0] * 20


# ------------------------------------------------------------------------------------ user functions

def test_function_from_a_file_gets_only_the_fields_it_names(tmp_path):
    path = _write(tmp_path / "my_rewards.py", """
        seen = {}

        def ends_with_answer(prompts, completions, answer):
            seen["fields"] = ["answer"]
            return [1.0 if c.strip().endswith(a) else 0.0 for c, a in zip(completions, answer)]

        def length_penalty(prompts, completions, **kwargs):
            seen["kwargs"] = sorted(kwargs)
            return [-0.1 * len(c.split()) for c in completions]
    """)
    ends = load_reward_function(f"{path}:ends_with_answer")
    assert ends.name == f"{path}:ends_with_answer"
    assert call_reward_function(ends, PROMPTS, COMPLETIONS, FIELDS) == [1.0, 1.0, 1.0, 0.0]
    length = load_reward_function(f"{path}:length_penalty")
    assert call_reward_function(length, PROMPTS, COMPLETIONS, FIELDS) == pytest.approx([-0.3, -0.1, -0.2, -0.2])
    assert length.function.__globals__["seen"]["kwargs"] == ["answer", "level"]  # **kwargs gets every field


def test_function_from_a_module_on_the_path(tmp_path, monkeypatch):
    _write(tmp_path / "lowrank_test_reward_module.py", """
        def mentions_prompt_word(prompts, completions, *, level=None):
            level = level or [0] * len(completions)
            return [float(p.split()[0].lower() in c.lower()) + l for p, c, l in zip(prompts, completions, level)]
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        reward = load_reward_function("lowrank_test_reward_module:mentions_prompt_word")
        assert call_reward_function(reward, ["Sort it", "Say hi"], ["I sort", "hello"], {"level": [0, 2]}) == [1.0, 2.0]
        assert call_reward_function(reward, ["Sort it", "Say hi"], ["I sort", "hello"], {}) == [1.0, 0.0]  # default
    finally:
        sys.modules.pop("lowrank_test_reward_module", None)


def test_results_may_be_a_tuple_an_array_or_a_tensor_and_bools_count(tmp_path):
    path = _write(tmp_path / "r.py", """
        import numpy as np
        import torch

        def as_tuple(prompts, completions):
            return tuple(len(c) > 2 for c in completions)  # bools: True is 1.0

        def as_array(prompts, completions):
            return np.arange(len(completions), dtype=np.float32) / 2

        def as_tensor(prompts, completions):
            return torch.ones(len(completions), requires_grad=True) * 3
    """)
    assert _call(f"{path}:as_tuple") == [1.0, 0.0, 1.0, 1.0]
    assert _call(f"{path}:as_array") == [0.0, 0.5, 1.0, 1.5]
    assert _call(f"{path}:as_tensor") == [3.0, 3.0, 3.0, 3.0]


def test_a_function_that_edits_its_lists_does_not_change_what_the_next_one_sees(tmp_path):
    path = _write(tmp_path / "r.py", """
        def greedy(prompts, completions, answer):
            completions[:] = answer = ["x"] * len(completions)
            return [0.0] * len(completions)
    """)
    functions = [load_reward_function(f"{path}:greedy"), load_reward_function("exact")]
    _, per_function = combine_rewards(functions, [1.0, 1.0], PROMPTS, COMPLETIONS, FIELDS)
    assert per_function["exact"] == [1.0, 1.0, 1.0, 0.0]


def test_combined_reward_is_the_weighted_sum(tmp_path):
    path = _write(tmp_path / "r.py", """
        def short(prompts, completions):
            return [1.0 if len(c) <= 3 else 0.0 for c in completions]
    """)
    specs = ["exact", f"{path}:short"]
    weights = check_weights(specs, [2.0, -0.5])
    total, per_function = combine_rewards([load_reward_function(s) for s in specs], weights, PROMPTS, COMPLETIONS,
                                          FIELDS)
    # exact [1, 1, 1, 0], short ("a b c" is 5 characters) [0, 1, 1, 1]: 2 * exact - 0.5 * short
    assert per_function == {"exact": [1.0, 1.0, 1.0, 0.0], f"{path}:short": [0.0, 1.0, 1.0, 1.0]}
    assert total == [2.0, 1.5, 1.5, -0.5]
    assert check_weights(specs, []) == [1.0, 1.0]  # no weights: each counts once


def test_prompt_text_is_the_last_user_message_and_fields_are_gathered_per_completion():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Sort: b a"}]
    assert prompt_text(messages) == "Sort: b a"
    assert gather_fields([{"answer": "a b"}, {"answer": "c", "level": 2}]) == {"answer": ["a b", "c"],
                                                                                "level": [None, 2]}


# ------------------------------------------------------------------------------------ loading errors

def test_unknown_builtin_lists_the_builtins():
    message = _user_error(load_reward_function, "exactly")
    assert message.startswith("unknown reward function 'exactly'; built-ins are exact, numeric")
    assert set(BUILTINS) == {"exact", "numeric"}


def test_missing_file_is_named(tmp_path):
    message = _user_error(load_reward_function, f"{tmp_path}/nothere.py:score")
    assert message == f"reward function {tmp_path}/nothere.py:score: file {tmp_path}/nothere.py does not exist"


def test_file_that_fails_to_import_names_the_error_in_one_line(tmp_path):
    path = _write(tmp_path / "broken.py", """
        import lowrank_no_such_module

        def score(prompts, completions):
            return [0.0] * len(completions)
    """)
    message = _user_error(load_reward_function, f"{path}:score")
    assert message.startswith(f"reward function {path}:score: cannot import {path}: ModuleNotFoundError: "
                              "No module named 'lowrank_no_such_module'")
    assert f"({path} line 2)" in message


def test_file_with_a_syntax_error_names_the_line(tmp_path):
    path = _write(tmp_path / "typo.py", """
        def score(prompts, completions)
            return [0.0] * len(completions)
    """)
    message = _user_error(load_reward_function, f"{path}:score")
    assert "cannot import" in message and "SyntaxError" in message and "line 2" in message


def test_module_that_cannot_be_imported_is_named():
    message = _user_error(load_reward_function, "lowrank_no_such_package.rewards:score")
    assert message == ("reward function lowrank_no_such_package.rewards:score: cannot import module "
                       "'lowrank_no_such_package.rewards': ModuleNotFoundError: "
                       "No module named 'lowrank_no_such_package'")


def test_missing_function_lists_the_functions_there(tmp_path):
    path = _write(tmp_path / "r.py", """
        def correctness(prompts, completions):
            return [0.0] * len(completions)

        def format_ok(prompts, completions):
            return [0.0] * len(completions)
    """)
    message = _user_error(load_reward_function, f"{path}:correct")
    assert message == (f"reward function {path}:correct: {path} has no function 'correct'; "
                       "functions there: correctness, format_ok")


def test_attribute_that_is_not_callable_is_refused(tmp_path):
    path = _write(tmp_path / "r.py", "THRESHOLD = 0.5\n")
    message = _user_error(load_reward_function, f"{path}:THRESHOLD")
    assert message == f"reward function {path}:THRESHOLD: 'THRESHOLD' is a float, not a function"


@pytest.mark.parametrize("signature", ["(completions)", "(*, prompts, completions)",
                                       "(prompts, completions, answer, /)"])
def test_function_that_cannot_take_prompts_and_completions_is_refused(tmp_path, signature):
    path = _write(tmp_path / "r.py", f"def score{signature}:\n    return []\n")
    message = _user_error(load_reward_function, f"{path}:score")
    assert message.startswith(f"reward function {path}:score: cannot be called as "
                              "score(prompts, completions, **fields)")
    assert message.endswith(f"its signature is score{signature}")


# ------------------------------------------------------------------------------------ calling errors

def _bad(tmp_path, body: str) -> RewardFunction:
    path = _write(tmp_path / "bad.py", "import math\n\ndef score(prompts, completions, **kwargs):\n    " + body + "\n")
    return load_reward_function(f"{path}:score")


def test_wrong_number_of_values_is_refused(tmp_path):
    reward = _bad(tmp_path, "return [1.0, 0.0, 1.0]")
    message = _user_error(call_reward_function, reward, PROMPTS, COMPLETIONS, FIELDS)
    assert message == f"reward function {reward.name} returned 3 values for 4 completions"


@pytest.mark.parametrize("bad", ["math.nan", "math.inf", "-math.inf"])
def test_nan_or_infinite_reward_is_refused(tmp_path, bad):
    reward = _bad(tmp_path, f"return [1.0, {bad}, 0.0, 0.0]")
    message = _user_error(call_reward_function, reward, PROMPTS, COMPLETIONS, FIELDS)
    assert message.startswith(f"reward function {reward.name} returned {float(eval(bad, {'math': math}))} "
                              "for completion 1; rewards must be finite")


@pytest.mark.parametrize("bad, kind", [("'1.0'", "str"), ("None", "NoneType"), ("1j", "complex"), ("[1.0]", "list")])
def test_reward_that_is_not_a_real_number_names_its_index_and_type(tmp_path, bad, kind):
    reward = _bad(tmp_path, f"return [0.0, 1.0, {bad}, 0.0]")
    message = _user_error(call_reward_function, reward, PROMPTS, COMPLETIONS, FIELDS)
    assert message.startswith(f"reward function {reward.name} returned a {kind} for completion 2")


@pytest.mark.parametrize("bad, words", [("1.0", "returned a float; return a list"),
                                        ("(c for c in completions)", "returned a generator"),
                                        ("__import__('numpy').ones((2, 2))", "returned a 2-D ndarray")])
def test_result_that_is_not_a_list_is_refused(tmp_path, bad, words):
    reward = _bad(tmp_path, f"return {bad}")
    assert words in _user_error(call_reward_function, reward, PROMPTS, COMPLETIONS, FIELDS)


def test_exception_inside_the_function_is_one_line_naming_it(tmp_path):
    reward = _bad(tmp_path, "return [float(kwargs['answer'][i]) for i in range(len(completions))]")
    message = _user_error(call_reward_function, reward, PROMPTS, COMPLETIONS, FIELDS)
    assert message.startswith(f"reward function {reward.name} raised ValueError: "
                              "could not convert string to float: 'a b c'")
    assert message.endswith(f"({tmp_path / 'bad.py'} line 4)")


def test_missing_required_field_names_function_and_field(tmp_path):
    path = _write(tmp_path / "r.py", """
        def score(prompts, completions, solution, **kwargs):
            return [float(c == s) for c, s in zip(completions, solution)]
    """)
    reward = load_reward_function(f"{path}:score")
    message = _user_error(call_reward_function, reward, PROMPTS, COMPLETIONS, FIELDS)
    assert message == (f"reward function {path}:score needs the field 'solution', which the prompts file does not have "
                       "(its fields: answer, level); add it to every prompt record")


# ------------------------------------------------------------------------------------ weights

def test_weights_of_another_length_are_refused():
    message = _user_error(check_weights, ["exact", "numeric"], [1.0, 0.5, 2.0])
    assert message.startswith("reward_weights: 3 weights for 2 reward functions (exact, numeric)")


@pytest.mark.parametrize("weight", [math.nan, math.inf, "1.0", True])
def test_weight_that_is_not_a_finite_number_is_refused(weight):
    message = _user_error(check_weights, ["exact", "numeric"], [1.0, weight])
    assert message.startswith("reward_weights[1] is") and "finite number" in message


def test_tensor_results_keep_float_precision(tmp_path):
    path = _write(tmp_path / "r.py", """
        import torch

        def third(prompts, completions):
            return torch.full((len(completions),), 1 / 3, dtype=torch.float64)
    """)
    assert _call(f"{path}:third") == [1 / 3] * 4
    assert all(type(value) is float for value in _call(f"{path}:third"))  # plain floats, loggable as JSON
