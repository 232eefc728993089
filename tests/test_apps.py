"""`lowrank app`: the Gradio page started as a user would, driven through its API and a real browser."""

from __future__ import annotations

import json
import os
import re
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
    """The error shows ``expected``, carries no absolute path of the server, and the next chat is answered."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=expected) as error:
        chat(client, **kwargs)
    assert not re.search(r"(^|[\s'\"(])/\w", str(error.value)), str(error.value)
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


# --- exposure: a page other machines can reach has a login, or says it has none ----------------------------

@pytest.fixture
def no_env_login(monkeypatch):
    from lowrank.apps.app import AUTH_ENV

    monkeypatch.delenv(AUTH_ENV, raising=False)
    return AUTH_ENV


def app_error(capsys, argv: list[str]) -> str:
    assert main(["app", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_password_on_the_command_line_is_refused_without_echoing_it(capsys, tmp_path, no_env_login):
    line = app_error(capsys, ["--models-dir", str(tmp_path), "--auth", "alice:s3cret"])
    assert "s3cret" not in line and "visible to every user in `ps`" in line
    assert "--auth-file" in line and no_env_login in line


@pytest.mark.parametrize("flags, where", [(["--host", "0.0.0.0"], "--host 0.0.0.0"),
                                          (["--host", "my-laptop.local"], "--host my-laptop.local"),
                                          (["--share"], "a public share link")], ids=["any-address", "host-name", "share"])
def test_exposed_page_without_a_login_is_refused(capsys, tmp_path, no_env_login, flags, where):
    line = app_error(capsys, ["--models-dir", str(tmp_path), *flags])
    assert line.startswith(f"lowrank app: error: {where} lets other machines reach the app")
    assert "--auth-file" in line and "--no-auth" in line


def test_auth_without_a_login_is_refused(capsys, tmp_path, no_env_login):
    assert "--auth needs a login" in app_error(capsys, ["--models-dir", str(tmp_path), "--auth"])


def test_no_auth_with_a_login_is_refused(capsys, tmp_path, monkeypatch, no_env_login):
    monkeypatch.setenv(no_env_login, "alice:s3cret")
    line = app_error(capsys, ["--models-dir", str(tmp_path), "--host", "0.0.0.0", "--no-auth"])
    assert "--no-auth with a login" in line and "s3cret" not in line


def test_login_from_both_file_and_environment_is_refused(capsys, tmp_path, monkeypatch, no_env_login):
    (tmp_path / "logins").write_text("alice:s3cret\n")
    monkeypatch.setenv(no_env_login, "bob:hunter2")
    line = app_error(capsys, ["--models-dir", str(tmp_path), "--auth-file", str(tmp_path / "logins")])
    assert "not both" in line


def test_malformed_login_in_the_environment_names_the_variable(capsys, tmp_path, monkeypatch, no_env_login):
    monkeypatch.setenv(no_env_login, "nopassword")
    line = app_error(capsys, ["--models-dir", str(tmp_path), "--host", "0.0.0.0"])
    assert line == f"lowrank app: error: {no_env_login}: a login must be given as user:pass"


def test_malformed_line_in_the_auth_file_names_file_and_line(capsys, tmp_path, no_env_login):
    logins = tmp_path / "logins"
    logins.write_text("# who may use the page\nalice:s3cret\nbob\n")
    line = app_error(capsys, ["--models-dir", str(tmp_path), "--auth-file", str(logins)])
    assert line == f"lowrank app: error: {logins} line 3: a login must be given as user:pass"


def test_missing_auth_file_is_one_line(capsys, tmp_path, no_env_login):
    line = app_error(capsys, ["--models-dir", str(tmp_path), "--auth-file", str(tmp_path / "nope")])
    assert line == f"lowrank app: error: --auth-file {tmp_path / 'nope'}: no such file"


def test_empty_auth_file_is_refused(capsys, tmp_path, no_env_login):
    (tmp_path / "logins").write_text("# nobody yet\n\n")
    line = app_error(capsys, ["--models-dir", str(tmp_path), "--auth-file", str(tmp_path / "logins")])
    assert "no user:pass line" in line


def test_logins_come_from_the_file_or_the_environment(tmp_path, caplog):
    from lowrank.apps.app import AUTH_ENV, AppConfig, read_logins, resolve_auth

    logins = tmp_path / "logins"
    logins.write_text("alice:s3cret\n\n# a comment\nbob:pa:ss\n")
    logins.chmod(0o600)
    config = AppConfig(host="0.0.0.0", auth_file=str(logins))
    assert resolve_auth(config, environ={}) == ([("alice", "s3cret"), ("bob", "pa:ss")], None)
    assert resolve_auth(AppConfig(share=True), environ={AUTH_ENV: "carol:x"}) == ([("carol", "x")], None)
    assert not caplog.records
    logins.chmod(0o644)
    read_logins(str(logins), environ={})
    assert "can be read by other users" in caplog.text


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_loopback_needs_no_login(host):
    from lowrank.apps.app import AppConfig, resolve_auth

    assert resolve_auth(AppConfig(host=host), environ={}) == (None, None)


def test_open_page_says_it_has_no_login(models_dir):
    from lowrank.apps.app import AppConfig, ModelPool, build_app, resolve_auth

    auth, notice = resolve_auth(AppConfig(host="0.0.0.0", auth=False), environ={})
    assert auth is None and "no login" in notice
    demo = build_app(ModelPool(models_dir, n_ctx=CTX, n_threads=1), notice=notice)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        config = urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=10).read().decode()
    finally:
        demo.close()
    assert "This page has no login (started with --no-auth)" in config
    assert str(models_dir) not in config  # the page names its folder, not the server's path to it


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


def test_auth_keeps_out_who_has_no_login(models_dir, gguf_name, tmp_path):
    import urllib.error

    from gradio_client import Client

    from lowrank.apps.app import ModelPool, build_app, read_logins

    demo = build_app(ModelPool(models_dir, n_ctx=CTX, n_threads=1))
    port = free_port()
    (tmp_path / "logins").write_text("alice:s3cret\n")
    demo.launch(server_name="127.0.0.1", server_port=port, auth=read_logins(str(tmp_path / "logins"), environ={}),
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
