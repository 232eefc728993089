"""What a lowrank command printed on stderr, as the fault and bad-input tests read it; a command killed on cue."""

from __future__ import annotations

import subprocess
import sys


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


def launch_two_processes(work_dir, argv: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    """``lowrank argv`` under ``accelerate launch`` with 2 CPU processes (DDP over gloo); asserts it exited 0."""
    import os

    script = work_dir / "lowrank_main.py"
    script.write_text("import sys\nfrom lowrank.cli import main\nsys.exit(main())\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", "--main_process_port", "0", str(script),
           *argv]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done
