"""The words `lowrank` shows a user: what --help says the tool is, how `lowrank score` names a pair, and
the third-party noise kept out of a normal run's output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_help_says_what_the_tool_does(capsys):
    from lowrank.cli import main

    assert main([]) == 2  # no command: the help
    text = " ".join(capsys.readouterr().out.split())
    assert "Fine-tune LLaMA-class models with LoRA or QLoRA (SFT, reward model, PPO, GRPO, DPO)" in text
    assert "merge the adapters, export GGUF files for llama.cpp, and chat with the result" in text
    assert "The `lowrank` command: parses flags" not in text  # the module's docstring, not the tool's


def test_score_lines_name_each_pair_in_a_few_quoted_words():
    from lowrank.cli.score import _excerpt

    assert _excerpt("How do I\n save a file?") == '"How do I save a file?"'
    long = "word " * 20
    assert _excerpt(long) == json.dumps(("word " * 8)[:37] + "...") and len(json.loads(_excerpt(long))) == 40
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert _excerpt(messages) == '"Hi there"'  # a conversation: its last message
    assert _excerpt('say "yes"') == '"say \\"yes\\""'  # one JSON string: quotes inside cannot end it


def _sft_nf4_one_step(base, out, *flags: str) -> subprocess.CompletedProcess:
    code = "import sys\nfrom lowrank.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    argv = [*flags, "sft", "--model", str(base), "--quant", "nf4", "--max-steps", "1", "--max-length", "64",
            "--lora-r", "2", "--eval-fraction", "0", "--no-gradient-checkpointing", "--output-dir", str(out)]
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_bitsandbytes_kernel_hub_warnings_show_only_with_verbose(tiny_spm, tmp_path):
    """On a CPU with AVX512-bf16, importing bitsandbytes asks the `kernels` package for a faster 4-bit kernel
    from the Hugging Face Hub; offline, both packages log warnings a user can do nothing about. A child
    process, since bitsandbytes warns once, when first imported."""
    verbose = _sft_nf4_one_step(tiny_spm, tmp_path / "verbose", "-v").stderr
    if "kernels-community" not in verbose:
        pytest.skip("bitsandbytes does not look for the kernel on this CPU (no AVX512-bf16)")
    normal = _sft_nf4_one_step(tiny_spm, tmp_path / "normal").stderr
    assert "kernels-community" not in normal and "publisher trust" not in normal, normal
    assert "loaded " in normal  # our own log lines still show
