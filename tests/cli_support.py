"""What a lowrank command printed on stderr, as the fault and bad-input tests read it; a command killed on cue;
a command under a two-process `accelerate launch`, and what each process's optimizer steps did; a model dir
that says it was saved quantized."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path


def command_lines(err: str, command: str) -> list[str]:
    """The lines ``lowrank <command>: ...`` of ``err`` (log lines and progress bars left out).

    There must be no traceback, and the last line of ``err`` must be one of them.
    """
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith(f"lowrank {command}: "), err
    return [line for line in lines if line.startswith(f"lowrank {command}:")]


def run_killed(patch: str, argv: list[str]) -> subprocess.CompletedProcess:
    """``lowrank argv`` in a child that SIGKILLs itself where ``patch`` (Python source calling ``die()``) says."""
    code = ("import os, signal, sys\nfrom pathlib import Path\n"
            "def die():\n    os.kill(os.getpid(), signal.SIGKILL)\n"
            f"{patch}\nfrom lowrank.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]
    return result


# Kills the run while it writes its ``n``-th checkpoint (after some of the files, before the step is complete).
KILL_IN_CHECKPOINT = ("import torch\nfrom lowrank import train\nreal = torch.save\ncount = [0]\n"
                      "def save(obj, path, *a, **k):\n    if Path(path).name == 'state.pt':\n        count[0] += 1\n"
                      "        if count[0] == {n}:\n            die()\n    return real(obj, path, *a, **k)\n"
                      "train.torch.save = save\n")


def launch_two_processes(work_dir, argv: list[str], timeout: int = 240, *, record: bool = False,
                         config_file=None, expect_code: int = 0, patch: str = "") -> subprocess.CompletedProcess:
    """``lowrank argv`` under ``accelerate launch`` with 2 CPU processes (DDP over gloo); asserts it exited
    ``expect_code``.

    With ``record`` each process records its optimizer steps (:func:`record_steps`) in
    ``work_dir/rank0.pt`` and ``work_dir/rank1.pt``; :func:`recorded` reads them. With ``config_file`` (an
    accelerate config such as recipes/accelerate/fsdp-qlora.yaml) the launch reads it instead of the DDP
    flags; an FSDP config then runs FSDP on the CPU processes (:func:`fsdp_on_cpu`). ``patch`` (Python source)
    runs in each process before lowrank does.
    """
    import os

    script = work_dir / "lowrank_main.py"
    support = f"import os\nsys.path.insert(0, {str(Path(__file__).parent)!r})\nimport cli_support\n"
    recording = f"cli_support.record_steps({str(work_dir)!r} + f\"/rank{{os.environ['RANK']}}.pt\")\n" if record else ""
    fsdp = "cli_support.fsdp_on_cpu()\n" if config_file else ""
    script.write_text(f"import sys\n{support}{recording}{fsdp}{patch}\nfrom lowrank.cli import main\nsys.exit(main())\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    how = ["--config_file", str(config_file)] if config_file else ["--mixed_precision", "no", "--multi_gpu"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", "2", "--num_machines", "1",
           "--dynamo_backend", "no", "--main_process_port", "0", str(script), *argv]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == expect_code, done.stderr[-3000:]
    return done


def fsdp_on_cpu() -> None:
    """Make accelerate run an FSDP config on CPU processes, as it does on GPUs.

    accelerate (1.16) picks FSDP only for GPU-like devices: on the CPU an FSDP config becomes DDP over
    gloo (lowrank then refuses it). torch's FSDP2 (``fully_shard``) itself runs on the CPU over gloo, so the
    test turns the CPU state into an FSDP one, with the plugin accelerate builds from the launch's
    environment, and everything after (``prepare`` sharding the model, the optimizer, state dicts) is
    accelerate's own FSDP2 path.
    """
    import os

    from accelerate import state
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    init = state.AcceleratorState.__init__

    def init_with_fsdp(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    state.AcceleratorState.__init__ = init_with_fsdp


# --- several processes that train as one ---------------------------------------------------------
#
# Every stage ends each optimizer step in lowrank.train.optimizer_step(accelerator, params, ...) with
# the gradients of its trainable parameters already averaged over the processes, and PPO and GRPO
# sample their rollouts with the name ``sample`` that lowrank.ppo_step and lowrank.grpo_step import
# from lowrank.rollout. Wrapping those three names lets a test read, from outside, what each process
# of a run did, and lets a one-process run be fed the rollouts that two processes sampled.

def record_steps(path, setattr=setattr, replay: list | None = None) -> None:
    """Record in ``path`` the gradients of every optimizer step of this process's lowrank run, its trainable
    weights after the last, and the rows of every rollout it sampled (rewritten after each step).

    The record: ``{"grads": [[tensor or None, ...] per step], "weights": [tensor, ...], "samples": [[row, ...]
    per sampling call]}``, parameters in the order the stage passes them to the optimizer. ``setattr``
    installs the wrappers (pytest's ``monkeypatch.setattr`` in a test's own process). With ``replay`` (the
    records of the processes of another run) no rollout is sampled: sampling call k returns, for each prompt
    asked, a row that one of those processes sampled in its call k for the same prompt.
    """
    import torch

    from lowrank import grpo_step, ppo_step, train

    record = {"grads": [], "weights": [], "samples": []}
    optimizer_step = train.optimizer_step
    sample = _replayed_sampler(replay) if replay is not None else ppo_step.sample

    def recorded_step(accelerator, params, *args, **kwargs):
        params = list(params)
        record["grads"].append([None if p.grad is None else p.grad.detach().clone() for p in params])
        norm = optimizer_step(accelerator, params, *args, **kwargs)
        record["weights"] = [p.detach().clone() for p in params]
        torch.save(record, path)
        return norm

    def recorded_sample(model, prompt_ids, **kwargs):
        samples = sample(model, prompt_ids, **kwargs)
        record["samples"].append([
            {"prompt": q[m.bool()].tolist(), "response": r.tolist(), "mask": k.tolist(), "ended": bool(e)}
            for q, m, r, k, e in zip(samples.queries, samples.query_mask, samples.responses, samples.mask,
                                     samples.ended)])
        return samples

    setattr(train, "optimizer_step", recorded_step)
    setattr(ppo_step, "sample", recorded_sample)
    setattr(grpo_step, "sample", recorded_sample)


def _replayed_sampler(records: list[dict]):
    """A stand-in for lowrank.rollout.sample that returns the rows the processes of ``records`` sampled."""
    import torch

    from lowrank.data import left_pad
    from lowrank.rollout import Samples

    calls = iter(range(len(records[0]["samples"])))

    def replayed(model, prompt_ids, *, pad_id, device, **_):
        call = next(calls)
        pool = [row for r in records for row in r["samples"][call]]
        rows = [pool.pop(next(i for i, row in enumerate(pool) if row["prompt"] == list(ids))) for ids in prompt_ids]
        queries, query_mask = left_pad([row["prompt"] for row in rows], pad_id)
        width = max(len(row["response"]) for row in rows)
        responses = torch.tensor([row["response"] + [pad_id] * (width - len(row["response"])) for row in rows])
        mask = torch.tensor([row["mask"] + [0] * (width - len(row["mask"])) for row in rows])
        return Samples(queries.to(device), query_mask.to(device), responses.to(device), mask.to(device),
                       torch.tensor([row["ended"] for row in rows], device=device))

    return replayed


def recorded(work_dir) -> list[dict]:
    """The records of both processes of a ``launch_two_processes(work_dir, ..., record=True)`` run."""
    import torch

    return [torch.load(work_dir / f"rank{rank}.pt") for rank in (0, 1)]


def run_one_process(monkeypatch, work_dir, argv: list[str], replay: list | None = None) -> dict:
    """``lowrank argv`` in this process with its optimizer steps recorded (:func:`record_steps`); the record."""
    import torch

    from lowrank.cli import main

    path = work_dir / "one.pt"
    record_steps(path, monkeypatch.setattr, replay)
    assert main(argv) == 0
    return torch.load(path)


def assert_trained_as_one(ranks: list[dict], one: dict, *, rtol: float = 1e-4,
                          weights_atol: float = 1e-4) -> None:
    """Every optimizer step's gradients, and the weights after the last, are the same in each process (the
    gradients were averaged before the step) and match those of ``one``, one process that trained on the
    union of their batches.

    The processes must agree exactly. ``one`` adds its micro-batches in another order, and PPO's and GRPO's
    rollouts are padded to other widths there, which rounds differently: each gradient tensor may differ from
    ``one``'s by ``rtol`` times its largest element (measured in fp32: 0 for SFT, reward and DPO, whose sums
    happen to round alike; 7e-6 for PPO, and as much between two one-process runs padded differently), and
    the weights by ``weights_atol`` (a tenth of one AdamW step at learning rate 1e-3; measured: 3e-6).
    """
    import torch

    first, second = ranks
    assert first["grads"] and len(first["grads"]) == len(second["grads"])
    assert any(x is not None and x.any() for x in first["grads"][0]), "no gradient at all: nothing to compare"
    for step, (a, b) in enumerate(zip(first["grads"], second["grads"]), 1):
        assert all((x is None) == (y is None) and (x is None or torch.equal(x, y)) for x, y in zip(a, b)), \
            f"optimizer step {step}: the processes stepped with different gradients (not averaged)"
    assert all(torch.equal(x, y) for x, y in zip(first["weights"], second["weights"])), "the processes' weights differ"
    assert len(one["grads"]) == len(first["grads"])
    for step, (a, b) in enumerate(zip(first["grads"], one["grads"]), 1):
        assert [x is None for x in a] == [y is None for y in b], step
        worst = max(((x - y).abs().max() / y.abs().max().clamp(min=1e-30)).item() for x, y in zip(a, b)
                    if x is not None)
        assert worst <= rtol, f"optimizer step {step}: a gradient differs by {worst:.3g} of its largest element"
    worst = max((x - y).abs().max().item() for x, y in zip(first["weights"], one["weights"]))
    assert worst <= weights_atol, f"the weights differ by up to {worst:.3g}"


def quantized_copy(model_dir: Path, out: Path, **quantization_config) -> Path:
    """A copy of ``model_dir`` at ``out`` whose config.json says it was saved quantized (``quantization_config``),
    as a published bitsandbytes checkpoint's does; the weights stay as they are."""
    shutil.copytree(model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config))
    return out
