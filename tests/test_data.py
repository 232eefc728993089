"""Data: record formats, loss masks on assistant turns, truncation, packing, preference pairs, errors."""

from __future__ import annotations

import json

import pytest
import torch

from lowrank.data import (IGNORE_INDEX, SAMPLE_FILES, PromptRow, build_sft_dataset, collate, load_preference_pairs,
                          load_prompt_rows, load_prompts, load_records, pack_examples, sample_property, to_messages,
                          tokenize_conversation)
from lowrank.errors import UserError
from lowrank.templates import BUILTIN_TEMPLATES, render, resolve_template

CHAT = [
    {"role": "system", "content": "Answer in a few words."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Spain?"},
    {"role": "assistant", "content": "Madrid, in the middle of Spain."},
]


@pytest.fixture(scope="module", params=["spm", "bpe"])
def tokenizer_and_template(request, tiny_spm, tiny_bpe):
    """(tokenizer, template name, jinja): spm has no template of its own (vicuna), bpe has llama3."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_spm if request.param == "spm" else tiny_bpe))
    name, template = resolve_template(tokenizer, None)
    return tokenizer, name, template


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _runs(labels: list[int]) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of positions that carry loss."""
    runs, start = [], None
    for i, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


# ------------------------------------------------------------------------------------ loss masks

def test_loss_only_on_assistant_tokens_and_their_end_of_turn(tokenizer_and_template):
    tokenizer, name, template = tokenizer_and_template
    assert name == ("vicuna" if tokenizer.chat_template is None else "tokenizer")
    example = tokenize_conversation(tokenizer, template, CHAT, 512)
    ids, labels = example["input_ids"], example["labels"]

    # Expected positions, found independently: the tokens of the text before each reply
    # (conversation so far + generation prompt) up to the tokens of the text through it.
    def n_tokens(messages, generation):
        return len(tokenizer(render(template, messages, tokenizer, add_generation_prompt=generation),
                             add_special_tokens=False)["input_ids"])

    expected = [(n_tokens(CHAT[:2], True), n_tokens(CHAT[:3], False)), (n_tokens(CHAT[:4], True), n_tokens(CHAT, False))]
    assert _runs(labels) == expected
    assert expected[1][1] == len(ids)  # the conversation ends with the second reply's end token
    assert all(labels[i] == ids[i] for start, end in expected for i in range(start, end))
    end_token = "</s>" if name == "vicuna" else "<|eot_id|>"
    for (start, end), reply in zip(expected, (CHAT[2], CHAT[4])):
        assert tokenizer.decode(ids[start:end]).strip() == reply["content"] + end_token
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_exactly_one_bos_when_the_template_does_not_write_it(spm_tokenizer):
    """LLaMA-2's tokenizer adds BOS itself; a template without bos_token must still give one, not zero or two."""
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids = tokenize_conversation(spm_tokenizer, plain, messages, 64)["input_ids"]
    assert ids[0] == spm_tokenizer.bos_token_id and ids.count(spm_tokenizer.bos_token_id) == 1
    ids = tokenize_conversation(spm_tokenizer, BUILTIN_TEMPLATES["vicuna"], messages, 64)["input_ids"]
    assert ids[0] == spm_tokenizer.bos_token_id and ids.count(spm_tokenizer.bos_token_id) == 1



@pytest.mark.parametrize("template", ["plain", "vicuna"])
def test_prompt_tokens_are_the_start_of_the_trained_conversation(spm_tokenizer, template):
    """PPO's rollout prompts (tokenize_prompt) begin exactly as SFT saw the conversation, one BOS included."""
    from lowrank.data import tokenize_prompt

    jinja = (BUILTIN_TEMPLATES["vicuna"] if template == "vicuna" else
             "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
             "{% if add_generation_prompt %}assistant:{% endif %}")
    prompt = [{"role": "user", "content": "Hi"}]
    ids = tokenize_prompt(spm_tokenizer, jinja, prompt)
    full = tokenize_conversation(spm_tokenizer, jinja, prompt + [{"role": "assistant", "content": "Hello"}], 512)
    assert ids[0] == spm_tokenizer.bos_token_id and ids.count(spm_tokenizer.bos_token_id) == 1
    assert full["input_ids"][:len(ids)] == ids

@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_every_builtin_template_masks_replies_with_their_end_marker(spm_tokenizer, name):
    from lowrank.data import assistant_spans
    from lowrank.templates import end_of_turn

    text, spans = assistant_spans(BUILTIN_TEMPLATES[name], CHAT, spm_tokenizer)
    said = [text[start:end].strip() for start, end in spans]
    eot = end_of_turn(name, spm_tokenizer)
    assert [s.replace(" " + eot, eot) for s in said] == [CHAT[2]["content"] + eot, CHAT[4]["content"] + eot]


def test_template_that_rewrites_earlier_turns_is_refused(spm_tokenizer):
    marks_last = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(UserError, match="prefix"):
        tokenize_conversation(spm_tokenizer, marks_last, CHAT, 512)


def test_template_that_fails_on_a_conversation_names_the_record(spm_tokenizer, tmp_path):
    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
              "{% endif %}{{ m['content'] }}{% endfor %}")
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Hi", "output": "Yo"},
                                              {"instruction": "Hi", "output": "Yo", "system": "Be brief."}])
    with pytest.raises(UserError, match=r"d\.jsonl line 2: the chat template cannot render .*no system role"):
        build_sft_dataset(spm_tokenizer, strict, data, 64)


