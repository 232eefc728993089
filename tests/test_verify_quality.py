"""`lowrank verify` fails a quantized file on numbers: KL to the float reference and top-1 agreement, each held
to a limit from llama.cpp's own quantization of the same reference (or llama.cpp's published 8B figures)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from lowrank.cli import main
from lowrank.export.gguf import export_gguf

# ggml block layouts: bytes per block, byte offset of the block's f16 scale d.
SCALE_AT = {"Q8_0": (34, 0), "Q4_0": (18, 0), "Q5_0": (22, 0), "Q4_K": (144, 0), "Q5_K": (176, 0), "Q6_K": (210, 208)}


def scramble_scales(src: Path, dst: Path) -> tuple[str, str]:
    """Copy ``src`` to ``dst`` with the scale of every block of its largest quantized tensor negated; (name, type)."""
    import gguf

    shutil.copy(src, dst)
    reader = gguf.GGUFReader(str(dst), "r+")
    tensor = max((t for t in reader.tensors if t.tensor_type.name in SCALE_AT), key=lambda t: t.n_bytes)
    size, at = SCALE_AT[tensor.tensor_type.name]
    data = np.asarray(tensor.data).view(np.uint8).reshape(-1)
    data[at + 1::size] ^= 0x80  # the sign bit of the little-endian f16
    reader.data.flush()
    return tensor.name, tensor.tensor_type.name


@pytest.fixture(scope="module")
def files(tiny_model_factory, tmp_path_factory) -> dict:
    """A tiny LLaMA whose rows are multiples of 256 (real K-quant blocks): F16, Q8_0, Q4_K_M, and a copy of
    each quantized file with one tensor's scales negated."""
    src = tiny_model_factory(tokenizer="bpe", hidden_size=256, intermediate_size=512, num_layers=1)
    out = tmp_path_factory.mktemp("quality")
    f16, q8, q4km = export_gguf(src, out / "good", ["f16", "q8_0", "q4_k_m"], name="m")
    (out / "bad").mkdir()
    bad = {name: out / "bad" / path.name for name, path in (("q8_0", q8), ("q4_k_m", q4km))}
    scrambled = {name: scramble_scales(path, bad[name]) for name, path in (("q8_0", q8), ("q4_k_m", q4km))}
    return {"src": src, "f16": f16, "q8_0": q8, "q4_k_m": q4km, "bad": bad, "scrambled": scrambled}


def _verify(capsys, *argv) -> tuple[int, str]:
    code = main(["verify", *map(str, argv), "--greedy-tokens", "4"])
    return code, capsys.readouterr().out


@pytest.mark.parametrize("name", ["q8_0", "q4_k_m"])
def test_sound_quantized_file_passes_within_limits(files, capsys, name):
    code, out = _verify(capsys, files[name], files["src"], "--reference", files["f16"])
    assert code == 0, out
    assert re.search(r"KL \S+ nats, top-1 agreement \S+ \(limits: KL <= \S+, top-1 >= \S+, from llama.cpp's own "
                     rf"{name.upper()} of the same reference", out), out


@pytest.mark.parametrize("name", ["q8_0", "q4_k_m"])
def test_scrambled_scales_fail_with_the_figure_and_the_limit(files, capsys, name):
    tensor, ggml_type = files["scrambled"][name]
    code, out = _verify(capsys, files["bad"][name], files["src"], "--reference", files["f16"])
    assert code == 1, out
    assert out.splitlines()[0].endswith(f"({name.upper()}): FAIL"), (tensor, ggml_type, out)
    kl = re.search(r"problem: KL to m-f16.gguf (\S+) nats exceeds the limit (\S+) \(llama.cpp's own", out)
    top1 = re.search(r"problem: top-1 agreement with m-f16.gguf (\S+)% is below the limit (\S+)%", out)
    assert kl and top1, out
    assert float(kl[1]) > 10 * float(kl[2]) and float(top1[1]) < float(top1[2])


def test_without_a_float_file_an_f16_is_written_for_the_check_and_removed(files, capsys):
    code, out = _verify(capsys, files["bad"]["q8_0"], files["src"])
    assert code == 1 and f"vs F16 of {files['src']}: KL" in out, out
    assert "problem: KL to the F16 reference" in out
    assert sorted(p.name for p in files["bad"]["q8_0"].parent.iterdir()) == ["m-q4_k_m.gguf", "m-q8_0.gguf"]


