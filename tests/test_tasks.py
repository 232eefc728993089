"""Synthetic tasks: deterministic files the loaders read, a held-out split that is really held out,
exact-match scoring, and greedy accuracy in the chat template as SFT renders it."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch

from lowrank.errors import UserError
from lowrank.task_scoring import is_correct, practice_answers, task_accuracy
from lowrank.tasks import TASKS, VERSION, generate, write_task

SMALL = {"pretrain": 64, "sft": 40, "eval": 20, "preferences": 30, "prompts": 20}


def _read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def sort_files(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("sort") / "task", "sort", seed=0, **SMALL)


def test_same_seed_writes_identical_files_and_another_seed_does_not(tmp_path):
    first = write_task(tmp_path / "a", "sort", seed=3, **SMALL)
    again = write_task(tmp_path / "b", "sort", seed=3, **SMALL)
    other = write_task(tmp_path / "c", "sort", seed=4, **SMALL)
    assert set(first) == {"pretrain", "sft", "eval", "preferences", "prompts"}
    for name in first:
        assert first[name].read_bytes() == again[name].read_bytes(), name
    assert first["eval"].read_bytes() != other["eval"].read_bytes()
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temp files left


def test_rerun_with_same_settings_skips_and_a_changed_file_is_rewritten(tmp_path):
    paths = write_task(tmp_path, "sort", seed=0, **SMALL)
    stamps = {name: p.stat().st_mtime_ns for name, p in paths.items()}
    write_task(tmp_path, "sort", seed=0, **SMALL)
    assert {name: p.stat().st_mtime_ns for name, p in paths.items()} == stamps
    paths["sft"].write_text("{}\n")  # damaged: its digest no longer matches task.json
    write_task(tmp_path, "sort", seed=0, **SMALL)
    assert len(_read(paths["sft"])) == SMALL["sft"]


def _keys(name: str, texts: list[str]) -> set[str]:
    """The problem keys (as lowrank.tasks defines them) of the problems quoted in ``texts``."""
    keys = set()
    for text in texts:
        if name == "add":
            for a, b in re.findall(r"(\d+)(?: \+ | plus )(\d+)", text):
                keys.add(f"{min(int(a), int(b))}+{max(int(a), int(b))}")
        else:
            for letters in re.findall(r"(?:letters: |sort: |reverse: )([a-z](?: [a-z])*)", text):
                keys.add(" ".join(sorted(letters.split()) if name == "sort" else reversed(letters.split())))
    return keys


@pytest.mark.parametrize("name", TASKS)
def test_held_out_problems_appear_in_no_training_file(name):
    # Full default sizes: with 20k practice problems, most 3-letter problems would occur by chance.
    files = generate(name, seed=1)
    held_out = _keys(name, [r["instruction"] for r in files["eval"]])
    assert len(held_out) == len(files["eval"])  # distinct problems
    training = {
        "pretrain": [r["text"] for r in files["pretrain"]],
        "sft": [r["instruction"] for r in files["sft"]],
        "preferences": [r["prompt"] for r in files["preferences"]],
        "prompts": [r["prompt"] for r in files["prompts"]],
    }
    for file, texts in training.items():
        keys = _keys(name, texts)
        assert keys, file  # the parser found the problems
        assert not keys & held_out, file


@pytest.mark.parametrize("name", TASKS)
def test_answers_are_right_and_rejected_answers_wrong(name):
    files = generate(name, seed=0, **SMALL)
    for record in files["sft"] + files["eval"]:
        assert is_correct(record, record["output"])
    for pair in files["preferences"]:
        record = {"output": pair["chosen"]}
        assert is_correct(record, pair["chosen"]) and not is_correct(record, pair["rejected"])
    for record in files["prompts"]:  # the answer a programmatic reward checks a rollout against
        assert set(record) == {"prompt", "answer"}
        if name == "add":
            assert record["answer"] == str(sum(int(n) for n in re.findall(r"\d+", record["prompt"])))
        else:
            letters = record["prompt"].split(": ")[1].split()
            assert record["answer"].split() == (sorted(letters) if name == "sort" else letters[::-1])
    if name == "sort":
        assert files["eval"][0]["output"].split() == sorted(files["eval"][0]["instruction"].split(": ")[1].split())


def test_files_are_read_by_the_project_loaders(sort_files, tiny_spm):
    from lowrank.data import build_sft_dataset, load_preference_pairs, load_prompt_rows, load_prompts
    from lowrank.models import load_tokenizer
    from lowrank.pretrain import load_documents
    from lowrank.templates import BUILTIN_TEMPLATES

    tokenizer = load_tokenizer(str(tiny_spm))
    for split in ("sft", "eval"):
        examples = build_sft_dataset(tokenizer, BUILTIN_TEMPLATES["vicuna"], str(sort_files[split]), 256)
        assert len(examples) == SMALL[split]
    pairs = load_preference_pairs(str(sort_files["preferences"]))
    assert len(pairs) == SMALL["preferences"] and pairs[0]["prompt_messages"][0]["role"] == "user"
    assert len(load_prompts(str(sort_files["prompts"]))) == SMALL["prompts"]
    rows = load_prompt_rows(str(sort_files["prompts"]))
    assert [row.fields for row in rows] == [{"answer": r["answer"]} for r in _read(sort_files["prompts"])]
    documents = load_documents(tokenizer, str(sort_files["pretrain"]), 512)
    assert len(documents) == len(_read(sort_files["pretrain"]))
    assert documents[0]["input_ids"][-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("response, right", [
    ("a d m q", True),
    ("  a  d m\nq ", True),  # whitespace does not count
    ("a d m q</s> USER: more", True),  # nor what follows an end-of-turn marker
    ("a d m q<|eot_id|>", True),
    ("a d m", False),
    ("a d m q r", False),
    ("a d m q\nsort: b c = b c", False),  # an answer that runs on is wrong
    ("", False),
])
def test_is_correct(response, right):
    assert is_correct({"instruction": "Sort these letters: q d m a", "output": "a d m q"}, response) is right


class _ScriptedModel(torch.nn.Module):
    """Answers each prompt from a table keyed by its token ids, then stops with EOS (a stand-in for a
    model that knows the answers); a prompt rendered differently from SFT's rendering is not in the table."""

    def __init__(self, tokenizer, answers: dict[tuple, str]):
        super().__init__()
        self.tokenizer, self.answers = tokenizer, answers
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, **_):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = tuple(ids[mask.bool()].tolist())
            answer = self.answers.get(prompt, "not in the table")
            tokens = self.tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            rows.append(tokens[:max_new_tokens])
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), pad_token_id)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r)
        return torch.cat([input_ids, out], 1)