def test_truncation_keeps_the_start_and_cuts_labels_alike(spm_tokenizer):
    template = BUILTIN_TEMPLATES["vicuna"]
    full = tokenize_conversation(spm_tokenizer, template, CHAT, 512)
    cut = tokenize_conversation(spm_tokenizer, template, CHAT, 40)
    assert len(full["input_ids"]) > 40
    assert cut["input_ids"] == full["input_ids"][:40] and cut["labels"] == full["labels"][:40]


# ------------------------------------------------------------------------------------ records

def test_three_record_formats_give_the_same_messages():
    alpaca = {"instruction": "Sort these numbers.", "input": "3, 1, 2", "output": "1, 2, 3", "system": "Be exact."}
    sharegpt = {"conversations": [{"from": "system", "value": "Be exact."},
                                  {"from": "human", "value": "Sort these numbers.\n\n3, 1, 2"},
                                  {"from": "gpt", "value": "1, 2, 3"}]}
    openai = {"messages": [{"role": "system", "content": "Be exact."},
                           {"role": "user", "content": "Sort these numbers.\n\n3, 1, 2"},
                           {"role": "assistant", "content": "1, 2, 3"}]}
    expected = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Sort these numbers.\n\n3, 1, 2"},
                {"role": "assistant", "content": "1, 2, 3"}]
    assert to_messages(alpaca, "a") == to_messages(sharegpt, "s") == to_messages(openai, "o") == expected
    assert to_messages({"instruction": "Hi", "output": "Hello"}, "a") == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def test_shipped_samples_load_in_every_format(spm_tokenizer):
    template = BUILTIN_TEMPLATES["vicuna"]
    alpaca = build_sft_dataset(spm_tokenizer, template, str(SAMPLE_FILES["alpaca"]), 256)
    sharegpt = build_sft_dataset(spm_tokenizer, template, str(SAMPLE_FILES["sharegpt"]), 256)
    assert len(alpaca) >= 250 and len(sharegpt) >= 50
    lengths = sorted(len(e["input_ids"]) for e in alpaca)
    assert lengths[-1] > 2 * lengths[0]  # realistic, varied lengths
    # multi-turn: a chat with two replies has two loss runs
    assert max(len(_runs(e["labels"])) for e in sharegpt) >= 2
    assert len(load_records(str(SAMPLE_FILES["sharegpt"]))) == len(sharegpt)


