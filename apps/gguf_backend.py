"""A GGUF file run by llama.cpp (through llama-cpp-python) on the CPU.

The conversation is formatted here with the GGUF's own ``tokenizer.chat_template``
(the template training used, written by ``lowrank export``) and the vocabulary's
BOS/EOS texts, then tokenized with ``add_bos=False, special=True``: the same steps
llama-cpp-python's ``create_chat_completion`` takes for a GGUF template. Doing them
ourselves lets us count prompt tokens and drop old turns before the context overflows.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator

from lowrank.apps.backends import ChatBackend, SamplingConfig, turn_stop_strings
from lowrank.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_CTX = 2048  # when --ctx is not given: this, or the model's training context if smaller


def _read_header(path: str) -> dict:
    """general.architecture and the training context length of a GGUF, read with the gguf package."""
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def value(key):
        field = reader.fields.get(key)
        return field.contents() if field is not None else None

    arch = value("general.architecture")
    return {"arch": arch, "context_length": value(f"{arch}.context_length") if arch else None}


def _architecture_problem(path: str) -> str:
    """Why llama.cpp refused a file that starts like a GGUF, in the user's terms."""
    try:
        arch = _read_header(path)["arch"]
    except Exception as e:  # a truncated or damaged file: the reader itself cannot parse it
        return f"{path} is damaged or incomplete ({type(e).__name__}: {e}); export it again"
    if arch is None:
        return f"{path} has no general.architecture key: it is not a model llama.cpp can run"
    import llama_cpp

    return (f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) cannot run {path}: its architecture "
            f"'{arch}' (general.architecture) is unknown to it or the file is incomplete; "
            "export a llama, mistral, qwen2 or qwen3 model")


class GGUFBackend(ChatBackend):
    kind = "gguf"

    def __init__(self, path: str, *, n_ctx: int | None = None, n_threads: int | None = None):
        super().__init__()
        from llama_cpp import Llama

        from lowrank.export.llama import plain_cpu_weights

        self.path = path
        start = time.perf_counter()
        if n_ctx is None:
            # Past its training context a model's output degrades; the user can still ask with --ctx.
            try:
                trained = _read_header(path)["context_length"]
            except Exception:  # llama.cpp below says what is wrong with the file
                trained = None
            n_ctx = min(DEFAULT_CTX, int(trained)) if trained else DEFAULT_CTX
        try:
            with plain_cpu_weights():  # AMX VMs fault on llama.cpp's AMX weight buffers
                self.llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=n_threads or os.cpu_count(),
                                 n_batch=512, verbose=False)
        except ValueError as e:
            raise UserError(_architecture_problem(path)) from e
        self.n_ctx = self.llm.n_ctx()
        self.load_seconds = time.perf_counter() - start

        model = self.llm._model
        self.bos_token = model.token_get_text(model.token_bos()) if model.token_bos() != -1 else ""
        self.eos_token = model.token_get_text(model.token_eos()) if model.token_eos() != -1 else ""
        template = self.llm.metadata.get("tokenizer.chat_template")
        if template:
            self.template, self.template_source = template, "tokenizer.chat_template of the GGUF"
        else:
            from lowrank.templates import BUILTIN_TEMPLATES, DEFAULT_TEMPLATE

            log.warning("%s has no tokenizer.chat_template; formatting with the built-in %s template",
                        path, DEFAULT_TEMPLATE)
            self.template = BUILTIN_TEMPLATES[DEFAULT_TEMPLATE]
            self.template_source = f"built-in {DEFAULT_TEMPLATE} (the GGUF has none)"
        self.stop_strings = turn_stop_strings(self.template, self.bos_token, self.eos_token)

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def _stream(self, prompt: str, sampling: SamplingConfig, max_new_tokens: int,
                stop_event: threading.Event) -> Iterator[str]:
        from llama_cpp import StoppingCriteriaList

        tokens = self.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        max_new_tokens = min(max_new_tokens, self.n_ctx - len(tokens))
        chunks = self.llm.create_completion(
            tokens, max_tokens=max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
            stop=self.stop_strings, stream=True, seed=sampling.seed,
            # llama.cpp ends at an end-of-generation token by itself; this ends at our stop button.
            stopping_criteria=StoppingCriteriaList([lambda ids, logits: stop_event.is_set()]),
        )
        try:
            for chunk in chunks:
                text = chunk["choices"][0]["text"]
                if text:
                    yield text
                if stop_event.is_set():
                    break
        finally:
            chunks.close()

    def close(self) -> None:
        with self._model_lock:
            self.llm.close()
