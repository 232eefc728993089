"""The Gradio page behind `lowrank app --models-dir DIR`: chat with one model, or compare two.

Every model under DIR (GGUF files, adapter dirs, merged model dirs) is offered in
a picker and loaded on first use; the last two used stay loaded, so a compare of
two models does not reload on every message. All replies share one queue slot
(``concurrency_id="generate"``): on a CPU two generations at once are each half as
fast and llama.cpp contexts are not thread-safe, so tabs wait their turn instead.
Bad input (a file that is not a model, an adapter without its base, a message
longer than the context) shows as a message in the page; the app keeps running.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from lowrank.apps.backends import ChatBackend, SamplingConfig
from lowrank.apps.loading import find_models, load_backend
from lowrank.errors import UserError

log = logging.getLogger(__name__)

AUTH_ENV = "LOWRANK_APP_AUTH"


@dataclass
class AppConfig:
    """How `lowrank app` serves the page."""

    models_dir: str = field(default=".", metadata={"help": "folder searched for GGUF files and adapter dirs"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind; 0.0.0.0 exposes it to your network"})
    port: int = field(default=7860, metadata={"help": "port to bind"})
    auth: bool | None = field(default=None, metadata={
        "cli": False, "help": "require a login (true) or serve without one (false); unset: a login when one is given"})
    auth_file: str | None = field(default=None, metadata={
        "help": f"file of user:pass lines, one login each (keep it chmod 600); or set {AUTH_ENV}=user:pass"})
    share: bool = field(default=False, metadata={"help": "ask Gradio for a public share link (off unless given)"})
    keep_loaded: int = field(default=2, metadata={"help": "models kept in memory at once (a compare needs 2)"})
    queue_size: int = field(default=32, metadata={"help": "requests waiting in the queue before new ones are refused"})

    def __post_init__(self):
        if not 1 <= self.port <= 65535:
            raise UserError(f"--port must lie in 1-65535, got {self.port}")
        for name in ("keep_loaded", "queue_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


class ModelPool:
    """Models under one folder, loaded on first use; the least recently used is closed past ``keep``."""

    def __init__(self, models_dir: Path, keep: int = 2, **load_kwargs):
        self.models_dir = Path(models_dir).resolve()
        self.keep = max(1, keep)
        self.load_kwargs = load_kwargs
        self._loaded: OrderedDict[str, ChatBackend] = OrderedDict()
        self._lock = threading.Lock()

    def choices(self) -> list[str]:
        return [str(p.relative_to(self.models_dir)) for p in find_models(self.models_dir)]

    def get(self, name: str | None) -> ChatBackend:
        if not name:
            raise UserError(f"pick a model first (none found under {self.models_dir}?)")
        path = (self.models_dir / name).resolve()
        if not path.is_relative_to(self.models_dir):
            raise UserError(f"{name}: not inside the models folder {self.models_dir}")
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            backend = load_backend(path, **self.load_kwargs)
            self._loaded[name] = backend
            while len(self._loaded) > self.keep:
                _, old = self._loaded.popitem(last=False)
                old.close()
            return backend


def _text(content) -> str:
    """A Chatbot message's content as plain text (Gradio 6 sends a list of typed parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return "" if content is None else str(content)


