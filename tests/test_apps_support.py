"""Shared set-up for the apps tests (test_apps.py, test_chat.py): tiny GGUFs and bad model files."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_tiny_gguf(model_dir: Path, out_dir: Path, gguf_type: str = "f16") -> Path:
    """A GGUF of the tiny model written by ``lowrank export`` (chat template: the tokenizer's or vicuna)."""
    from lowrank.export.gguf import export_gguf

    out_dir.mkdir(parents=True, exist_ok=True)
    (path,) = export_gguf(model_dir, out_dir, types=[gguf_type])
    return Path(path)


def make_unknown_arch_gguf(path: Path) -> Path:
    """A well-formed GGUF whose general.architecture llama.cpp does not know."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "notamodelarch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
