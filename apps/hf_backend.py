"""A live adapter (base + PEFT dir) or a plain/merged model dir, run by transformers.

Used to talk to an adapter straight after training, before merging and exporting
it: on the GPU when there is one, else on the CPU in fp32. The adapter's
lowrank.json names its base model and holds the chat template used in training
(see the adapter format in SPEC.md); ``--base`` overrides the base it names.
Generation runs in a thread and streams through transformers' TextIteratorStreamer.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from lowrank import runrecord
from lowrank.apps.backends import ChatBackend, SamplingConfig, turn_stop_strings
from lowrank.errors import UserError
from lowrank.files import check_weights_dir
from lowrank.runrecord import RunRecord

log = logging.getLogger(__name__)


def base_of(adapter_dir: Path, record: RunRecord | None) -> str | None:
    """The base model an adapter was trained on.

    lowrank's stages record ``"base": {"id", "path", "digest"}`` in lowrank.json: ``path`` is the
    model dir training loaded (for ``tiny`` a built cache dir), ``id`` what was given to --model
    (a hub id or ``tiny``, which resolve on any machine). The path wins while it is still there.
    Without that record (an adapter made elsewhere), peft's adapter_config.json says.
    """
    path, model_id = (record.base.path, record.base.id) if record else (None, None)
    if path and (Path(path).expanduser() / "config.json").is_file():
        return path
    if model_id or path:
        return model_id or path
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return config.get("base_model_name_or_path") or None


def _check_base(base: str, adapter_dir: Path) -> str:
    from lowrank.tiny import resolve_model_name

    resolved = resolve_model_name(base)
    looks_like_path = resolved.startswith((".", "/", "~")) or resolved.count("/") != 1
    if looks_like_path and not (Path(resolved).expanduser() / "config.json").is_file():
        raise UserError(f"adapter {adapter_dir}: its base model '{base}' is not there (no config.json); "
                        "pass the base with --base DIR")
    return str(Path(resolved).expanduser()) if looks_like_path else resolved


class HFBackend(ChatBackend):
    def __init__(self, path: str, *, base: str | None = None, n_ctx: int | None = None,
                 device: str | None = None, n_threads: int | None = None):
        super().__init__()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lowrank.spm_split import match_sentencepiece

        self.path = path
        directory = Path(path)
        start = time.perf_counter()
        record = None
        if (directory / "adapter_config.json").is_file():
            self.kind = "adapter"
            record = runrecord.read_optional(directory)
            if record and record.stage == "reward":
                raise UserError(f"{path} is a reward adapter (stage 'reward' in lowrank.json): it scores "
                                "replies but does not write them; chat with an SFT or PPO adapter")
            base = base or base_of(directory, record)
            if not base:
                raise UserError(f"adapter {path} does not name its base model (no base in lowrank.json or "
                                "adapter_config.json); pass it with --base DIR")
            base_path = _check_base(base, directory)
            if (Path(base_path) / "config.json").is_file():  # a hub id: digesting it would need the network
                runrecord.check_base(record, f"adapter {directory}", base=base_path,
                                     hint="pass the base it was trained on with --base DIR")
        else:
            self.kind, base_path = "model", path
        if n_threads:
            torch.set_num_threads(n_threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda"):
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32  # CPU half precision is slow and lossy for small models
        tokenizer_dir = path if (directory / "tokenizer_config.json").is_file() else base_path
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
            match_sentencepiece(self.tokenizer)  # split text as training (lowrank.models.load_tokenizer) did
            check_weights_dir(base_path)
            model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
        except OSError as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot load base model '{base_path}' of {path}: {first_line}; "
                            "pass a local base with --base DIR") from e
        if self.kind == "adapter":
            from peft import PeftModel

            check_weights_dir(path)
            model = PeftModel.from_pretrained(model, path)
        self.model = model.to(self.device).eval()
        self.load_seconds = time.perf_counter() - start

        trained_ctx = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.n_ctx = min(n_ctx, trained_ctx) if n_ctx else trained_ctx
        self.bos_token = self.tokenizer.bos_token or ""
        self.eos_token = self.tokenizer.eos_token or ""
        recorded = record.chat_template if record else None
        if recorded:
            self.template = recorded.jinja
            self.template_source = f"{recorded.name or 'recorded'} from {runrecord.RECORD_FILE}"
        else:  # what training's --template auto picks: the tokenizer's own, else the default built-in
            from lowrank.templates import resolve_template

            name, self.template = resolve_template(self.tokenizer, None)
            self.template_source = ("the tokenizer's chat_template" if name == "tokenizer"
                                    else f"built-in {name} (no template recorded)")
        self.stop_strings = turn_stop_strings(self.template, self.bos_token, self.eos_token)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _stream(self, prompt: str, sampling: SamplingConfig, max_new_tokens: int,
                stop_event: threading.Event) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        class StopWhenAsked(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return stop_event.is_set()

        # The template already wrote BOS: no second one from the tokenizer.
        inputs = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(self.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=False)
        eos_ids = {self.tokenizer.eos_token_id}
        for stop in self.stop_strings:  # single-token end-of-turn markers stop in generate itself
            ids = self.tokenizer(stop, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                eos_ids.add(ids[0])
        greedy = sampling.temperature <= 0
        kwargs = dict(**inputs, max_new_tokens=max_new_tokens, streamer=streamer, do_sample=not greedy,
                      eos_token_id=sorted(i for i in eos_ids if i is not None),
                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                      stopping_criteria=StoppingCriteriaList([StopWhenAsked()]))
        if not greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)

        failure: list[BaseException] = []

        def run():
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as e:  # noqa: BLE001 - re-raised in the reading thread below
                failure.append(e)
                streamer.end()  # unblock the reader, which would otherwise wait forever

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            yield from cut_at_stop_strings(streamer, self.stop_strings)
        finally:
            stop_event.set()  # the reader stopped early: end generate() at its next token
            thread.join()
        if failure:
            raise failure[0]

    def close(self) -> None:
        import torch

        with self._model_lock:
            self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def cut_at_stop_strings(pieces: Iterator[str], stops: list[str]) -> Iterator[str]:
    """Pass text through until a stop string appears, holding back a tail that may be one's beginning."""
    pending = ""
    hold = max((len(s) for s in stops), default=1) - 1
    for piece in pieces:
        pending += piece
        hits = [pending.find(s) for s in stops if s in pending]
        if hits:
            if min(hits):
                yield pending[:min(hits)]
            return
        # Safe to show all but the last `hold` characters (they might start a stop string).
        safe = len(pending) - hold
        if safe > 0:
            yield pending[:safe]
            pending = pending[safe:]
    if pending:
        yield pending
