"""`lowrank app`: the Gradio page started as a user would, driven through its API and a real browser."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from lowrank.cli import main
from test_apps_support import make_tiny_gguf, make_unknown_arch_gguf

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
CTX = 256  # small, so that a long message overflows it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_spm) -> Path:
    """Two good GGUFs and one bad model of each kind the page must survive."""
    root = tmp_path_factory.mktemp("models")
    good = make_tiny_gguf(tiny_spm, root / "export")
    shutil.copy(good, root / "copy-of-tiny.gguf")
    (root / "broken.gguf").write_text("this is not a model\n")
    make_unknown_arch_gguf(root / "alien.gguf")
    (root / "vanished.gguf").write_bytes(good.read_bytes()[:64])  # deleted after the app lists it
    orphan = root / "orphan-adapter"
    orphan.mkdir()
    (orphan / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (orphan / "lowrank.json").write_text(json.dumps({"stage": "sft", "base": {"id": str(root / "no-such-base")}}))
    return root


@pytest.fixture(scope="module")
def app(models_dir, tmp_path_factory):
    """`lowrank app` in a subprocess on a free loopback port; yields (url, gguf names, log path)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from lowrank.cli import main; sys.exit(main())", "app",
             "--models-dir", str(models_dir), "--port", str(port), "--ctx", str(CTX), "--threads", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the app did not start:\n{log_path.read_text()}")
            time.sleep(0.3)
    (models_dir / "vanished.gguf").unlink()
    yield url, log_path
    proc.terminate()
    proc.wait(timeout=10)


def chat(client, message: str, model: str, history=None, max_tokens: int = 16):
    return client.predict(message, history or [], model, "", 0.8, 0.95, max_tokens, api_name="/chat")


def assistant_text(history) -> str:
    content = history[-1]["content"]
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


@pytest.fixture(scope="module")
def gguf_name(models_dir) -> str:
    return str(sorted((models_dir / "export").rglob("*.gguf"))[0].relative_to(models_dir))


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client

    return Client(app[0], verbose=False)


def test_app_binds_loopback_and_lists_the_models_it_found(app, gguf_name):
    url, log_path = app
    log = log_path.read_text()
    assert f"Running on local URL:  {url.rstrip('/')}" in log and "127.0.0.1" in url
    assert "gradio.live" not in log  # no public share link unless --share
    config = json.loads(urllib.request.urlopen(url + "config", timeout=5).read())
    pickers = [c["props"] for c in config["components"] if c["props"].get("label") == "Model"]
    listed = [choice[1] for choice in pickers[0]["choices"]]
    assert listed == sorted(["alien.gguf", "broken.gguf", "copy-of-tiny.gguf", gguf_name,
                             "orphan-adapter", "vanished.gguf"])


def test_concurrent_chats_are_queued_and_all_answered(app, gguf_name):
    from gradio_client import Client

    results, errors = {}, []

    def one_tab(i: int):
        try:
            _, history, stats = chat(Client(app[0], verbose=False), f"Hello from tab {i}", gguf_name)
            results[i] = (history, stats)
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(repr(e))

    tabs = [threading.Thread(target=one_tab, args=(i,)) for i in range(4)]
    for t in tabs:
        t.start()
    for t in tabs:
        t.join(timeout=60)
    assert not errors and sorted(results) == [0, 1, 2, 3]
    for i, (history, stats) in results.items():
        assert history[0]["content"][0]["text"] == f"Hello from tab {i}"
        assert assistant_text(history) and "tokens/s" in stats


def test_compare_view_answers_with_two_models_and_their_speeds(client, gguf_name):
    _, history_a, history_b, stats_a, stats_b = client.predict(
        "Which is better?", [], [], gguf_name, "copy-of-tiny.gguf", "", 0.8, 0.95, 12, api_name="/compare")
    assert assistant_text(history_a) and assistant_text(history_b)
    assert stats_a.startswith(f"**{Path(gguf_name).name}**") and "tokens/s" in stats_a
    assert stats_b.startswith("**copy-of-tiny.gguf**") and "tokens/s" in stats_b