def _sft_prompts(tokenizer, template, records) -> list[tuple]:
    """The prompt tokens of each record as SFT trains on them: everything before the first loss token."""
    from lowrank.data import to_messages, tokenize_conversation
    from lowrank.lm_loss import IGNORE_INDEX

    prompts = []
    for record in records:
        example = tokenize_conversation(tokenizer, template, to_messages(record, "test"), 512)
        first = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
        prompts.append(tuple(example["input_ids"][:first]))
    return prompts


@pytest.mark.parametrize("template_name", ["vicuna", "llama2"])
def test_task_accuracy_is_one_for_right_answers_and_zero_for_wrong_ones(sort_files, tiny_spm, template_name):
    from lowrank.models import load_tokenizer
    from lowrank.templates import BUILTIN_TEMPLATES

    tokenizer = load_tokenizer(str(tiny_spm))
    template = BUILTIN_TEMPLATES[template_name]
    records = _read(sort_files["eval"])
    prompts = _sft_prompts(tokenizer, template, records)
    right = _ScriptedModel(tokenizer, {p: r["output"] for p, r in zip(prompts, records)})
    # batch_size 8 over 20 records of several lengths: left padding and a short last batch
    assert task_accuracy(right, tokenizer, template, records, batch_size=8) == 1.0
    wrong = _ScriptedModel(tokenizer, {p: r["output"] + " z" for p, r in zip(prompts, records)})
    assert task_accuracy(wrong, tokenizer, template, records, batch_size=8) == 0.0
    half = _ScriptedModel(tokenizer, {p: r["output"] for p, r in list(zip(prompts, records))[::2]})
    assert task_accuracy(half, tokenizer, template, records, batch_size=8) == 0.5


