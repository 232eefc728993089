"""lowrank.json: the record a finished stage leaves in its output dir, and the contract between stages.

Every stage that makes a model or an adapter (pretrain, sft, reward, ppo, dpo, grpo, merge) writes
one, last and by rename, so its presence marks a finished run. Later stages, merge, export and the
apps read it back for three things: the base the adapter was trained on (checked by digest, since a
LoRA loads silently onto any base of the same shapes), the chat template training used, and the
training quantization. This module is the only code that reads or writes the file.

    {"stage": "sft",
     "base": {"id": "tiny", "path": "/.../tiny-llama", "digest": "9f2c..."},
     "chat_template": {"name": "llama2", "jinja": "..."},
     "data": {...}, "config": {...}, "seed": 0, "metrics": {...},
     ...stage-specific fields (sft_adapter, reward_adapter, adapters, into, processes, ...)}

An adapter trained elsewhere has no record; readers that accept one use :func:`read_optional`.
Older records that kept the template as a flat string (``"chat_template": "...", "template": name``)
are still read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowrank.errors import UserError

RECORD_FILE = "lowrank.json"
POLICY_STAGES = ("sft", "ppo", "dpo", "grpo")  # the stages whose adapter is a policy (a chat model to sample)
_CORE_KEYS = ("stage", "base", "chat_template", "data", "config", "seed", "metrics")


@dataclass(frozen=True)
class BaseRef:
    """The base a run trained on: ``id`` as given to --model (a hub id, a path or ``tiny``, which
    resolve on any machine), ``path`` the local dir it loaded, ``digest`` models.model_digest of it."""
    id: str | None = None
    path: str | None = None
    digest: str | None = None

    @classmethod
    def of(cls, model_id: str, model_path: str | Path) -> BaseRef:
        from lowrank.models import model_digest

        return cls(id=model_id, path=str(model_path), digest=model_digest(str(model_path)))


@dataclass(frozen=True)
class ChatTemplate:
    name: str | None
    jinja: str


@dataclass
class RunRecord:
    stage: str | None
    base: BaseRef = field(default_factory=BaseRef)
    chat_template: ChatTemplate | None = None
    data: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    seed: int | None = None
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # the stage's own fields, written beside the others

    @property
    def quant(self) -> str:
        """The quantization training loaded the base with ("none" when the record does not say)."""
        return str(self.extra.get("quant") or self.config.get("quant") or "none")

    def to_dict(self) -> dict:
        base = {k: v for k, v in vars(self.base).items() if v is not None}
        template = ({"name": self.chat_template.name, "jinja": self.chat_template.jinja}
                    if self.chat_template else None)
        out: dict[str, Any] = {"stage": self.stage, "base": base, "chat_template": template}
        if self.data:
            out["data"] = self.data
        out.update(self.extra)
        if self.config:
            out["config"] = self.config
        if self.seed is not None:
            out["seed"] = self.seed
        if self.metrics:
            out["metrics"] = self.metrics
        return out

    @classmethod
    def from_dict(cls, doc: dict, source: Path | str = RECORD_FILE) -> RunRecord:
        if not isinstance(doc, dict):
            raise UserError(f"{source}: expected a JSON object")
        for key, kind in (("data", dict), ("config", dict), ("metrics", dict)):
            if not isinstance(doc.get(key, {}), kind):
                raise UserError(f"{source}: field '{key}' must be an object")
        base = doc.get("base")
        base = BaseRef(**{k: _text(base.get(k)) for k in ("id", "path", "digest")}) if isinstance(base, dict) else BaseRef()
        return cls(stage=_text(doc.get("stage")), base=base, chat_template=_template(doc),
                   data=doc.get("data") or {}, config=doc.get("config") or {},
                   seed=doc.get("seed") if isinstance(doc.get("seed"), int) else None,
                   metrics=doc.get("metrics") or {},
                   extra={k: v for k, v in doc.items() if k not in _CORE_KEYS})


def _text(value) -> str | None:
    return value if isinstance(value, str) and value else None


def _template(doc: dict) -> ChatTemplate | None:
    value = doc.get("chat_template")
    if isinstance(value, dict):
        jinja = value.get("jinja") or value.get("template")
        return ChatTemplate(_text(value.get("name")), jinja) if isinstance(jinja, str) and jinja else None
    if isinstance(value, str) and value:  # the flat layout: a name in "template", the text in "chat_template"
        return ChatTemplate(_text(doc.get("template")), value)
    return None


# --- reading and writing -------------------------------------------------------------------------

def exists(directory: str | Path) -> bool:
    """Whether ``directory`` holds a finished run."""
    return (Path(directory) / RECORD_FILE).is_file()


def read_optional(directory: str | Path) -> RunRecord | None:
    """The record in ``directory``, or None when there is none (a model or adapter made elsewhere)."""
    path = Path(directory) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}); rerun the stage that wrote it") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    return RunRecord.from_dict(doc, path)


def read(directory: str | Path, *, stage: str | None = None) -> RunRecord:
    """The record of a finished run in ``directory`` (of ``stage`` when given), or a UserError."""
    record = read_optional(directory)
    if record is None:
        raise UserError(f"{directory}: not a finished lowrank run (no {RECORD_FILE}); "
                        f"give the output dir of a completed `lowrank {stage or 'sft'}` run")
    if stage is not None and record.stage != stage:
        raise UserError(f"{directory}: a '{record.stage}' run, expected a '{stage}' run")
    return record


def read_adapter(adapter_dir: str | Path, *, stage: str | tuple[str, ...] | None = None, what: str = "adapter",
                 base: str | None = None) -> RunRecord:
    """The record of a finished lowrank adapter (of ``stage``, or of one of the stages a tuple names),
    checked against ``base`` when given."""
    adapter_dir = Path(adapter_dir)
    stages = (stage,) if isinstance(stage, str) else stage
    if not adapter_dir.is_dir():
        raise UserError(f"{what} directory {adapter_dir} does not exist")
    if not (adapter_dir / "adapter_config.json").is_file() or not exists(adapter_dir):
        raise UserError(f"{adapter_dir}: not a finished lowrank adapter (adapter_config.json or {RECORD_FILE} "
                        f"missing); give the output dir of a completed `lowrank {stages[0] if stages else 'sft'}` run")
    record = read_optional(adapter_dir)
    if stages is not None and record.stage not in stages:
        expected = " or ".join(f"'{s}'" for s in stages)
        raise UserError(f"{adapter_dir}: a '{record.stage}' adapter, expected a {expected} adapter")
    if base is not None:
        check_base(record, adapter_dir, base=base)
    return record


def write(directory: str | Path, record: RunRecord) -> Path:
    """Write ``record`` into ``directory`` by rename, so a reader never sees half of it."""
    path = Path(directory) / RECORD_FILE
    tmp = path.with_name(f".{RECORD_FILE}.tmp")
    try:
        tmp.write_text(json.dumps(record.to_dict(), indent=2, default=str) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# --- the base check ------------------------------------------------------------------------------

def check_base(record: RunRecord | None, where: str | Path, *, base: str | None = None, digest: str | None = None,
               hint: str = "use the base it was trained on") -> None:
    """Refuse a base other than the one ``record`` was trained on, compared by digest.

    ``base`` is a model name or path (``tiny`` resolves), digested here; or pass its ``digest``
    when the caller has it already. Nothing is checked (and nothing digested) when the record names
    no digest: an adapter made elsewhere.
    """
    recorded = record.base.digest if record is not None else None
    if not recorded:
        return
    if digest is None:
        from lowrank.models import model_digest

        digest = model_digest(base)
    if digest != recorded:
        given = f"'{base}'" if base else "the given base"
        made_for = f" ({record.base.id})" if record.base.id else ""
        raise UserError(f"{where}: adapter was trained on another base{made_for}: {RECORD_FILE} says "
                        f"trained on base digest {recorded[:12]}, {given} has digest {digest[:12]}; {hint}")
