"""export/quants.py and export/stream.py: the fast quantizers give gguf-py's bytes exactly, and the
threaded tensor writer writes in order and hands its errors back."""

from __future__ import annotations

import numpy as np
import pytest

from lowrank.export import quants
from lowrank.export.stream import TensorWriter

# Q8_0 twice: the C kernel (export/_q8.c) and the numpy one an install without a C compiler uses.
TYPES = ["Q8_0", "Q8_0 numpy", "Q4_0", "Q5_0"]
assert {name.split()[0] for name in TYPES} == set(quants.KERNELS)


def reference(array: np.ndarray, name: str) -> np.ndarray:
    import gguf

    return gguf.quants.quantize(array.astype(np.float32), gguf.GGMLQuantizationType[name.split()[0]])


def fast(array: np.ndarray, name: str, threads: int | None = None) -> np.ndarray:
    import gguf

    kernel = quants._q8
    if name.endswith(" numpy"):
        quants._q8 = None
    try:
        return quants.quantize(array, gguf.GGMLQuantizationType[name.split()[0]], threads=threads)
    finally:
        quants._q8 = kernel


def test_the_c_kernel_was_built():
    # `pip install -e .` compiles export/_q8.c where a C compiler is (setup.py); without it Q8_0 export is slower.
    assert quants._q8 is not None, "export/_q8.c was not compiled: reinstall with a C compiler (pip install -e .)"


def test_the_c_kernel_refuses_buffers_of_different_block_counts():
    src = np.zeros(64, np.float16)
    with pytest.raises(ValueError, match="same number of blocks"):
        quants._q8.q8_0(src, np.empty(3 * 34, np.uint8), np.empty(2, np.float32), True)
    with pytest.raises(ValueError, match="same number of blocks"):
        quants._q8.q8_0(src, np.empty(2 * 34, np.uint8), np.empty(2, np.float32), False)  # as float32: 1 block
    with pytest.raises(TypeError):
        quants._q8.q8_0(src, np.empty(2 * 34, np.uint8).tobytes(), np.empty(2, np.float32), True)  # read-only out


def special_blocks() -> np.ndarray:
    """Blocks (rows of 32) where rounding, ties and signs decide the bytes."""
    rng = np.random.default_rng(1)
    h = np.nextafter(np.float32(0.5), np.float32(0))
    rows = [
        np.zeros(32),  # d == 0: 1 / d must be taken as 0
        -np.zeros(32),  # -0.0 first: Q4_0/Q5_0's d keeps the sign of the first largest element
        np.r_[-0.0, np.zeros(31)],
        np.r_[127.0, np.arange(-15, 16) + 0.5],  # d = 1: q lands on every .5 tie (half away from zero)
        np.r_[-127.0, -(np.arange(-15, 16) + 0.5)],
        np.r_[127.0, h, -h, 1 - h, 0.5, -0.5, 1.5, 2.5, np.zeros(24)],  # 0.49999997: q + 0.5 would round up
        np.r_[3.0, -3.0, rng.standard_normal(30)],  # +m then -m: the first decides the sign of d
        np.r_[-3.0, 3.0, rng.standard_normal(30)],
        np.r_[rng.standard_normal(10), 5.0, rng.standard_normal(10), -5.0, rng.standard_normal(10)],
        np.full(32, 7.0), np.full(32, -7.0),  # every element is the largest
        np.r_[65504.0, -65504.0, rng.uniform(-65504, 65504, 30)],  # float16 extremes
        np.r_[6e-8, -6e-8, np.zeros(30)],  # float16 subnormals: d becomes a float16 subnormal or 0
        rng.standard_normal(32) * 1e-30,  # float32 tiny (1 / d still finite)
        rng.standard_normal(32) * 1e30,  # float32 huge: d overflows float16 to inf, as in gguf-py
        rng.standard_normal(32) * 1e-39,  # float32 subnormal: 1 / d overflows to inf, q is inf or NaN, written 0
        np.r_[1e-44, np.zeros(31)],
    ]
    return np.stack(rows).astype(np.float32)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # gguf-py, on the 1e30 block
@pytest.mark.filterwarnings("ignore:overflow encountered in divide:RuntimeWarning")  # the subnormal blocks: 1 / d
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # and q = 0 * inf
@pytest.mark.parametrize("name", TYPES)
def test_special_blocks_match_gguf_py(name):
    x = special_blocks()
    np.testing.assert_array_equal(fast(x, name), reference(x, name))


