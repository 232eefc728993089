"""`lowrank chat` and the backends under it: a real terminal session, prompt formatting, bad input."""

from __future__ import annotations

import io
import json
import sys

import pexpect
import pytest

from lowrank.apps.backends import SamplingConfig, render_chat, turn_stop_strings
from lowrank.apps.loading import load_backend
from lowrank.errors import UserError
from lowrank.apps.chat import chat_loop
from lowrank.apps.hf_backend import cut_at_stop_strings
from lowrank.cli import main
from lowrank.templates import BUILTIN_TEMPLATES
from test_apps_support import make_tiny_gguf, make_unknown_arch_gguf

LOWRANK = [sys.executable, "-c", "import sys; from lowrank.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_spm):
    return make_tiny_gguf(tiny_spm, tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="module")
def gguf_backend(tiny_gguf):
    backend = load_backend(tiny_gguf, n_ctx=256, n_threads=1)
    yield backend
    backend.close()


def spawn_chat(*args: str) -> pexpect.spawn:
    child = pexpect.spawn(LOWRANK[0], LOWRANK[1:] + ["chat", *args], encoding="utf-8", timeout=60,
                          dimensions=(40, 200))
    child.expect("you> ")
    return child


def test_terminal_chat_streams_a_reply_then_resets_and_exits(tiny_gguf):
    child = spawn_chat(str(tiny_gguf), "--max-tokens", "24", "--temperature", "0.8", "--threads", "1")
    child.sendline("Hello, who are you?")
    child.expect("model> ")
    child.expect(r"\[(\d+) tokens in [\d.]+ s, ([\d.]+) tokens/s, first token after [\d.]+ s; load [\d.]+ s\]")
    tokens, speed = int(child.match.group(1)), float(child.match.group(2))
    assert 0 < tokens <= 30 and speed > 0  # 24 sampled tokens, re-tokenized from the text
    child.expect("you> ")
    child.sendline("/reset")
    child.expect(r"\[conversation cleared\]")
    child.expect("you> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_reply_and_keeps_the_session(tiny_gguf):
    # Greedy and long: the reply would run for many seconds if Ctrl-C did not stop it.
    child = spawn_chat(str(tiny_gguf), "--max-tokens", "4000", "--ctx", "8192", "--temperature", "0",
                       "--threads", "1")
    child.sendline("Tell me a long story.")
    child.expect("model> ")
    child.expect(r"\S{5}")  # reply text is streaming in
    child.sendintr()
    child.expect(r"\[stopped\]", timeout=10)
    child.expect(r"\[(\d+) tokens in")
    assert int(child.match.group(1)) < 3000
    child.expect("you> ")
    child.sendline("And another one?")  # the session is still alive and answers again
    child.expect("model> ")
    child.expect(r"\S{5}")
    child.sendintr()
    child.expect(r"\[stopped\]", timeout=10)
    child.expect("you> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_k_m"])
def test_quantized_gguf_streams_a_reply(tmp_path, tiny_spm, gguf_type):
    # Quantized weights take llama.cpp's other CPU kernels (AMX/repacked buffers where the CPU has them).
    backend = load_backend(make_tiny_gguf(tiny_spm, tmp_path, gguf_type), n_ctx=128, n_threads=1)
    try:
        reply = backend.generate([{"role": "user", "content": "Hello"}], SamplingConfig(max_tokens=8, temperature=0.8))
        text = "".join(reply)
        # A crash in llama.cpp's kernels would take the whole process down before this line.
        assert reply.prompt_tokens > 0 and text and reply.tokens > 0
    finally:
        backend.close()


def test_gguf_prompt_is_formatted_as_llama_cpp_python_does(gguf_backend):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}]
    # The template stored in the GGUF is the one used (the built-in default when it stores none).
    template = gguf_backend.llm.metadata.get("tokenizer.chat_template", BUILTIN_TEMPLATES["vicuna"])
    assert template == gguf_backend.template
    theirs = Jinja2ChatFormatter(template, eos_token="</s>", bos_token="<s>")(messages=messages).prompt
    assert gguf_backend.render(messages) == theirs
    if template == BUILTIN_TEMPLATES["vicuna"]:
        assert theirs == "<s>Be brief. USER: Hi ASSISTANT: Hello!</s> USER: Name a colour. ASSISTANT:"
        assert gguf_backend.stop_strings == ["</s>", "USER:"]