def test_task_accuracy_runs_a_real_model_and_a_peft_model(sort_files, tiny_spm):
    from peft import get_peft_model

    from lowrank.models import load_base_model, load_tokenizer, lora_config
    from lowrank.templates import BUILTIN_TEMPLATES

    tokenizer = load_tokenizer(str(tiny_spm))
    records = _read(sort_files["eval"])[:6]
    model = load_base_model(str(tiny_spm), "none", gradient_checkpointing=False)
    template = BUILTIN_TEMPLATES["vicuna"]
    assert task_accuracy(model, tokenizer, template, records, max_new_tokens=4) == 0.0  # random weights
    peft_model = get_peft_model(model, lora_config(r=2, target_modules=["q_proj"]))
    peft_model.train()
    assert task_accuracy(peft_model, tokenizer, template, records, max_new_tokens=4) == 0.0
    assert peft_model.training  # the caller's mode is restored


@pytest.mark.parametrize("name", TASKS)
def test_held_out_problems_carry_their_practice_prompt(name):
    records = generate(name, seed=2, **SMALL)
    heads = {line.split(" = ", 1)[0] for doc in records["pretrain"] for line in doc["text"].splitlines()}
    for record in records["eval"]:
        if name == "add":
            a, b = re.findall(r"\d+", record["instruction"])
            assert record["practice"] == f"{a} + {b} ="
        else:
            assert record["practice"] == f"{name}: {record['instruction'].split(': ', 1)[1]} ="
        assert record["practice"][:-2] not in heads  # held out from the practice text too
    # One problem a document: packed with an attention mask between documents, each problem is seen alone.
    assert len(records["pretrain"]) == SMALL["pretrain"]
    for doc in records["pretrain"]:
        assert re.fullmatch(r"\d+ \+ \d+ = \d+" if name == "add" else rf"{name}: [a-z ]+ = [a-z ]+", doc["text"])


def test_practice_answers_continue_the_practice_prompt_up_to_the_line_end(sort_files, tiny_spm):
    from lowrank.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_spm))
    records = _read(sort_files["eval"])
    # As a base pretrained on several problems a document does: the answer, then the next problem on a new line.
    table = {tuple(tokenizer(r["practice"])["input_ids"]): r["output"] + "\nsort: b a = a b" for r in records}
    answers = practice_answers(_ScriptedModel(tokenizer, table), tokenizer, records, batch_size=8)
    assert [a.strip() for a in answers] == [r["output"] for r in records]
    assert all(is_correct(r, a) for r, a in zip(records, answers))
    # The prompt starts as a pretraining document does, with BOS: one keyed without it is not answered.
    without_bos = {k[1:]: v for k, v in table.items()}
    assert not any(is_correct(r, a) for r, a in zip(records, practice_answers(
        _ScriptedModel(tokenizer, without_bos), tokenizer, records, batch_size=8)))


def test_unknown_task_name_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"unknown name 'sorting'; choose one of sort, reverse, add"):
        write_task(tmp_path, "sorting")
    assert not tmp_path.joinpath("task.json").exists()


def test_unknown_size_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"unknown size 'train'"):
        write_task(tmp_path, "sort", train=10)


def test_size_below_one_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"size 'eval' must be a positive integer, got 0"):
        write_task(tmp_path, "sort", eval=0)


def test_task_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "task").write_text("")
    with pytest.raises(UserError, match=r"task dir is a file"):
        write_task(tmp_path / "task", "sort", **SMALL)