# --- bad input: a message in the page, and the app keeps answering ---------------------------------------

def assert_error_then_still_answers(client, gguf_name, expected: str, **kwargs):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=expected):
        chat(client, **kwargs)
    assert assistant_text(chat(client, "still there?", gguf_name)[1])


@pytest.mark.parametrize("model, expected", [
    ("broken.gguf", r"broken.gguf is not a GGUF file"),
    ("vanished.gguf", r"vanished.gguf: no such file or directory"),
    ("alien.gguf", r"cannot run .*alien.gguf: its architecture 'notamodelarch'"),
    ("orphan-adapter", r"its base model .*no-such-base' is not there"),
], ids=["non-gguf-file", "missing-file", "unknown-architecture", "adapter-without-its-base"])
def test_bad_model_shows_an_error(client, gguf_name, model, expected):
    assert_error_then_still_answers(client, gguf_name, expected, message="hi", model=model)


def test_message_longer_than_the_context_shows_an_error(client, gguf_name):
    assert_error_then_still_answers(client, gguf_name, r"the message does not fit in the context",
                                    message=" ".join(["banana"] * 400), model=gguf_name)


def test_long_history_drops_the_oldest_turns_and_says_so(client, gguf_name):
    words = " ".join(["apple"] * 25)
    history = [{"role": role, "content": [{"type": "text", "text": f"{role} {words}"}]}
               for role in ["user", "assistant"] * 4]  # the Chatbot's message format in Gradio 6
    _, new_history, stats = chat(client, "newest", gguf_name, history=history)
    assert f"longer than the {CTX}-token context" in stats and "oldest exchange(s)" in stats
    assert assistant_text(new_history) and "tokens/s" in stats


def test_auth_flag_must_be_user_colon_pass(capsys, tmp_path):
    assert main(["app", "--models-dir", str(tmp_path), "--auth", "nopassword"]) == 2
    assert capsys.readouterr().err.strip() == "lowrank app: error: --auth must be given as user:pass"


def test_browser_chat_shows_the_streamed_reply(app, gguf_name, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} missing: install it with `apt-get install -y chromium`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.set_default_timeout(60_000)  # generous: other test files may be loading the 2 cores
            page.goto(app[0])
            page.locator("#chat").wait_for()
            page.get_by_label("Model", exact=True).click()
            page.get_by_role("option", name=gguf_name, exact=True).click()
            box = page.locator("#message textarea")
            box.fill("Hello from the browser")
            box.press("Enter")
            page.locator("#chat .message.bot").first.wait_for()
            page.locator("#stats", has_text="tokens/s").wait_for()
            assert page.locator("#chat .message.user").first.inner_text().strip() == "Hello from the browser"
            assert page.locator("#chat .message.bot").first.inner_text().strip()
            assert Path(gguf_name).name in page.locator("#stats").inner_text()
            page.screenshot(path=str(tmp_path / "chat.png"))
        finally:
            browser.close()
    assert (tmp_path / "chat.png").stat().st_size > 10_000


def test_auth_keeps_out_who_has_no_login(models_dir, gguf_name):
    import urllib.error

    from gradio_client import Client

    from lowrank.apps.app import ModelPool, build_app, parse_auth

    demo = build_app(ModelPool(models_dir, n_ctx=CTX, n_threads=1))
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, auth=parse_auth("alice:s3cret"),
                prevent_thread_lock=True, quiet=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + "config", timeout=5)
        assert refused.value.code == 401
        with pytest.raises(Exception):
            Client(url, auth=("alice", "wrong"), verbose=False)
        assert assistant_text(chat(Client(url, auth=("alice", "s3cret"), verbose=False), "hi", gguf_name)[1])
    finally:
        demo.close()