def test_stop_strings_come_from_the_templates_end_of_turn():
    assert turn_stop_strings(BUILTIN_TEMPLATES["llama3"], "<|begin_of_text|>", "<|end_of_text|>") == [
        "<|eot_id|>", "<|start_header_id|>user<|end_header_id|>", "<|end_of_text|>"]
    assert turn_stop_strings(BUILTIN_TEMPLATES["chatml"], "", "</s>") == ["<|im_end|>", "<|im_start|>user", "</s>"]
    assert turn_stop_strings(BUILTIN_TEMPLATES["alpaca"], "<s>", "</s>") == ["</s>", "### Instruction:"]
    # Held-back text is released when no stop string follows, cut when one does.
    assert "".join(cut_at_stop_strings(iter(["Hel", "lo <|im", "_end|> junk"]), ["<|im_end|>"])) == "Hello "
    assert "".join(cut_at_stop_strings(iter(["a <|i", "m fine"]), ["<|im_end|>"])) == "a <|im fine"


def test_long_conversation_drops_oldest_turns_and_says_so(gguf_backend):
    words = " ".join(["apple"] * 30)
    lines = iter([f"first {words}", f"second {words}", f"third {words}", f"fourth {words}", "/exit"])
    out = io.StringIO()
    chat_loop(gguf_backend, SamplingConfig(max_tokens=16, temperature=0.8), system="You are terse.",
              read_line=lambda prompt: next(lines), out=out)
    text = out.getvalue()
    assert "is longer than the 256-token context: left out the" in text
    assert text.count("tokens/s") == 4  # every message was still answered

    reply = gguf_backend.generate([{"role": "system", "content": "You are terse."}]
                                  + [{"role": r, "content": f"{r} {words}"} for r in ["user", "assistant"] * 3]
                                  + [{"role": "user", "content": "last"}], SamplingConfig(max_tokens=16))
    assert reply.dropped_turns >= 1
    assert reply.messages[0] == {"role": "system", "content": "You are terse."}  # the system prompt stays
    assert reply.messages[-1] == {"role": "user", "content": "last"}
    assert reply.prompt_tokens + 16 <= 256
    list(reply)


def test_message_longer_than_context_is_an_error_and_the_chat_goes_on(gguf_backend):
    lines = iter([" ".join(["banana"] * 400), "short one", "/exit"])
    out = io.StringIO()
    assert chat_loop(gguf_backend, SamplingConfig(max_tokens=8), read_line=lambda prompt: next(lines), out=out) == 0
    text = out.getvalue()
    assert "error: the message does not fit in the context" in text and "(--ctx)" in text
    assert text.count("tokens/s") == 1  # the short message after it was answered


# --- bad input at start-up: one line on stderr, exit status 2 ---------------------------------------------

