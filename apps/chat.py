"""The terminal chat behind `lowrank chat MODEL`: a read-reply loop over one ChatBackend.

Replies stream as they are generated. Ctrl-C during a reply stops that reply and
keeps the conversation (the partial reply stays in the history, as it was shown);
Ctrl-C at the prompt only reminds how to quit. /reset starts over with the same
system prompt, /exit (or Ctrl-D) quits. After each reply a line gives its length,
its speed and the model's load time.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TextIO

from lowrank.apps.backends import ChatBackend, SamplingConfig
from lowrank.errors import UserError

HELP = "/reset clears the conversation, /exit quits; Ctrl-C stops a reply"
USER_PROMPT = "you> "
MODEL_PROMPT = "model> "


def stats_line(backend: ChatBackend, reply) -> str:
    first = f", first token after {reply.first_token_seconds:.2f} s" if reply.first_token_seconds is not None else ""
    return (f"[{reply.tokens} tokens in {reply.seconds:.2f} s, {reply.tokens_per_second:.1f} tokens/s{first}; "
            f"load {backend.load_seconds:.2f} s]")


@contextlib.contextmanager
def ctrl_c_stops(reply) -> Iterator[None]:
    """Inside the block, Ctrl-C asks ``reply`` to stop instead of raising KeyboardInterrupt.

    A KeyboardInterrupt raised wherever the signal happens to land (inside llama-cpp-python's
    generation loop, say) can be swallowed there and leave the reply running; setting the reply's
    stop event from the handler is safe at any point, and the stream checks it after every token.
    Only the main thread can install a handler; elsewhere the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: reply.stop())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def chat_loop(backend: ChatBackend, sampling: SamplingConfig, *, system: str | None = None,
              read_line: Callable[[str], str] = input, out: TextIO = sys.stdout) -> int:
    """Talk with ``backend`` until /exit or end of input; returns the exit status (0)."""
    def say(text: str = "", end: str = "\n") -> None:
        out.write(text + end)
        out.flush()

    base_messages = [{"role": "system", "content": system}] if system else []
    messages = list(base_messages)
    say(f"{backend.describe()}\n{HELP}")
    while True:
        try:
            line = read_line(USER_PROMPT)
        except EOFError:
            say()
            return 0
        except KeyboardInterrupt:
            say("\n(Ctrl-C stops a reply; type /exit to quit)")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0].lower()
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                messages = list(base_messages)
                say("[conversation cleared]")
            else:
                say(f"unknown command {command}: {HELP}")
            continue

        messages.append({"role": "user", "content": line})
        try:
            reply = backend.generate(messages, sampling)
        except UserError as e:
            messages.pop()  # not answered: leave the history as it was
            say(f"error: {e}")
            continue
        if reply.dropped_turns:
            messages = list(reply.messages)  # the model no longer sees the old turns: neither do we
            say(f"[the conversation is longer than the {backend.n_ctx}-token context: left out the "
                f"{reply.dropped_turns} oldest turn(s)]")
        say(MODEL_PROMPT, end="")
        try:
            with ctrl_c_stops(reply):
                for piece in reply:
                    say(piece, end="")
        except KeyboardInterrupt:  # a Ctrl-C before the handler was in place
            reply.stop()
        say()
        if reply.stopped:
            say("[stopped]")
        messages.append({"role": "assistant", "content": reply.text})
        say(stats_line(backend, reply))