def to_messages(history: list[dict], system: str | None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    for m in history or []:
        if m.get("role") in ("user", "assistant"):
            messages.append({"role": m["role"], "content": _text(m.get("content"))})
    return messages


def stream_turn(pool: ModelPool, model: str, message: str, history: list[dict], system: str,
                sampling: SamplingConfig):
    """Yield (history, stats markdown) while ``model`` answers ``message``; errors become gr.Error."""
    import gradio as gr

    history = [{"role": m["role"], "content": _text(m.get("content"))} for m in history or []]
    if not message or not message.strip():
        raise gr.Error("type a message first")
    try:
        backend = pool.get(model)
        reply = backend.generate(to_messages(history, system) + [{"role": "user", "content": message}], sampling)
    except UserError as e:
        raise gr.Error(client_text(str(e), pool.models_dir), print_exception=False) from None
    except Exception as e:  # noqa: BLE001 - the page keeps serving; the details stay in the server's log
        log.exception("generating with %s failed", model)
        raise gr.Error(f"{client_text(str(model), pool.models_dir)} failed ({type(e).__name__}); "
                       "the server's log has the details", print_exception=False) from None
    notice = ""
    if reply.dropped_turns:
        notice = (f"The conversation is longer than the {backend.n_ctx}-token context: the model no longer "
                  f"sees the {reply.dropped_turns} oldest exchange(s). ")
        gr.Warning(notice)
    history += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
    for piece in reply:
        history[-1]["content"] += piece
        yield history, notice + "_generating..._"
    yield history, notice + (f"**{backend.name}**: {reply.tokens} tokens in {reply.seconds:.2f} s, "
                             f"**{reply.tokens_per_second:.1f} tokens/s** (loaded in {backend.load_seconds:.2f} s)")


def build_app(pool: ModelPool, *, queue_size: int = 32, notice: str | None = None):
    """The gr.Blocks page (not launched); ``notice`` is shown above everything (an open page says so)."""
    import gradio as gr

    choices = pool.choices()
    first = choices[0] if choices else None
    second = choices[1] if len(choices) > 1 else first
    generate = dict(concurrency_id="generate", concurrency_limit=1)

    with gr.Blocks(title="lowrank chat") as demo:
        if notice:
            gr.Markdown(f"**Warning: {notice}**", elem_id="open-notice")
        gr.Markdown(f"## lowrank chat\nModels in the folder `{pool.models_dir.name}`: GGUF files run by "
                    "llama.cpp, adapters by transformers.")
        with gr.Accordion("System prompt and sampling", open=False):
            system = gr.Textbox(label="System prompt", lines=2)
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature")
                top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p")
                max_tokens = gr.Slider(1, 2048, value=256, step=1, label="Max tokens")
        settings = [system, temperature, top_p, max_tokens]

        with gr.Tab("Chat"):
            with gr.Row():
                model = gr.Dropdown(choices, value=first, label="Model", scale=4)
                rescan = gr.Button("Rescan folder", scale=1)
            chatbot = gr.Chatbot(label="Conversation", height=420, elem_id="chat")
            message = gr.Textbox(label="Message", placeholder="Type a message and press Enter", elem_id="message")
            with gr.Row():
                send = gr.Button("Send", variant="primary")
                stop = gr.Button("Stop", variant="stop")
                clear = gr.Button("Clear")
            stats = gr.Markdown(elem_id="stats")

        with gr.Tab("Compare"):
            gr.Markdown("Two models answer the same message, one after the other, so each speed is measured alone.")
            with gr.Row():
                model_a = gr.Dropdown(choices, value=first, label="Model A")
                model_b = gr.Dropdown(choices, value=second, label="Model B")
            with gr.Row():
                chat_a = gr.Chatbot(label="A", height=360)
                chat_b = gr.Chatbot(label="B", height=360)
            with gr.Row():
                stats_a = gr.Markdown()
                stats_b = gr.Markdown()
            compare_message = gr.Textbox(label="Message to both", placeholder="Type a message and press Enter")
            with gr.Row():
                compare_send = gr.Button("Send to both", variant="primary")
                compare_stop = gr.Button("Stop", variant="stop")
                compare_clear = gr.Button("Clear")

        def chat(text, history, model_name, system_prompt, temp, p, n):
            sampling = SamplingConfig(temperature=temp, top_p=p, max_tokens=int(n))
            for new_history, info in stream_turn(pool, model_name, text, history, system_prompt, sampling):
                yield "", new_history, info

        def compare(text, history_a, history_b, name_a, name_b, system_prompt, temp, p, n):
            sampling = SamplingConfig(temperature=temp, top_p=p, max_tokens=int(n))
            info_a = info_b = ""
            for history_a, info_a in stream_turn(pool, name_a, text, history_a, system_prompt, sampling):
                yield "", history_a, history_b, info_a, info_b
            for history_b, info_b in stream_turn(pool, name_b, text, history_b, system_prompt, sampling):
                yield "", history_a, history_b, info_a, info_b

        chat_inputs = [message, chatbot, model, *settings]
        chat_outputs = [message, chatbot, stats]
        chat_events = [message.submit(chat, chat_inputs, chat_outputs, api_name="chat", **generate),
                       send.click(chat, chat_inputs, chat_outputs, api_visibility="private", **generate)]
        stop.click(None, None, None, cancels=chat_events)
        clear.click(lambda: ([], ""), None, [chatbot, stats], queue=False)

        compare_inputs = [compare_message, chat_a, chat_b, model_a, model_b, *settings]
        compare_outputs = [compare_message, chat_a, chat_b, stats_a, stats_b]
        compare_events = [
            compare_message.submit(compare, compare_inputs, compare_outputs, api_name="compare", **generate),
            compare_send.click(compare, compare_inputs, compare_outputs, api_visibility="private", **generate)]
        compare_stop.click(None, None, None, cancels=compare_events)
        compare_clear.click(lambda: ([], [], "", ""), None, [chat_a, chat_b, stats_a, stats_b], queue=False)

        def rescan_folder():
            names = pool.choices()
            return (gr.update(choices=names), gr.update(choices=names), gr.update(choices=names))

        rescan.click(rescan_folder, None, [model, model_a, model_b], queue=False)

    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    return demo


def _login(text: str, where: str) -> tuple[str, str]:
    user, sep, password = text.strip().partition(":")
    if not sep or not user or not password:
        raise UserError(f"{where}: a login must be given as user:pass")
    return user, password


def read_logins(auth_file: str | None, environ=os.environ) -> list[tuple[str, str]]:
    """Logins from ``auth_file`` (user:pass lines, # comments) or the LOWRANK_APP_AUTH variable; [] when neither.

    Never from argv: a password there is visible to every user of the machine in `ps`.
    """
    from_env = environ.get(AUTH_ENV)
    if auth_file and from_env:
        raise UserError(f"give a login with --auth-file or {AUTH_ENV}, not both")
    if from_env is not None:
        return [_login(from_env, AUTH_ENV)]
    if not auth_file:
        return []
    path = Path(auth_file)
    try:
        text = path.read_text()
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UserError(f"--auth-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--auth-file {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    logins = [_login(line, f"{path} line {n}") for n, line in enumerate(text.splitlines(), 1)
              if line.strip() and not line.lstrip().startswith("#")]
    if not logins:
        raise UserError(f"--auth-file {path}: no user:pass line in it")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s can be read by other users; `chmod 600 %s` keeps the passwords to you", path, path)
    return logins


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def resolve_auth(config: AppConfig, environ=os.environ) -> tuple[list[tuple[str, str]] | None, str | None]:
    """(logins for Gradio or None, a notice for the page or None) for how ``config`` serves the app.

    A page reachable from other machines (a host that is not loopback, or a share link) needs a login,
    or --no-auth given on purpose; the page then says that it is open.
    """
    logins = read_logins(config.auth_file, environ)
    exposed = config.share or not is_loopback(config.host)
    where = "a public share link" if config.share else f"--host {config.host}"
    if config.auth is False:
        if logins:
            raise UserError(f"--no-auth with a login from --auth-file or {AUTH_ENV}: drop one of them")
        if not exposed:
            return None, None
        log.warning("serving %s without a login (--no-auth): anyone who can reach it can use it", where)
        return None, (f"This page has no login (started with --no-auth): anyone who can reach "
                      f"{'its share link' if config.share else 'this address'} can use these models.")
    if logins:
        return logins, None
    if config.auth:
        raise UserError(f"--auth needs a login: put user:pass in a file given with --auth-file, "
                        f"or in the {AUTH_ENV} environment variable")
    if exposed:
        raise UserError(f"{where} lets other machines reach the app: give it a login (--auth-file FILE or "
                        f"{AUTH_ENV}=user:pass), or pass --no-auth to serve it open on purpose")
    return None, None


_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/-])(?:/[^\s/'\"`:,;()]+)+")


def client_text(message: str, models_dir: Path) -> str:
    """``message`` fit for a browser: paths under the models folder made relative, other absolute paths cut to
    their last part, so a client learns nothing about the server's file system."""
    root = str(models_dir)
    message = message.replace(root + os.sep, "").replace(root, models_dir.name or ".")
    return _ABSOLUTE_PATH.sub(lambda m: Path(m.group(0)).name, message)