def run_chat_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["chat", *args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_missing_model_file_is_a_one_line_error(capsys, tmp_path):
    code, err = run_chat_cli(capsys, str(tmp_path / "nope.gguf"))
    assert code == 2
    assert err == f"lowrank chat: error: {tmp_path / 'nope.gguf'}: no such file or directory; " \
                  "give a .gguf file, an adapter dir or a model dir"


def test_file_that_is_not_gguf_is_a_one_line_error(capsys, tmp_path):
    (tmp_path / "model.gguf").write_text("just text")
    code, err = run_chat_cli(capsys, str(tmp_path / "model.gguf"))
    assert code == 2
    assert err.startswith("lowrank chat: error: ") and "is not a GGUF file (it does not start with the bytes 'GGUF')" in err


def test_gguf_of_unknown_architecture_is_a_one_line_error(capsys, tmp_path):
    path = make_unknown_arch_gguf(tmp_path / "alien.gguf")
    code, err = run_chat_cli(capsys, str(path))
    assert code == 2
    assert err.startswith("lowrank chat: error: llama.cpp") and "architecture 'notamodelarch'" in err


def test_adapter_without_its_base_is_a_one_line_error(capsys, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": None}))
    (adapter / "lowrank.json").write_text(json.dumps({"stage": "sft", "base": {"id": str(tmp_path / "gone")}}))
    code, err = run_chat_cli(capsys, str(adapter))
    assert code == 2
    assert err == (f"lowrank chat: error: adapter {adapter}: its base model '{tmp_path / 'gone'}' is not there "
                   "(no config.json); pass the base with --base DIR")


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory, tiny_bpe):
    """A LoRA adapter on the tiny BPE model whose lowrank.json records a ChatML template (not the tokenizer's)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapter") / "sft"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_bpe), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(out)
    (out / "lowrank.json").write_text(json.dumps({
        "stage": "sft", "base": {"id": str(tiny_bpe), "path": str(tiny_bpe)},
        "chat_template": {"name": "chatml", "jinja": BUILTIN_TEMPLATES["chatml"]}}))
    return out


def test_adapter_chat_uses_the_template_recorded_in_lowrank_json(sft_adapter, tmp_path):
    backend = load_backend(sft_adapter, device="cpu")
    assert backend.kind == "adapter" and backend.template_source == "chatml from lowrank.json"
    assert backend.stop_strings[0] == "<|im_end|>"
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    assert backend.render(messages) == render_chat(BUILTIN_TEMPLATES["chatml"], messages,
                                                   bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    reply = backend.generate(messages, SamplingConfig(max_tokens=12, seed=0))
    pieces = list(reply)
    assert len(pieces) > 1 and reply.tokens > 0 and reply.tokens_per_second > 0  # streamed piece by piece

    # --base replaces a base that moved away since training.
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in sft_adapter.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    meta = json.loads((moved / "lowrank.json").read_text())
    (moved / "lowrank.json").write_text(json.dumps({**meta, "base": {"id": str(tmp_path / "elsewhere")}}))
    with pytest.raises(Exception, match="pass the base with --base DIR"):
        load_backend(moved)
    rebased = load_backend(moved, base=meta["base"]["path"], device="cpu")
    assert rebased.template_source == "chatml from lowrank.json"
    assert "".join(rebased.generate(messages, SamplingConfig(max_tokens=4, seed=0)))


def test_a_template_that_does_not_render_is_a_message_and_the_session_goes_on(gguf_backend, monkeypatch):
    import io

    from lowrank.apps.chat import chat_loop

    monkeypatch.setattr(gguf_backend, "template", "{{ messages[0].content.upper().nope.deeper }}")
    lines = iter(["hi", "/exit"])
    out = io.StringIO()
    assert chat_loop(gguf_backend, SamplingConfig(max_tokens=4, seed=0), read_line=lambda _: next(lines), out=out) == 0
    assert "error: the chat template does not render (UndefinedError: " in out.getvalue()
    assert "Traceback" not in out.getvalue()


def test_a_template_with_a_syntax_error_is_a_user_error():
    with pytest.raises(UserError, match=r"the model.s chat template is not valid Jinja: Unexpected end of template"):
        render_chat("{% for m in messages %}{{ m.content }}", [{"role": "user", "content": "hi"}],
                    bos_token="<s>", eos_token="</s>")


def test_ctrl_c_stops_a_reply_even_where_the_backend_swallows_keyboard_interrupt():
    """llama-cpp-python's generation loop can catch a KeyboardInterrupt that lands inside it; Ctrl-C must
    still stop the reply, through the reply's stop event, and the chat must go on."""
    import os
    import signal
    import threading

    from lowrank.apps.backends import ChatBackend
    from lowrank.templates import BUILTIN_TEMPLATES

    class Swallowing(ChatBackend):
        path, kind, n_ctx, load_seconds = "fake.gguf", "gguf", 4096, 0.0
        template, bos_token, eos_token = BUILTIN_TEMPLATES["chatml"], "", ""

        def count_tokens(self, text):
            return len(text.split())

        def _stream(self, prompt, sampling, max_new_tokens, stop_event):
            for i in range(20000):  # ~20 s if nothing stops it
                if stop_event.is_set():
                    return
                try:  # the backend's own loop, where the user's Ctrl-C lands (mid-reply, at token 50)
                    if i == 50:
                        os.kill(os.getpid(), signal.SIGINT)
                    threading.Event().wait(0.001)
                except BaseException:  # noqa: BLE001 - what a careless generation loop does
                    pass
                yield "w "

    lines = iter(["tell me a story", "/exit"])
    out = io.StringIO()
    assert chat_loop(Swallowing(), SamplingConfig(max_tokens=20000), read_line=lambda _: next(lines), out=out) == 0
    text = out.getvalue()
    assert "[stopped]" in text
    assert text.count("w ") < 1000  # stopped within a few tokens of the Ctrl-C, not at the end
