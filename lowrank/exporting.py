"""The export stage: a merged HF dir (or base + adapters) -> GGUF files, fit estimates, Modelfiles, verification.

This is the orchestration above export/ and quantize/: it returns an `ExportResult` and prints nothing;
`lowrank export` (lowrank/cli/export.py) and the pipeline's export stage print it. Three ways to use adapters:
- merged (default): merge them into the base in a temporary dir, export that, verify it;
- ``config.lora``: as merged, plus the base as GGUF and each adapter as a llama.cpp LoRA GGUF, and
  verify that the base GGUF with the adapter gives the merged GGUF's logits;
- ``config.lora_only``: only the LoRA GGUF of each adapter (for a base GGUF exported before).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from lowrank import runrecord
from lowrank.errors import UserError

if TYPE_CHECKING:
    from lowrank.export.fit import FitEstimate
    from lowrank.export.gguf import ExportConfig
    from lowrank.export.verify_report import VerifyReport


@dataclass
class LoraExport:
    """``--lora``: the base the adapters were merged into, and the adapters, written beside the merged files."""

    base_dir: Path
    base_stem: str  # file name stem of the base GGUFs
    adapters: list[str]


@dataclass
class ExportResult:
    """What an export wrote and measured, in the order the CLI prints it."""

    paths: list[Path] = field(default_factory=list)  # the model's GGUF files, one per type
    base_paths: list[Path] = field(default_factory=list)  # --lora: the base's GGUF files
    lora_paths: list[Path] = field(default_factory=list)  # --lora / --lora-only: one LoRA GGUF per adapter
    modelfiles: list[Path] = field(default_factory=list)  # Ollama Modelfiles written beside the GGUFs
    fits: list[FitEstimate] = field(default_factory=list)  # RAM estimate of each file in ``paths``
    budget: int | None = None  # the --fit budget in bytes, if one was given
    reports: list[VerifyReport] = field(default_factory=list)  # model files first, then base files
    lora_check_skipped: bool = False  # several adapters: llama-cpp-python applies only one per model

    @property
    def written(self) -> list[Path]:
        return self.paths + self.base_paths + self.lora_paths

    @property
    def passed(self) -> bool:
        """True when every file checked passed (and trivially when none was checked)."""
        return all(report.passed for report in self.reports)


def resolve_chat_template(value: str | None, model_dir: Path) -> str | None:
    """A built-in template name or Jinja text; else the template the run record of ``model_dir`` names."""
    from lowrank.templates import BUILTIN_TEMPLATES

    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    if value:
        return value
    record = runrecord.read_optional(model_dir)
    return record.chat_template.jinja if record and record.chat_template else None


def write_lora_files(adapter_dirs: Sequence[str], base_dir: Path, out: Path, name: str | None) -> list[Path]:
    """Each adapter as ``<stem>-lora.gguf`` in ``out``; stem = ``name`` for a single adapter, else its dir name."""
    from lowrank.export.lora import export_lora_gguf

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for adapter in adapter_dirs:
        stem = name if name and len(adapter_dirs) == 1 else Path(adapter).resolve().name
        paths.append(export_lora_gguf(adapter, base_dir, out / f"{stem}-lora.gguf"))
    return paths


def merged_dtype(config: ExportConfig) -> str:
    """float32 for the temporary merge when an F32/BF16 file or the LoRA check needs it exact, else float16."""
    types = {t.lower() for t in config.type}
    return "float32" if config.lora or types & {"f32", "bf16"} else "float16"


def export_model(config: ExportConfig, model_dir: Path, adapters: Sequence[str] = (), *, base_name: str | None = None,
                 on_tensor: Callable[[dict], None] | None = None,
                 on_written: Callable[[ExportResult], None] | None = None,
                 on_report: Callable[[VerifyReport], None] | None = None) -> ExportResult:
    """Export ``model_dir`` (merged with ``adapters``, in order, when given) as ``config`` asks.

    ``base_name``: the stem of the base GGUFs with ``config.lora`` (default: the model dir's name).
    ``on_tensor`` gets export_gguf's per-tensor events, ``on_written`` the result once the GGUF files and fit
    estimates are done (before the Modelfiles and the slow verification), ``on_report`` each VerifyReport.
    """
    from lowrank.export.gguf import parse_types

    if config.lora and config.lora_only:
        raise UserError("--lora writes the merged files too, --lora-only only the adapters: pick one")
    if (config.lora or config.lora_only) and not adapters:
        raise UserError(f"--{'lora-only' if config.lora_only else 'lora'}: give the adapter(s) with --adapter DIR")
    callbacks = dict(on_tensor=on_tensor, on_written=on_written, on_report=on_report)
    if not adapters:
        return export_merged(config, model_dir, **callbacks)
    parse_types(config.type)  # fail on a bad type before merging
    if config.lora_only:
        result = ExportResult(lora_paths=write_lora_files(adapters, model_dir, Path(config.out), config.name))
        if on_written:
            on_written(result)
        return result
    from lowrank.quantize.merge import merge_adapters

    Path(config.out).mkdir(parents=True, exist_ok=True)
    config = replace(config, name=config.name or Path(adapters[-1]).resolve().name)
    with tempfile.TemporaryDirectory(dir=config.out, prefix=".merged-") as tmp:
        merged = merge_adapters(str(model_dir), list(adapters), Path(tmp) / "merged", dtype=merged_dtype(config))
        lora = None
        if config.lora:
            base_stem = base_name or Path(model_dir).name
            lora = LoraExport(Path(model_dir), base_stem if base_stem != config.name else f"{base_stem}-base",
                              list(adapters))
        return export_merged(config, merged, lora=lora, **callbacks)


def export_merged(config: ExportConfig, model_dir: Path, *, lora: LoraExport | None = None,
                  on_tensor: Callable[[dict], None] | None = None,
                  on_written: Callable[[ExportResult], None] | None = None,
                  on_report: Callable[[VerifyReport], None] | None = None) -> ExportResult:
    """Export a merged HF dir: GGUF files, fit estimates, Modelfiles, then (``config.verify``) verify each file.

    ``lora``: also write the base GGUFs and the LoRA GGUFs, verify the base files, and check base + adapter
    against each merged file. Callbacks as in `export_model`.
    """
    from lowrank.export.fit import estimate_fit, parse_size
    from lowrank.export.gguf import export_gguf, parse_types
    from lowrank.export.source import read_config
    from lowrank.models import load_tokenizer

    parse_types(config.type)  # fail on a bad type before any work
    template = resolve_chat_template(config.chat_template, model_dir)
    result = ExportResult(budget=parse_size(config.fit) if config.fit else None)
    result.paths = export_gguf(model_dir, config.out, config.type, name=config.name, chat_template=template,
                               threads=config.threads, on_tensor=on_tensor)
    # Loaded once, after export_gguf has read it without error, for the base files' template and the Modelfiles.
    tokenizer = load_tokenizer(str(model_dir), pad_with_eos=False) if lora or config.modelfile else None
    model_template = template or (tokenizer.chat_template if tokenizer else None)
    if lora:
        # The base file carries the training template too: llama.cpp formats chats with the base
        # GGUF's tokenizer.chat_template when it runs base + adapter.
        result.base_paths = export_gguf(lora.base_dir, config.out, config.type, name=lora.base_stem,
                                        chat_template=model_template, threads=config.threads, on_tensor=on_tensor)
        result.lora_paths = write_lora_files(lora.adapters, lora.base_dir, Path(config.out), config.name)
    hf_config = read_config(model_dir)
    result.fits = [estimate_fit(p, hf_config, config.context_length) for p in result.paths]
    if on_written:
        on_written(result)
    if config.modelfile:
        result.modelfiles = _write_modelfiles(result, tokenizer, model_template)
    if config.verify:
        _verify(result, model_dir, lora, template, on_report)
    return result


def _write_modelfiles(result: ExportResult, tokenizer, template: str | None) -> list[Path]:
    """One Modelfile per model and base file; with a single LoRA file, the base's names the adapter too."""
    from lowrank.export.modelfile import write_modelfile

    eos, bos = tokenizer.eos_token or "", tokenizer.bos_token or ""
    written = [write_modelfile(p, template, eos, bos_token=bos) for p in result.paths + result.base_paths]
    if result.base_paths and len(result.lora_paths) == 1:
        lora_gguf = result.lora_paths[0]
        written.append(write_modelfile(result.base_paths[0], template, eos, adapter=lora_gguf, bos_token=bos))
    return written


def _verify(result: ExportResult, model_dir: Path, lora: LoraExport | None, template: str | None,
            on_report: Callable[[VerifyReport], None] | None) -> None:
    """Verify each model file against ``model_dir`` and each base file against the base; fills result.reports."""
    from lowrank.export.verify import load_hf_model, verify_gguf

    def add(report: VerifyReport) -> None:
        result.reports.append(report)
        if on_report:
            on_report(report)

    paths, base_paths, lora_paths = result.paths, result.base_paths, result.lora_paths
    reference = next((p for p in paths if p.name.endswith("-f16.gguf")), None)
    base_reference = next((p for p in base_paths if p.name.endswith("-f16.gguf")), None)
    lora_check = {}
    if base_paths and len(lora_paths) == 1:
        # Merged into dequantized nf4/int8 weights: base + adapter differs by the quantization error.
        record = runrecord.read_optional(model_dir)
        exact = ((record.extra.get("into") if record else None) or "original") == "original"
        lora_check = {"lora_gguf": lora_paths[0], "lora_exact": exact}
    hf_model = load_hf_model(model_dir) if paths else None  # loaded once for every file checked against it
    for i, p in enumerate(paths):
        extra = {**lora_check, "base_gguf": base_paths[i]} if lora_check else {}
        add(verify_gguf(p, model_dir, chat_template=template,
                        reference_gguf=reference if p != reference else None, hf_model=hf_model, **extra))
    hf_model = None  # freed before the base is loaded
    hf_model = load_hf_model(lora.base_dir) if base_paths else None
    for p in base_paths:
        add(verify_gguf(p, lora.base_dir, chat_template=template,
                        reference_gguf=base_reference if p != base_reference else None, hf_model=hf_model))
    result.lora_check_skipped = bool(lora) and len(lora_paths) > 1