def test_a_task_dir_of_an_older_version_is_rewritten(tmp_path):
    paths = write_task(tmp_path, "sort", seed=0, **SMALL)
    marker = tmp_path / "task.json"
    recorded = json.loads(marker.read_text())
    # version 3 wrote prompts without answers; a dir it wrote must not pass for the current files
    old_prompts = [{"prompt": r["prompt"]} for r in _read(paths["prompts"])]
    paths["prompts"].write_text("".join(json.dumps(r) + "\n" for r in old_prompts))
    recorded["version"] = 3
    recorded["digests"]["prompts"] = hashlib.sha256(paths["prompts"].read_bytes()).hexdigest()
    marker.write_text(json.dumps(recorded))
    write_task(tmp_path, "sort", seed=0, **SMALL)
    assert all("answer" in r for r in _read(paths["prompts"]))
    assert json.loads(marker.read_text())["version"] == VERSION


# --- the difficulty knob ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, length", [("sort", [7, 9]), ("reverse", [2, 2]), ("add", [3, 4])])
def test_length_sets_the_letters_or_digits_of_every_problem(name, length):
    low, high = length
    records = generate(name, seed=0, length=length, **SMALL)
    for record in records["sft"] + records["eval"] + records["prompts"]:
        answer = record.get("output", record.get("answer"))
        if name == "add":
            a, b = map(int, re.findall(r"\d+", record.get("instruction", record.get("prompt"))))
            assert all(low <= len(str(n)) <= high for n in (a, b)), record
            assert answer == str(a + b)
        else:
            assert low <= len(answer.split()) <= high, record
    seen = {len(r["output"].split()) for r in records["sft"]} if name != "add" else set()
    assert name == "add" or seen == set(range(low, high + 1))  # the whole range is drawn


def test_default_length_is_the_shipped_task(tmp_path):
    assert generate("sort", seed=5, **SMALL) == generate("sort", seed=5, length=[3, 6], **SMALL)


def test_another_length_rewrites_the_task_dir(tmp_path):
    paths = write_task(tmp_path, "sort", seed=0, **SMALL)
    write_task(tmp_path, "sort", seed=0, length=[8, 10], **SMALL)
    assert json.loads((tmp_path / "task.json").read_text())["length"] == [8, 10]
    assert all(len(r["output"].split()) >= 8 for r in _read(paths["sft"]))


@pytest.mark.parametrize("length, message", [
    (5, r"length must be \[low, high\], the letters per problem, got 5"),
    ([3], r"length must be \[low, high\]"),
    ([3, "6"], r"length must be \[low, high\]"),
    ([True, 6], r"length must be \[low, high\]"),
    ([6, 3], r"length \[6, 3\] must have 1 <= low <= high <= 26 \(letters per problem\)"),
    ([0, 3], r"length \[0, 3\] must have 1 <= low"),
    ([3, 27], r"length \[3, 27\] must have 1 <= low <= high <= 26"),
], ids=["not-a-list", "one-number", "a-string", "a-bool", "low-above-high", "zero", "above-the-alphabet"])
def test_bad_length_is_refused(tmp_path, length, message):
    with pytest.raises(UserError, match=message):
        write_task(tmp_path, "sort", length=length, **SMALL)
    assert not (tmp_path / "task.json").exists()


def test_more_digits_than_the_add_task_allows_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"length \[1, 10\] must have 1 <= low <= high <= 9 \(digits per operand\)"):
        write_task(tmp_path, "add", length=[1, 10], **SMALL)


def test_preference_records_carry_the_answer_a_checker_needs():
    from lowrank.rewards import exact

    files = generate("sort", seed=0, **SMALL)
    pairs = files["preferences"]
    assert all(p["answer"] == p["chosen"] != p["rejected"] for p in pairs)
    scores = exact([p["prompt"] for p in pairs] * 2, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
                   answer=[p["answer"] for p in pairs] * 2)
    assert scores == [1.0] * len(pairs) + [0.0] * len(pairs)