def test_examples_too_long_are_dropped_and_the_rest_kept(spm_tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Hi", "output": "Hello"},
                                              {"instruction": "word " * 300, "output": "Long."}])
    examples = build_sft_dataset(spm_tokenizer, BUILTIN_TEMPLATES["vicuna"], data, 128)
    assert len(examples) == 1 and len(examples[0]["input_ids"]) < 128


BAD_DATA = {  # case -> (file name, content, words the one-line message must contain)
    "malformed_line": ("d.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": \n',
                       ["d.jsonl line 3", "malformed JSON"]),
    "malformed_json_array": ("d.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": }\n]\n',
                             ["d.json line 3", "malformed JSON"]),
    "missing_output": ("d.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n',
                       ["d.jsonl line 2", "'output'"]),
    "no_known_fields": ("d.jsonl", '{"question": "a", "answer": "b"}\n', ["line 1", "answer, question"]),
    "unknown_role": ("d.jsonl", json.dumps({"conversations": [{"from": "human", "value": "a"},
                                                               {"from": "robot", "value": "b"}]}) + "\n",
                     ["line 1", "conversations[1].from", "'robot'"]),
    "no_assistant_turn": ("d.jsonl", json.dumps({"messages": [{"role": "user", "content": "a"}]}) + "\n",
                          ["line 1", "no assistant turn"]),
    "empty_dataset": ("d.jsonl", "\n", ["holds no records"]),
    "all_too_long": ("d.jsonl", json.dumps({"instruction": "word " * 100, "output": "b"}) + "\n",
                     ["longer than --max-length 32"]),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_a_one_line_cli_error(case, tiny_spm, tmp_path, capsys):
    from lowrank.cli import main

    name, content, words = BAD_DATA[case]
    (tmp_path / name).write_text(content)
    out = tmp_path / "out"
    code = main(["sft", "--model", str(tiny_spm), "--data", str(tmp_path / name), "--output-dir", str(out),
                 "--quant", "none", "--max-length", "32"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("lowrank sft: error: ")
    for word in words:
        assert word in err
    assert not out.exists()


def test_missing_data_file_names_it(tmp_path):
    with pytest.raises(UserError, match=r"nothere\.jsonl does not exist"):
        load_records(str(tmp_path / "nothere.jsonl"))


def test_unreachable_hub_dataset_is_a_user_error():
    # conftest sets HF_DATASETS_OFFLINE=1: a hub name cannot be fetched, and the message says what to do.
    with pytest.raises(UserError, match="could not load dataset 'someone/no-such-dataset'.*local .json/.jsonl"):
        load_records("someone/no-such-dataset")


# ------------------------------------------------------------------------------------ packing

def _examples(tokenizer, n=7):
    return build_sft_dataset(tokenizer, BUILTIN_TEMPLATES["vicuna"], str(SAMPLE_FILES["alpaca"]), 256)[:n]


def test_packing_fills_rows_and_restarts_positions(spm_tokenizer):
    examples = _examples(spm_tokenizer, 40)
    rows = pack_examples(examples, 256)
    assert len(rows) < len(examples) / 1.5
    assert all(len(r["input_ids"]) <= 256 for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e["input_ids"]) for e in examples)
    seen = []
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for a, b in zip(starts, starts[1:]):
            assert row["position_ids"][a:b] == list(range(b - a))
            assert row["labels"][a] == IGNORE_INDEX  # never predicted from the previous example
            seen.append((tuple(row["input_ids"][a:b]), tuple(row["labels"][a + 1:b])))
    assert sorted(seen) == sorted((tuple(e["input_ids"]), tuple(e["labels"][1:])) for e in examples)


def test_first_token_of_a_packed_example_is_not_predicted_from_the_previous_one():
    examples = [{"input_ids": [11, 12, 13], "labels": [11, 12, 13]}, {"input_ids": [21, 22], "labels": [21, 22]},
                {"input_ids": [31, 32, 33, 34], "labels": [-100, 32, 33, 34]}]
    rows = pack_examples(examples, 5)
    # best fit, longest first: [ex3] then ex1 does not fit beside it -> [ex1, ex2]; data order inside a row
    assert rows == [{"input_ids": [31, 32, 33, 34], "labels": [-100, 32, 33, 34], "position_ids": [0, 1, 2, 3]},
                    {"input_ids": [11, 12, 13, 21, 22], "labels": [-100, 12, 13, -100, 22],
                     "position_ids": [0, 1, 2, 0, 1]}]
    batch = collate(rows, 0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]  # padding: one more "example"
    assert batch["labels"][0, -1] == IGNORE_INDEX and "attention_mask" not in batch


def _per_example_loss_sums(model, batch, segments) -> list[float]:
    """Summed next-token loss of each example: segments are (row, start, end) in the batch."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits.float()  # (batch, seq, vocab)
    token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                                   ignore_index=IGNORE_INDEX, reduction="none")  # (batch, seq-1)
    return [float(token_loss[row, start:end - 1].sum()) for row, start, end in segments]


@pytest.mark.parametrize("attention", ["sdpa", "eager", "gemma2", "gemma3"])
def test_packed_batch_matches_unpacked_loss(tiny_spm, spm_tokenizer, tiny_model_factory, attention):
    from transformers import AutoModelForCausalLM

    if attention.startswith("gemma"):  # sliding-window layers (16 tokens, shorter than the examples) in a packed row
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_factory(tokenizer="spm", arch=attention)),
                                                     dtype=torch.float32).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(tiny_spm), attn_implementation=attention,
                                                     dtype=torch.float32).eval()
    examples = _examples(spm_tokenizer, 6)
    with torch.no_grad():
        unpacked = collate(examples, spm_tokenizer.pad_token_id)
        assert "attention_mask" in unpacked
        expected = _per_example_loss_sums(model, unpacked, [(i, 0, len(e["input_ids"])) for i, e in enumerate(examples)])
        rows = pack_examples(examples, 400)
        assert len(rows) == 2  # two rows of several examples, the shorter one padded
        packed = collate(rows, spm_tokenizer.pad_token_id)
        assert "attention_mask" not in packed
        segments, order = [], []
        for r, row in enumerate(rows):
            starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
            for a, b in zip(starts, starts[1:]):
                segments.append((r, a, b))
                order.append(next(i for i, e in enumerate(examples) if e["input_ids"] == row["input_ids"][a:b]))
        got = _per_example_loss_sums(model, packed, segments)
    assert all(x > 1.0 for x in expected)
    assert torch.allclose(torch.tensor(got), torch.tensor([expected[i] for i in order]), rtol=1e-5, atol=1e-4)


def test_collate_pads_unpacked_rows_with_mask_and_ignored_labels():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [-100]}], None)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]


# ------------------------------------------------------------------------------------ preferences and prompts

def test_preference_sample_has_the_checkable_property():
    pairs = load_preference_pairs(str(SAMPLE_FILES["preferences"]))
    assert len(pairs) >= 150
    assert all(sample_property(p["chosen"]) and not sample_property(p["rejected"]) for p in pairs)
    assert any(len(p["prompt_messages"]) == 2 for p in pairs)  # some prompts carry a system turn
    assert sample_property("Could you PLEASE wait?") and not sample_property("a pleasant day")


def test_preference_pairs_accept_whole_conversations(tmp_path):
    user = {"role": "user", "content": "Help me."}
    data = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": [user], "chosen": [user, {"role": "assistant", "content": "Please wait."}],
         "rejected": [{"role": "assistant", "content": "Wait."}]},
        {"chosen": [user, {"role": "assistant", "content": "Sure, please."}],
         "rejected": [user, {"role": "assistant", "content": "No."}]},
    ])
    pairs = load_preference_pairs(data)
    assert [(p["prompt_messages"], p["chosen"], p["rejected"]) for p in pairs] == [
        ([user], "Please wait.", "Wait."), ([user], "Sure, please.", "No.")]


@pytest.mark.parametrize("record, words", [
    ({"prompt": "Hi", "chosen": "", "rejected": "No."}, ["line 2", "chosen", "empty"]),
    ({"prompt": "Hi", "chosen": "Yes.", "rejected": "  "}, ["line 2", "rejected", "empty"]),
    ({"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}, ["line 2", "identical"]),
    ({"prompt": "Hi", "chosen": "Yes."}, ["line 2", "'rejected'"]),
])
def test_bad_preference_pairs_are_refused_naming_the_line(tmp_path, record, words):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello", "chosen": "Hi, please.", "rejected": "Hi."}, record])
    with pytest.raises(UserError) as error:
        load_preference_pairs(data)
    for word in words:
        assert word in str(error.value)


def test_prompts_load_as_messages_ending_with_a_user_turn(tmp_path):
    prompts = load_prompts(str(SAMPLE_FILES["prompts"]))
    assert len(prompts) >= 80 and all(p[-1]["role"] == "user" for p in prompts)
    bad = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "Hi"}, {"text": "no prompt here"}])
    with pytest.raises(UserError, match="line 2: no 'prompt' or 'messages'"):
        load_prompts(bad)


def test_prompt_rows_carry_the_other_fields_of_each_record(tmp_path):
    system = {"role": "system", "content": "Answer with the letters only."}
    user = {"role": "user", "content": "Sort these letters: c a b"}
    data = write_jsonl(tmp_path / "q.jsonl", [
        {"prompt": "Sort these letters: q d m a", "answer": "a d m q", "level": 2},
        {"prompt": [system, user], "answer": "a b c"},
        {"messages": [user], "answer": "a b c", "source": "hand-made"},
        {"prompt": "What is 2 plus 2?"},  # no answer: datasets gives it answer=None, which is left out
    ])
    rows = load_prompt_rows(data)
    assert rows == [
        PromptRow([{"role": "user", "content": "Sort these letters: q d m a"}], {"answer": "a d m q", "level": 2},
                  f"{data} line 1"),
        PromptRow([system, user], {"answer": "a b c"}, f"{data} line 2"),
        PromptRow([user], {"answer": "a b c", "source": "hand-made"}, f"{data} line 3"),
        PromptRow([{"role": "user", "content": "What is 2 plus 2?"}], {}, f"{data} line 4"),
    ]
    assert load_prompts(data) == [row.prompt_messages for row in rows]


def test_prompt_rows_keep_field_types_a_column_cannot_hold_together(tmp_path):
    # a number in one record and text in another: Arrow cannot make one column of them, the parsed records are used
    data = tmp_path / "q.json"
    data.write_text(json.dumps([{"prompt": "What is 1,000 plus 234?", "answer": 1234},
                                {"prompt": "Natalia sold clips...", "answer": "She sold 72 clips.\n#### 72"}]))
    rows = load_prompt_rows(str(data))
    assert [row.fields for row in rows] == [{"answer": 1234}, {"answer": "She sold 72 clips.\n#### 72"}]
    assert [row.where for row in rows] == [f"{data} record 1", f"{data} record 2"]


def test_prompt_rows_refuse_a_record_without_a_prompt(tmp_path):
    bad = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "Hi", "answer": "a"}, {"answer": "b"}])
    with pytest.raises(UserError, match=r"q\.jsonl line 2: no 'prompt' or 'messages' field"):
        load_prompt_rows(bad)
    ends_with_reply = write_jsonl(tmp_path / "r.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                                         {"role": "assistant", "content": "Hello"}]}])
    with pytest.raises(UserError, match=r"r\.jsonl line 1: the prompt in 'messages' ends with an assistant message"):
        load_prompt_rows(ends_with_reply)


def test_prompt_rows_read_a_named_prompt_field_and_keep_the_rest(tmp_path):
    from lowrank.data import load_prompt_rows

    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}) + "\n")
    (row,) = load_prompt_rows(str(path), prompt_field="question")
    assert row.prompt_messages == [{"role": "user", "content": "What is 2 + 3?"}]
    assert row.fields == {"answer": "2 + 3 = 5\n#### 5"}
    with pytest.raises(UserError, match="line 1: no 'prompt' or 'messages' field"):
        load_prompt_rows(str(path))
