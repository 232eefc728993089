"""Export speed and memory: `lowrank export` to F16 and Q8_0 of a >= 1B-parameter LLaMA-shaped model.

Builds a random fp16 model (TinyLlama-1.1B shape, sharded safetensors, one layer at a time so
it is never all in RAM), runs `lowrank export --no-verify` in a child process per type, and
measures its wall time, CPU time and memory. The physical limit is measured in the same run,
right after each export: writing the same number of bytes with fsync. Each type is run
``--repeats`` times (export, then raw write) and the median of the per-pair ratios is taken,
because on a shared machine both vary from minute to minute; the load average is printed.

Memory is read from the child's /proc/<pid>/status: VmHWM, the kernel's exact peak of the
whole resident set (anonymous + file-backed pages), and RssAnon / RssFile sampled every 10 ms
(their peaks may fall between samples). Anonymous is the memory the export really holds;
file-backed is pages of the mmap'd safetensors shards, clean and dropped by the kernel on
demand. The 2 GB target is judged on VmHWM, the stricter of the two. (getrusage's ru_maxrss
is not used: after a vfork it reports the parent's peak, which is how an earlier version of
this bench came to report 2.45 GiB.)

The child's time inside write_direct (header, tensors, fsync) is printed too, so start-up
(Python, the imports, reading the tokenizer) can be told from the tensor work.
Prints the ratio export / raw write last.

    python bench/export_speed.py [--work DIR] [--layers 22] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)
GiB = 2**30
TARGETS = {"f16": 2.0, "q8_0": 3.0}  # whole command / raw write of the same bytes


def build_model(out: Path, layers: int) -> int:
    """Write config, tokenizer and fp16 shards (one per layer); return the parameter count."""
    from safetensors.numpy import save_file

    from lowrank.tiny import tiny_model_path

    tok_src = tiny_model_path(tokenizer="spm")
    out.mkdir(parents=True)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_src / name, out / name)
    h, f, kv = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_key_value_heads"]
    hd = h // SHAPE["num_attention_heads"]
    rng = np.random.default_rng(0)

    def rand(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    shards: list[dict] = [{"model.embed_tokens.weight": rand(SHAPE["vocab_size"], h)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append({p + "input_layernorm.weight": np.ones(h, np.float16),
                       p + "post_attention_layernorm.weight": np.ones(h, np.float16),
                       p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv * hd, h),
                       p + "self_attn.v_proj.weight": rand(kv * hd, h), p + "self_attn.o_proj.weight": rand(h, h),
                       p + "mlp.gate_proj.weight": rand(f, h), p + "mlp.up_proj.weight": rand(f, h),
                       p + "mlp.down_proj.weight": rand(h, f)})
    shards.append({"model.norm.weight": np.ones(h, np.float16), "lm_head.weight": rand(SHAPE["vocab_size"], h)})
    weight_map, n_params = {}, 0
    for k, tensors in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for t, a in tensors.items():
            weight_map[t], n_params = name, n_params + a.size
        del tensors
        shards[k] = None
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = dict(SHAPE, model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=layers,
                  max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, torch_dtype="float16")
    (out / "config.json").write_text(json.dumps(config))
    return n_params


def raw_write_seconds(path: Path, nbytes: int) -> float:
    """Time to write ``nbytes`` (random, 64 MiB chunks) and fsync: the disk's limit."""
    chunk = np.random.default_rng(1).integers(0, 255, 64 * 2**20, dtype=np.uint8).tobytes()
    start = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