@pytest.mark.parametrize("name", TYPES)
def test_every_finite_float16_matches_gguf_py(name):
    # Q8_0 widens float16 through its bits (times 2^112) and takes block maxima on the bits: every finite
    # float16 (subnormals and both zeros included), in blocks shuffled so that each mixes magnitudes.
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    values = bits.view(np.float16)
    values = values[np.isfinite(values)]
    np.random.default_rng(3).shuffle(values)
    x = np.concatenate([values, np.sort(values)])  # sorted too: blocks of near-equal values, ties
    x = x[: len(x) // 32 * 32].reshape(-1, 32)
    np.testing.assert_array_equal(fast(x, name), reference(x, name))


def test_q8_0_export_does_not_import_torch(tiny_bpe, tmp_path):
    # Importing torch costs over a second, more than writing a 1B model's Q8_0 file: F16 and Q8_0 export never do.
    import subprocess
    import sys

    code = ("import sys\nfrom lowrank.export.gguf import export_gguf\n"
            f"export_gguf({str(tiny_bpe)!r}, {str(tmp_path)!r}, 'f16,q8_0')\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("shape", [(1, 32), (7, 96), (3, 5, 64), (33, 4096)])
def test_random_float16_and_float32_match_gguf_py(name, shape):
    rng = np.random.default_rng(sum(shape))
    x32 = (rng.standard_normal(shape) * rng.choice([1e-3, 0.02, 1.0, 300.0], size=shape[:-1] + (1,))).astype(np.float32)
    x16 = x32.astype(np.float16)
    x32[..., :32] = 0  # whole zero blocks among the others
    for x in (x32, x16):
        got, want = fast(x, name), reference(x, name)
        assert got.shape == want.shape and got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", TYPES)
def test_chunk_edges_and_thread_counts_do_not_change_bytes(name, monkeypatch):
    monkeypatch.setattr(quants, "BLOCKS_PER_CHUNK", 5)  # many chunks, a short last one
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((9, 13 * 32)) * 0.05).astype(np.float16)  # 117 blocks: 23 chunks + 2
    want = reference(x, name)
    for threads in (1, 2, 3):
        np.testing.assert_array_equal(fast(x, name, threads=threads), want)


def test_chunks_follow_blocks_per_chunk_at_call_time(monkeypatch):
    # The test above relies on it: a default bound when _run_chunks was defined left it one 4096-block chunk.
    monkeypatch.setattr(quants, "BLOCKS_PER_CHUNK", 5)
    assert quants._run_chunks(12, lambda start, stop: (start, stop), threads=2) == [(0, 5), (5, 10), (10, 12)]


def test_scale_is_stored_as_float16_nearest_even():
    # d = amax / 127 for amax = 127 * (1 + 2**-11): exactly between two float16 values, rounds to even.
    x = np.zeros((1, 32), np.float32)
    x[0, 0] = np.float32(127) * np.float32(1 + 2**-11)
    got = fast(x, "Q8_0")
    assert got[0, :2].view(np.float16)[0] == np.float16(1.0)
    np.testing.assert_array_equal(got, reference(x, "Q8_0"))


def test_other_types_go_to_gguf_py():
    import gguf

    x = np.random.default_rng(4).standard_normal((4, 64)).astype(np.float32)
    Q = gguf.GGMLQuantizationType
    np.testing.assert_array_equal(quants.quantize(x, Q.Q4_1), gguf.quants.quantize(x, Q.Q4_1))
    np.testing.assert_array_equal(quants.quantize(x, Q.BF16), gguf.quants.quantize(x, Q.BF16))


def test_row_size_not_multiple_of_32_is_refused():
    with pytest.raises(ValueError, match="not a multiple of 32"):
        fast(np.zeros((2, 48), np.float32), "Q8_0")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_all_finite_agrees_with_isfinite(dtype, monkeypatch):
    monkeypatch.setattr(quants, "BLOCKS_PER_CHUNK", 1)  # chunks of 128 values: the bad one lands mid-array
    x = np.random.default_rng(5).standard_normal(1001).astype(dtype)
    x[-1] = np.finfo(dtype).max  # largest finite value is finite
    x[0] = -np.finfo(dtype).max
    assert quants.all_finite(x)
    for bad in (np.inf, -np.inf, np.nan):
        for where in (0, 500, 1000):
            y = x.copy()
            y[where] = bad
            assert not quants.all_finite(y), (bad, where)
            assert not quants.all_finite(y.reshape(7, 11, 13), threads=2)


# ----------------------------------------------------------------------------- exported files


def test_exported_q_files_hold_gguf_py_bytes_and_q8_0_runs_in_llama_cpp(tiny_bpe, tmp_path):
    """End to end: every 2-D tensor of the Q8_0/Q4_0/Q5_0 files is gguf-py's quantization of the
    (q/k-permuted) HF weight, the output projection Q8_0 in every file, and llama.cpp loads the Q8_0
    file and gives finite logits."""
    import gguf

    from lowrank.export.gguf import export_gguf
    from lowrank.export.source import load_tensor, read_source
    from lowrank.export.llama import gguf_logits, load_llama

    paths = export_gguf(tiny_bpe, tmp_path, ["q8_0", "q4_0", "q5_0"], name="m")
    source = read_source(tiny_bpe)
    weights = {t.gguf_name: load_tensor(source, t) for t in source.tensors}
    for path, name in zip(paths, ["Q8_0", "Q4_0", "Q5_0"]):
        checked = 0
        for t in gguf.GGUFReader(str(path)).tensors:
            if t.name == "output.weight":
                assert t.tensor_type.name == "Q8_0", (path.name, t.tensor_type.name)
            if t.tensor_type.name in (name, "Q8_0"):
                want = reference(weights[t.name], t.tensor_type.name).reshape(-1)
                np.testing.assert_array_equal(np.asarray(t.data).reshape(-1), want, err_msg=f"{path.name} {t.name}")
                checked += 1
        assert checked >= 8, (path, checked)  # every 2-D weight of the tiny model
    llm = load_llama(paths[0], n_threads=1)
    logits = gguf_logits(llm, [1, 2, 3, 4])
    llm.close()
    assert logits.shape[0] == 4 and np.isfinite(logits).all()


def test_load_tensor_gives_the_shards_values_as_llama_cpp_keeps_them(tiny_bpe):
    from safetensors.numpy import load_file

    from lowrank.export import tensors as table
    from lowrank.export.source import load_tensor, read_source

    source = read_source(tiny_bpe)
    stored = {}
    for shard in sorted(tiny_bpe.glob("*.safetensors")):
        stored.update(load_file(shard))
    for tensor in source.tensors:
        got = load_tensor(source, tensor)
        want = table.llama_cpp_values(stored[tensor.hf_name], tensor.hf_name, source.config)
        np.testing.assert_array_equal(got, want, err_msg=tensor.hf_name)


def test_shard_truncated_after_its_header_was_read_is_a_one_line_error(tiny_bpe, tmp_path):
    import shutil

    from lowrank.errors import UserError
    from lowrank.export.source import load_tensor, read_source

    model = tmp_path / "model"
    shutil.copytree(tiny_bpe, model)
    source = read_source(model)
    last = max(source.tensors, key=lambda t: (str(t.file), t.offset) if t.file else ("", -1))
    with open(last.file, "r+b") as f:  # another process cuts the file between the header check and the read
        f.truncate(last.offset + 8)
    with pytest.raises(UserError, match=rf"{last.file.name}: truncated while reading tensor {last.hf_name}"):
        load_tensor(source, last)


# ----------------------------------------------------------------------------- TensorWriter


class FakeGGUFWriter:
    """What TensorWriter uses of gguf.GGUFWriter: write_tensor_data and fout[0]."""

    def __init__(self, path, fail_at: int | None = None):
        self.fout = [open(path, "wb")]
        self.fail_at = fail_at
        self.written: list[int] = []

    def write_tensor_data(self, array):
        if len(self.written) == self.fail_at:
            raise OSError(28, "No space left on device")
        array.tofile(self.fout[0])
        self.written.append(int(array[0]))


def test_tensor_writer_writes_every_tensor_in_order(tmp_path):
    fake = FakeGGUFWriter(tmp_path / "f")
    with TensorWriter(fake, depth=1, kick_bytes=8) as out:
        for i in range(20):
            out.write(np.full(4, i, np.int32))
    fake.fout[0].close()
    assert fake.written == list(range(20))
    assert np.fromfile(tmp_path / "f", np.int32).reshape(20, 4)[:, 0].tolist() == list(range(20))


def test_tensor_writer_raises_the_write_error_in_the_caller(tmp_path):
    fake = FakeGGUFWriter(tmp_path / "f", fail_at=3)
    with pytest.raises(OSError, match="No space left"):
        with TensorWriter(fake, depth=1) as out:
            for i in range(50):
                out.write(np.full(4, i, np.int32))
    fake.fout[0].close()
    assert fake.written == [0, 1, 2]


def test_tensor_writer_stops_when_the_producer_fails(tmp_path):
    fake = FakeGGUFWriter(tmp_path / "f")
    with pytest.raises(KeyboardInterrupt):
        with TensorWriter(fake, depth=1) as out:
            out.write(np.zeros(4, np.int32))
            raise KeyboardInterrupt
    fake.fout[0].close()
    assert len(fake.written) <= 1