# --- sft_errors: imperfect demonstrations --------------------------------------------------------

def _right_answer(name: str, instruction: str) -> str:
    numbers = re.findall(r"\d+", instruction)
    if name == "add":
        return str(int(numbers[0]) + int(numbers[1]))
    letters = instruction.split(": ", 1)[1].split()
    return " ".join(sorted(letters) if name == "sort" else reversed(letters))


@pytest.mark.parametrize("name", TASKS)
def test_sft_errors_slip_only_the_harder_demonstrations_and_nothing_else(name):
    sizes = {**SMALL, "sft": 400}
    clean = generate(name, seed=0, **sizes)
    sloppy = generate(name, seed=0, sft_errors=0.6, **sizes)
    assert {k: v for k, v in clean.items() if k != "sft"} == {k: v for k, v in sloppy.items() if k != "sft"}
    assert [r["instruction"] for r in clean["sft"]] == [r["instruction"] for r in sloppy["sft"]]
    slipped = [r for r in sloppy["sft"] if r["output"] != _right_answer(name, r["instruction"])]
    harder = [r for r in clean["sft"]
              if (len(r["output"].split()) > 4.5 if name != "add" else
                  _right_answer(name, r["instruction"]) != generate_slip(r["instruction"]))]
    assert slipped and all(r["instruction"] in {h["instruction"] for h in harder} for r in slipped)
    assert 0.45 < len(slipped) / len(harder) < 0.75  # about the share asked for, of the harder half only
    for r in slipped:
        right = _right_answer(name, r["instruction"])
        if name == "add":
            assert r["output"] == generate_slip(r["instruction"]) != right
        else:
            assert r["output"].split() == right.split()[:-1]  # the last letter left out


def generate_slip(instruction: str) -> str:
    """The carry-forgetting sum worked by hand: each column mod 10, the leftmost in full."""
    a, b = re.findall(r"\d+", instruction)
    width = max(len(a), len(b))
    a, b = a.zfill(width), b.zfill(width)
    columns = [int(x) + int(y) for x, y in zip(a, b)]
    return str(columns[0]) + "".join(str(c % 10) for c in columns[1:])


def test_sft_errors_of_one_slip_every_harder_demonstration_and_zero_none():
    sizes = {**SMALL, "sft": 200}
    assert generate("sort", seed=1, sft_errors=0.0, **sizes) == generate("sort", seed=1, **sizes)
    every = generate("sort", seed=1, sft_errors=1.0, **sizes)["sft"]
    assert all(len(r["output"].split()) == len(r["instruction"].split(": ")[1].split()) - (
        len(r["instruction"].split(": ")[1].split()) >= 5) for r in every)


def test_a_carry_forgotten_is_the_classic_slip():
    sloppy = {r["instruction"]: r["output"] for r in generate("add", seed=0, sft_errors=1.0, **SMALL)["sft"]}
    assert all(out == generate_slip(ins) for ins, out in sloppy.items())
    assert generate_slip("What is 49 plus 62?") == "101" and generate_slip("What is 7 plus 71?") == "78"


def test_another_sft_errors_rewrites_the_task_dir(tmp_path):
    paths = write_task(tmp_path, "sort", seed=0, **SMALL)
    before = paths["sft"].read_text()
    write_task(tmp_path, "sort", seed=0, sft_errors=1.0, **SMALL)
    assert json.loads((tmp_path / "task.json").read_text())["sft_errors"] == 1.0
    assert paths["sft"].read_text() != before


@pytest.mark.parametrize("share", [-0.1, 1.5, "half", True], ids=["negative", "above-one", "a-string", "a-bool"])
def test_bad_sft_errors_is_refused(tmp_path, share):
    with pytest.raises(UserError, match=r"task: sft_errors must be a share from 0 to 1, got"):
        write_task(tmp_path, "sort", sft_errors=share, **SMALL)
    assert not (tmp_path / "task.json").exists()