# The child: `lowrank export`'s own entry point, with write_direct timed (printed to stderr).
CHILD = """
import sys, time
import lowrank.export.gguf as g
_write_direct = g.write_direct
def timed(*args, **kwargs):
    start = time.perf_counter()
    path = _write_direct(*args, **kwargs)
    print(f"BENCH write_direct {time.perf_counter() - start:.3f}", file=sys.stderr, flush=True)
    return path
g.write_direct = timed
from lowrank.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of a live process, in bytes ({} once it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def run_export(model: Path, out: Path, gtype: str, child: str = CHILD) -> dict:
    """One `lowrank export` in a child: wall and CPU seconds, memory peaks, write_direct seconds, file."""
    cmd = [sys.executable, "-c", child, "export", str(model), "--type", gtype, "--out", str(out),
           "--no-verify", "--no-modelfile", "--name", "bench"]
    err_file = tempfile.TemporaryFile("w+")  # not a pipe: progress bars could fill it and stall the child
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err_file, text=True)
    peaks: dict[str, int] = {}
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        for key, value in _status(proc.pid).items():
            peaks[key] = max(peaks.get(key, 0), value)
        time.sleep(0.01)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err_file.seek(0)
    err = err_file.read()
    err_file.close()
    if proc.returncode:
        raise SystemExit(f"lowrank export --type {gtype} failed ({proc.returncode}):\n{err[-3000:]}")
    inner = re.search(r"BENCH write_direct ([\d.]+)", err)
    return {"seconds": seconds, "cpu": usage.ru_utime + usage.ru_stime, "peaks": peaks,
            "write_direct": float(inner.group(1)) if inner else float("nan"), "path": out / f"bench-{gtype}.gguf"}


def measure(model: Path, work: Path, gtype: str, repeats: int, child: str = CHILD) -> list[dict]:
    """``repeats`` x (export, raw write of the same bytes), each with the load average before it."""
    runs = []
    for _ in range(repeats):
        load = os.getloadavg()[0]
        run = run_export(model, work / "out", gtype, child)
        run["size"] = run["path"].stat().st_size
        run["path"].unlink()
        run["raw"] = raw_write_seconds(work / "raw.bin", run["size"])
        run["load"] = load
        runs.append(run)
        p = run["peaks"]
        print(f"  {gtype}: export {run['seconds']:.1f} s (write_direct {run['write_direct']:.1f} s, CPU {run['cpu']:.1f} s), "
              f"raw write {run['raw']:.1f} s ({run['size'] / run['raw'] / 2**20:.0f} MiB/s), "
              f"ratio {run['seconds'] / run['raw']:.2f}x; peak RSS {p.get('VmHWM', 0) / GiB:.2f} GiB "
              f"(anon {p.get('RssAnon', 0) / GiB:.2f}, file-backed {p.get('RssFile', 0) / GiB:.2f}); "
              f"load avg {load:.1f}", flush=True)
    return runs


def summary(gtype: str, runs: list[dict]) -> dict:
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    return {"type": gtype, "size": runs[0]["size"], "seconds": med("seconds"), "write_direct": med("write_direct"),
            "cpu": med("cpu"), "raw": med("raw"), "ratio": statistics.median(r["seconds"] / r["raw"] for r in runs),
            "ratio_write_direct": statistics.median(r["write_direct"] / r["raw"] for r in runs),
            "hwm": max(r["peaks"].get("VmHWM", 0) for r in runs), "anon": max(r["peaks"].get("RssAnon", 0) for r in runs),
            "file": max(r["peaks"].get("RssFile", 0) for r in runs), "load": med("load")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="scratch dir (needs ~5 GB); a model built there before is reused")
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--repeats", type=int, default=3, help="export + raw write pairs per type (median is reported)")
    parser.add_argument("--types", default="f16,q8_0")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="lowrank-bench-"))
    model = work / "model"
    try:
        t0 = time.perf_counter()
        if (model / "config.json").exists():
            from lowrank.export.source import read_source

            n_params = read_source(model).n_params
            print(f"model: {n_params / 1e9:.2f} B parameters, fp16, reused from {model}")
        else:
            n_params = build_model(model, args.layers)
            print(f"model: {n_params / 1e9:.2f} B parameters, fp16, built in {time.perf_counter() - t0:.0f} s")
        print(f"machine: {platform.node()} {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
              f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / GiB:.0f} GiB RAM, {time.strftime('%Y-%m-%d %H:%M')}")
        results = [summary(g, measure(model, work, g, args.repeats)) for g in args.types.split(",")]
        print(f"medians of {args.repeats}:")
        for r in results:
            print(f"  {r['type']}: file {r['size'] / GiB:.2f} GiB, export {r['seconds']:.1f} s "
                  f"(of which write_direct {r['write_direct']:.1f} s = {r['ratio_write_direct']:.2f}x raw; "
                  f"CPU {r['cpu']:.1f} s), "
                  f"raw write {r['raw']:.1f} s; peak RSS {r['hwm'] / GiB:.2f} GiB = anon {r['anon'] / GiB:.2f} "
                  f"+ file-backed {r['file'] / GiB:.2f} (target < 2 GB on the total: "
                  f"{'met' if r['hwm'] < 2e9 else 'NOT met'}); load avg {r['load']:.1f}")
        print("ratio export/raw write (targets: F16 <= 2x, Q8_0 <= 3x, issue 18): " + ", ".join(
            f"{r['type']} {r['ratio']:.2f}x ({'met' if r['ratio'] <= TARGETS.get(r['type'], 2) else 'NOT met'})"
            for r in results))
    finally:
        if args.work:
            shutil.rmtree(work / "out", ignore_errors=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
