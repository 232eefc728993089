"""Session fixtures: tiny models with real tokenizers, built offline once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the suite touches the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("MPLBACKEND", "Agg")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under `pytest -n 2` each worker has one of the two cores: no oversubscription.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _lowrank_cache(tmp_path_factory):
    """Tiny models built by `--model tiny` go to a cache shared by the session (and its subprocesses)."""
    # Workers of pytest-xdist share one cache (builds are file-locked): the parent of their base temps.
    shared = tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") else tmp_path_factory.getbasetemp()
    cache = os.environ.get("LOWRANK_TEST_CACHE") or str(shared / "lowrank-cache")
    os.environ["LOWRANK_CACHE"] = cache
    os.environ["HF_DATASETS_CACHE"] = str(Path(cache) / "datasets")
    yield cache


@pytest.fixture(scope="session")
def tiny_model_factory(_lowrank_cache):
    """tiny_model_factory(**kwargs) -> Path of a tiny model dir (see lowrank.tiny.build_tiny_model), cached."""
    from lowrank.tiny import tiny_model_path

    def make(**kwargs) -> Path:
        return tiny_model_path(**kwargs)

    return make


@pytest.fixture(scope="session")
def tiny_spm(tiny_model_factory) -> Path:
    """A tiny LLaMA (hidden 64, 2 layers, GQA 4/2) with a SentencePiece tokenizer (LLaMA-1/2 style)."""
    return tiny_model_factory(tokenizer="spm")


@pytest.fixture(scope="session")
def spm_tokenizer(tiny_spm):
    """The tiny SentencePiece model's tokenizer, as transformers loads it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_spm))


@pytest.fixture(scope="session")
def tiny_bpe(tiny_model_factory) -> Path:
    """A tiny LLaMA with a byte-level BPE tokenizer (LLaMA-3 style) and the llama3 chat template."""
    return tiny_model_factory(tokenizer="bpe")


@pytest.fixture(scope="session")
def sample_data() -> dict[str, Path]:
    """Paths of the sample files shipped in lowrank/assets, by name."""
    from lowrank.data import SAMPLE_FILES

    return dict(SAMPLE_FILES)
