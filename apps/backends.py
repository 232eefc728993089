"""One chat interface over two kinds of model: a GGUF file (llama.cpp) and a live adapter (transformers + peft).

The terminal chat and the Gradio page only talk to :class:`ChatBackend`. What the
two kinds share lives here: formatting a conversation with the model's own chat
template, the stop strings that end a turn, fitting a long conversation into the
context, timing a reply. The kind-specific parts are in ``gguf_backend.py`` and
``hf_backend.py``; ``loading.load_backend`` picks one from what is on disk.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lowrank.errors import UserError

log = logging.getLogger(__name__)

@dataclass
class SamplingConfig:
    """How a reply is sampled; the same fields for both backends."""

    temperature: float = field(default=0.7, metadata={"help": "sampling temperature; 0 = greedy"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling: keep the smallest set of tokens with this much probability"})
    max_tokens: int = field(default=256, metadata={"help": "most tokens in one reply"})
    seed: int | None = field(default=None, metadata={"help": "sampling seed (random when not given)"})

    def __post_init__(self):
        if not self.temperature >= 0:
            raise UserError(f"--temperature must be at least 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must lie in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise UserError(f"--max-tokens must be at least 1, got {self.max_tokens}")


def render_chat(template: str, messages: list[dict], *, bos_token: str, eos_token: str,
                add_generation_prompt: bool = True) -> str:
    """Format ``messages`` with a Hugging Face style Jinja chat template.

    The environment matches the one transformers' ``apply_chat_template`` and
    llama-cpp-python's ``Jinja2ChatFormatter`` use (sandboxed, trim_blocks,
    lstrip_blocks, loop controls, ``raise_exception``), so a GGUF's
    ``tokenizer.chat_template`` renders here exactly as in those two.
    """
    def raise_exception(message):
        raise UserError(f"the chat template refused this conversation: {message}")

    try:
        return _compile(template).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                         add_generation_prompt=add_generation_prompt, raise_exception=raise_exception)
    except jinja2.TemplateError as e:  # UndefinedError, TemplateSyntaxError, a sandbox refusal, ...
        first_line = (str(e) or type(e).__name__).splitlines()[0]
        raise UserError(f"the chat template does not render ({type(e).__name__}: {first_line}); fix it or give "
                        "another (a built-in name such as llama2 or chatml)") from None


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """The compiled template, once per template: fitting a long conversation renders it once per dropped turn."""
    env = ImmutableSandboxedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise UserError(f"the model's chat template is not valid Jinja: {e}") from e


def turn_stop_strings(template: str, bos_token: str, eos_token: str) -> list[str]:
    """Texts that mean "the assistant's turn is over", read off the template itself.

    Rendering a sentinel exchange shows what the template writes after an
    assistant message (``<|eot_id|>``, ``<|im_end|>``, ``</s>``...) and how the
    next user turn opens (`` USER:``, ``### Instruction:``); an undertrained model
    that forgets the first often still produces the second.
    """
    user, answer, user2 = "LOWRANKUSERSENTINEL", "LOWRANKANSWERSENTINEL", "LOWRANKNEXTSENTINEL"
    one = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    two = one + [{"role": "user", "content": user2}]
    stops = []
    try:
        text = render_chat(template, two, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=False)
        after = text.split(answer, 1)[1].split(user2, 1)[0]
        end_of_turn = render_chat(template, one, bos_token=bos_token, eos_token=eos_token,
                                  add_generation_prompt=False).split(answer, 1)[1]
        stops += [end_of_turn.strip(), after[len(end_of_turn):].strip()]
    except (UserError, IndexError, jinja2.TemplateError) as e:  # an odd template: fall back to EOS only
        log.debug("could not read end-of-turn from the template: %s", e)
    stops.append(eos_token)
    return [s for i, s in enumerate(stops) if s and s not in stops[:i]]


@dataclass
class Reply:
    """A reply being streamed: iterate it for text pieces; counts and timing are filled as it goes."""

    pieces: Iterator[str]
    count_tokens: callable
    stop_event: threading.Event
    messages: list[dict] = field(default_factory=list)  # the conversation as the model saw it
    dropped_turns: int = 0  # (user, assistant) exchanges left out so the conversation fits the context
    prompt_tokens: int = 0
    text: str = ""
    seconds: float = 0.0
    first_token_seconds: float | None = None
    stopped: bool = False  # True when stop() cut it short

    def __iter__(self) -> Iterator[str]:
        start = time.perf_counter()
        try:
            for piece in self.pieces:
                if self.first_token_seconds is None:
                    self.first_token_seconds = time.perf_counter() - start
                self.text += piece
                yield piece
                if self.stop_event.is_set():
                    self.stopped = True
                    break
        finally:
            self.seconds = time.perf_counter() - start
            close = getattr(self.pieces, "close", None)
            if close:
                close()

    def stop(self) -> None:
        """Ask the model to stop; safe from another thread or a signal handler."""
        self.stopped = True
        self.stop_event.set()

    @property
    def tokens(self) -> int:
        """Tokens in the reply text (the end-of-turn token, not shown, is not counted)."""
        return self.count_tokens(self.text) if self.text else 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class ChatBackend:
    """A loaded model that turns a conversation into a streamed reply.

    Subclasses set the attributes below and implement ``count_tokens`` and
    ``_stream(prompt, sampling, max_new_tokens, stop_event)``.
    """

    kind: str = ""  # "gguf" | "adapter" | "model"
    path: str = ""
    n_ctx: int = 0  # tokens the prompt and the reply must fit in
    load_seconds: float = 0.0
    template: str = ""
    template_source: str = ""  # where the template came from, for the user
    bos_token: str = ""
    eos_token: str = ""
    stop_strings: list[str] = []

    def __init__(self):
        # One reply at a time per model: a new one stops a reply whose reader went away
        # (a Gradio tab closed mid-stream), so an abandoned stream never holds the model.
        self._lock = threading.Lock()
        self._active: threading.Event | None = None
        # Held while one token is made, never across a yield: a stream whose reader
        # vanished (Gradio's stop cancels the task, not the worker thread) may still
        # be inside llama.cpp when the next reply starts, and a llama.cpp context
        # must not be used by two threads at once.
        self._model_lock = threading.RLock()

    @property
    def name(self) -> str:
        return Path(self.path).name

    def describe(self) -> str:
        return (f"{self.name} ({self.kind}, context {self.n_ctx} tokens, template: {self.template_source}, "
                f"loaded in {self.load_seconds:.2f} s)")

    def count_tokens(self, text: str) -> int:
        raise NotImplementedError

    def _stream(self, prompt: str, sampling: SamplingConfig, max_new_tokens: int,
                stop_event: threading.Event) -> Iterator[str]:
        raise NotImplementedError

    def render(self, messages: list[dict]) -> str:
        return render_chat(self.template, messages, bos_token=self.bos_token, eos_token=self.eos_token)

    def fit_history(self, messages: list[dict], max_new_tokens: int) -> tuple[list[dict], int, int]:
        """Drop the oldest (user, assistant) turns until the prompt leaves room for the reply.

        The system prompt and the newest user message are always kept. Returns
        (messages, turns dropped, prompt tokens). A newest message that alone does
        not fit is the user's to shorten: UserError.
        """
        system = [m for m in messages[:1] if m["role"] == "system"]
        turns = messages[len(system):]
        dropped = 0
        while True:
            kept = system + turns
            prompt_tokens = self.count_tokens(self.render(kept))
            if prompt_tokens + max_new_tokens <= self.n_ctx:
                return kept, dropped, prompt_tokens
            if len(turns) <= 1:
                raise UserError(
                    f"the message does not fit in the context: the prompt is {prompt_tokens} tokens and "
                    f"{max_new_tokens} more are kept for the reply, but the context holds {self.n_ctx}; "
                    "shorten the message, lower max tokens or load the model with a larger context (--ctx)")
            # Drop up to and including the next assistant turn: one whole exchange.
            cut = next((i + 1 for i, m in enumerate(turns[:-1]) if m["role"] == "assistant"), len(turns) - 1)
            turns = turns[cut:]
            dropped += 1

    def generate(self, messages: list[dict], sampling: SamplingConfig | None = None) -> Reply:
        """Start a reply to ``messages`` (the last one is the user's); iterate the Reply to stream it."""
        sampling = sampling or SamplingConfig()
        if not messages or messages[-1]["role"] != "user":
            raise UserError("the conversation must end with a user message")
        # Keep at least half of the context for the prompt, whatever max_tokens says.
        max_new = max(1, min(sampling.max_tokens, self.n_ctx // 2))
        kept, dropped, prompt_tokens = self.fit_history(messages, max_new)
        if dropped:
            log.info("left out the %d oldest turn(s) so the conversation fits in %d tokens", dropped, self.n_ctx)
        stop_event = threading.Event()
        with self._lock:
            if self._active is not None:
                self._active.set()
            self._active = stop_event
        pieces = _one_step_at_a_time(self._stream(self.render(kept), sampling, max_new, stop_event),
                                     self._model_lock)
        return Reply(pieces=pieces, count_tokens=self.count_tokens, stop_event=stop_event,
                     messages=kept, dropped_turns=dropped, prompt_tokens=prompt_tokens)

    def close(self) -> None:
        """Free the model's memory."""


def _one_step_at_a_time(pieces: Iterator[str], lock: threading.RLock) -> Iterator[str]:
    """Advance (and close) ``pieces`` only while holding ``lock``."""
    try:
        while True:
            with lock:
                try:
                    piece = next(pieces)
                except StopIteration:
                    return
            yield piece
    finally:
        with lock:
            pieces.close()