def test_published_limits_when_asked_not_to_quantize_again(files, capsys):
    code, out = _verify(capsys, files["bad"]["q8_0"], files["src"], "--reference", files["f16"],
                        "--no-reference-quant")
    assert code == 1
    assert "exceeds the limit 4.07e-03 (llama.cpp's published Q8_0 figures for LLaMA 3 8B" in out, out


def test_a_quantized_reference_is_refused(files, capsys):
    code = main(["verify", str(files["q4_k_m"]), str(files["src"]), "--reference", str(files["q8_0"])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (f"lowrank verify: error: {files['q8_0']}: a reference must be a float GGUF "
                                 "(F16, BF16 or F32), not Q8_0")


def test_a_killed_verification_leaves_a_dir_the_next_one_removes(files, tmp_path, capsys):
    gguf = tmp_path / "m-q8_0.gguf"
    shutil.copy(files["q8_0"], gguf)
    stale = tmp_path / ".m-q8_0-verify-999999999"  # no such process
    stale.mkdir()
    (stale / "reference-f16.gguf").write_bytes(b"half")
    code, out = _verify(capsys, gguf, files["src"])
    assert code == 0, out
    assert [p.name for p in tmp_path.iterdir()] == ["m-q8_0.gguf"]


def test_export_then_run_fail_on_a_scrambled_file(files, tmp_path, capsys, monkeypatch):
    """`lowrank export` verifies what it wrote; a file broken as it is written fails, exit 1."""
    from lowrank.export import gguf as gguf_module

    real = gguf_module.write_direct

    def write_then_break(source, vocab, gtype, path, *args, **kwargs):
        written = real(source, vocab, gtype, path, *args, **kwargs)
        if gtype.name == "q8_0":
            scramble_scales(written, written.with_name("scrambled"))
            shutil.move(written.with_name("scrambled"), written)
        return written

    monkeypatch.setattr(gguf_module, "write_direct", write_then_break)
    code = main(["export", str(files["src"]), "--type", "f16,q8_0", "--out", str(tmp_path / "g"), "--name", "m",
                 "--no-modelfile"])
    out = capsys.readouterr().out
    assert code == 1
    assert "m-q8_0.gguf (Q8_0): FAIL" in out and "m-f16.gguf (F16): PASS" in out


# --- the limits themselves -------------------------------------------------------------------------

def test_relative_limits_scale_the_reference_quantization():
    from lowrank.export.quality import KL_FACTOR, KL_FLOOR, TOP1_MARGIN, relative_limits

    limits = relative_limits("Q4_0", 0.002, 0.9)
    assert limits.kl == pytest.approx(0.002 * KL_FACTOR + KL_FLOOR)
    assert limits.top1 == pytest.approx(0.9 - TOP1_MARGIN)
    assert relative_limits("Q4_0", 0.0, 0.05).top1 == 0.0


def test_published_limits_take_the_next_lower_type_top1():
    from lowrank.export.quality import PUBLISHED_KL_FACTOR, PUBLISHED_TOP1_MARGIN, published_limits

    q5km = published_limits("Q5_K_M")  # no published top-1: Q4_K_M's, the next lower type with one
    assert q5km.kl == pytest.approx(0.010762 * PUBLISHED_KL_FACTOR)
    assert q5km.top1 == pytest.approx(0.91901 - PUBLISHED_TOP1_MARGIN)
    assert published_limits("Q3_K_M").top1 == pytest.approx(0.71138 - PUBLISHED_TOP1_MARGIN)
    assert published_limits("TQ1_0") is None


def test_check_limits_names_figure_limit_and_source():
    from lowrank.export.quality import QualityLimits, check_limits

    limits = QualityLimits(kl=0.01, top1=0.8, source="somewhere")
    assert check_limits(0.005, 0.9, limits, "ref.gguf") == []
    assert check_limits(0.02, 0.5, limits, "ref.gguf") == [
        "KL to ref.gguf 2.00e-02 nats exceeds the limit 1.00e-02 (somewhere)",
        "top-1 agreement with ref.gguf 50.0% is below the limit 80.0% (somewhere)"]

