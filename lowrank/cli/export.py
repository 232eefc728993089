"""`lowrank export`: a merged HF dir (or base + adapters) -> GGUF files, a fit report, Modelfiles, verification.

Three ways to use adapters (``--adapter DIR``, repeatable):
- merged (default): merge into MODEL_DIR in a temporary dir, export that, verify it;
- ``--lora``: as merged, plus the base as GGUF and each adapter as a llama.cpp LoRA GGUF, and
  verify that the base GGUF with the adapter gives the merged GGUF's logits;
- ``--lora-only``: only the LoRA GGUF of each adapter (for a base GGUF exported before).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from lowrank import runrecord
from lowrank.config import add_dataclass_arguments, build_config
from lowrank.errors import UserError


def register(parser: argparse.ArgumentParser) -> None:
    from lowrank.export.gguf import ExportConfig

    parser.add_argument("model_dir", metavar="MODEL_DIR", help="merged Hugging Face model dir (or the base, with --adapter)")
    parser.add_argument("--adapter", dest="adapter_dirs", action="append", default=[], metavar="DIR",
                        help="merge this adapter into MODEL_DIR first (repeat to apply several, in order)")
    add_dataclass_arguments(parser, ExportConfig)


def resolve_chat_template(value: str | None, model_dir: Path) -> str | None:
    from lowrank.templates import BUILTIN_TEMPLATES

    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    if value:
        return value
    record = runrecord.read_optional(model_dir)
    return record.chat_template.jinja if record and record.chat_template else None


def _tokenizer(model_dir: Path):
    from lowrank.models import load_tokenizer

    return load_tokenizer(str(model_dir), pad_with_eos=False)


def export_and_report(config, model_dir: Path, reports: list | None = None, *, lora: dict | None = None) -> int:
    """Export ``model_dir``, print paths and the fit report, write Modelfiles, verify; 0 when every check passes.

    ``reports``: when a list, the VerifyReport of each exported file is appended to it.

    ``lora``: {"base_dir", "base_stem", "adapters": [dir, ...]} (``--lora``): also write the base GGUFs
    and the LoRA GGUFs, verify the base files, and check base + adapter against each merged file.
    """
    from tqdm import tqdm

    from lowrank.export.fit import estimate_fit, format_fit, parse_size
    from lowrank.export.gguf import export_gguf, parse_types, read_config
    from lowrank.export.modelfile import write_modelfile
    from lowrank.export.verify import format_report, load_hf_model, verify_gguf

    logging.getLogger("gguf").setLevel(logging.WARNING)  # gguf-py logs every file it opens at INFO
    parse_types(config.type)  # fail on a bad type before any work
    budget = parse_size(config.fit) if config.fit else None
    template = resolve_chat_template(config.chat_template, model_dir)
    bars: dict[str, tqdm] = {}

    def on_tensor(event: dict) -> None:
        bar = bars.get(event["file"]) or bars.setdefault(
            event["file"], tqdm(total=event["total"], desc=event["file"], unit="tensor", leave=False))
        bar.update(1)

    try:
        paths = export_gguf(model_dir, config.out, config.type, name=config.name, chat_template=template,
                            threads=config.threads, on_tensor=on_tensor)
        base_paths, lora_paths = [], []
        # Loaded once, after export_gguf has read it without error, for the base files' template and the Modelfiles.
        tokenizer = _tokenizer(model_dir) if lora or config.modelfile else None
        model_template = template or (tokenizer.chat_template if tokenizer else None)
        if lora:
            # The base file carries the training template too: llama.cpp formats chats with the base
            # GGUF's tokenizer.chat_template when it runs base + adapter.
            base_paths = export_gguf(lora["base_dir"], config.out, config.type, name=lora["base_stem"],
                                     chat_template=model_template,
                                     threads=config.threads, on_tensor=on_tensor)
            lora_paths = write_lora_files(lora["adapters"], lora["base_dir"], Path(config.out), config.name)
    finally:
        for bar in bars.values():
            bar.close()
    hf_config = read_config(model_dir)
    for p in paths + base_paths + lora_paths:
        print(p)
    print(format_fit([estimate_fit(p, hf_config, config.context_length) for p in paths], budget))
    if config.modelfile:
        eos, bos = tokenizer.eos_token or "", tokenizer.bos_token or ""
        for p in paths + base_paths:
            write_modelfile(p, model_template, eos, bos_token=bos)
        if base_paths and len(lora_paths) == 1:
            write_modelfile(base_paths[0], model_template, eos, adapter=lora_paths[0], bos_token=bos)
    if not config.verify:
        return 0
    reference = next((p for p in paths if p.name.endswith("-f16.gguf")), None)
    base_reference = next((p for p in base_paths if p.name.endswith("-f16.gguf")), None)
    failed = 0
    hf_model = load_hf_model(model_dir) if paths else None  # loaded once for every file checked against it
    for i, p in enumerate(paths):
        extra = {}
        if base_paths and len(lora_paths) == 1:
            # Merged into dequantized nf4/int8 weights: base + adapter differs by the quantization error.
            record = runrecord.read_optional(model_dir)
            exact = ((record.extra.get("into") if record else None) or "original") == "original"
            extra = {"lora_gguf": lora_paths[0], "base_gguf": base_paths[i], "lora_exact": exact}
        report = verify_gguf(p, model_dir, chat_template=template,
                             reference_gguf=reference if p != reference else None, hf_model=hf_model, **extra)
        print(format_report(report))
        failed += not report.passed
        if reports is not None:
            reports.append(report)
    hf_model = None  # freed before the base is loaded
    hf_model = load_hf_model(lora["base_dir"]) if base_paths else None
    for p in base_paths:
        report = verify_gguf(p, lora["base_dir"], chat_template=template,
                             reference_gguf=base_reference if p != base_reference else None, hf_model=hf_model)
        print(format_report(report))
        failed += not report.passed
    if lora and len(lora_paths) > 1:
        print("LoRA check skipped: llama-cpp-python applies one adapter per model; verify each with "
              "`lowrank verify MERGED.gguf MERGED_DIR --lora ADAPTER.gguf --base-gguf BASE.gguf`")
    return 1 if failed else 0


def write_lora_files(adapter_dirs: list[str], base_dir: Path, out: Path, name: str | None) -> list[Path]:
    """Each adapter as ``<stem>-lora.gguf`` in ``out``; stem = ``name`` for a single adapter, else its dir name."""
    from lowrank.export.lora import export_lora_gguf

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for adapter in adapter_dirs:
        stem = name if name and len(adapter_dirs) == 1 else Path(adapter).resolve().name
        paths.append(export_lora_gguf(adapter, base_dir, out / f"{stem}-lora.gguf"))
    return paths


def _merged_dtype(config) -> str:
    """float32 for the temporary merge when an F32/BF16 file or the LoRA check needs it exact, else float16."""
    types = {t.lower() for t in config.type}
    return "float32" if config.lora or types & {"f32", "bf16"} else "float16"


def run(args: argparse.Namespace) -> int:
    from lowrank.export.gguf import ExportConfig, parse_types
    from lowrank.tiny import resolve_model_name

    config = build_config(ExportConfig, args)
    model_dir = Path(resolve_model_name(args.model_dir))
    if config.name is None and not args.adapter_dirs and str(model_dir) != args.model_dir:
        config.name = args.model_dir  # `lowrank export tiny` -> tiny-f16.gguf, not the cache dir's hash
    adapters = args.adapter_dirs
    if config.lora and config.lora_only:
        raise UserError("--lora writes the merged files too, --lora-only only the adapters: pick one")
    if (config.lora or config.lora_only) and not adapters:
        raise UserError(f"--{'lora-only' if config.lora_only else 'lora'}: give the adapter(s) with --adapter DIR")
    if not adapters:
        return export_and_report(config, model_dir)
    parse_types(config.type)  # fail on a bad type before merging
    if config.lora_only:
        paths = write_lora_files(adapters, model_dir, Path(config.out), config.name)
        for p in paths:
            print(p)
        print(f"run with llama.cpp on a GGUF of {args.model_dir}: Llama(model_path=BASE.gguf, lora_path=ADAPTER.gguf); "
              "check with `lowrank verify MERGED.gguf MERGED_DIR --lora ADAPTER.gguf --base-gguf BASE.gguf`")
        return 0
    from lowrank.quantize.merge import merge_adapters

    Path(config.out).mkdir(parents=True, exist_ok=True)
    if config.name is None:
        config.name = Path(adapters[-1]).resolve().name
    with tempfile.TemporaryDirectory(dir=config.out, prefix=".merged-") as tmp:
        merged = merge_adapters(str(model_dir), adapters, Path(tmp) / "merged", dtype=_merged_dtype(config))
        lora = None
        if config.lora:
            base_stem = Path(args.model_dir).name
            lora = {"base_dir": model_dir, "adapters": adapters,
                    "base_stem": base_stem if base_stem != config.name else f"{base_stem}-base"}
        return export_and_report(config, merged, lora=lora)
