"""One writer per output dir: while another process holds a dir, sft, merge, export and run refuse it in
one line naming that process; a lock left by a killed process is free again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowrank.cli import main

from adapter_support import make_adapter


@pytest.fixture
def holder():
    """Start a separate process that takes the lock of a dir and waits; yields a function dir -> process."""
    started = []

    def hold(out_dir: Path) -> subprocess.Popen:
        code = ("import sys, time\nfrom lowrank import locks\nlocks.hold(sys.argv[1])\nprint('held', flush=True)\n"
                "time.sleep(600)\n")
        process = subprocess.Popen([sys.executable, "-c", code, str(out_dir)], stdout=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout.readline().strip() == "held"
        return process

    yield hold
    for process in started:
        process.kill()
        process.wait()


def _refused(capsys, code: int, out_dir: Path, process: subprocess.Popen, command: str) -> None:
    err = capsys.readouterr().err
    errors = [line for line in err.strip().splitlines() if " INFO " not in line and " WARNING " not in line]
    assert code == 2 and errors == [f"lowrank {command}: error: {out_dir} is in use by another lowrank process "
                                    f"(pid {process.pid}); wait for it to finish or choose another output dir"], err


def test_sft_refuses_a_dir_another_process_writes(tiny_spm, tmp_path, capsys, holder):
    out = tmp_path / "sft"
    process = holder(out)
    capsys.readouterr()
    code = main(["sft", "--model", str(tiny_spm), "--output-dir", str(out), "--max-steps", "1", "--quant", "none"])
    _refused(capsys, code, out, process, "sft")
    assert not out.exists()


def test_merge_refuses_a_dir_another_process_writes(tiny_spm, tmp_path, capsys, holder):
    adapter = make_adapter(tiny_spm, tmp_path / "adapter", seed=1)
    out = tmp_path / "merged"
    process = holder(out)
    capsys.readouterr()
    code = main(["merge", "--base", str(tiny_spm), "--adapter", str(adapter), "--out", str(out)])
    _refused(capsys, code, out, process, "merge")
    assert not out.exists() and not list(tmp_path.glob(".merged.tmp-*"))


def test_export_refuses_a_dir_another_process_writes(tiny_bpe, tmp_path, capsys, holder):
    out = tmp_path / "gguf"
    process = holder(out)
    capsys.readouterr()
    code = main(["export", str(tiny_bpe), "--type", "q8_0", "--out", str(out), "--no-verify", "--name", "m"])
    _refused(capsys, code, out, process, "export")
    assert not out.exists()


def test_run_refuses_a_dir_another_process_writes(tmp_path, capsys, holder):
    out = tmp_path / "run"
    process = holder(out)
    capsys.readouterr()
    code = main(["run", "--model", "tiny", "--output-dir", str(out), "--quick"])
    _refused(capsys, code, out, process, "run")
    assert not (out / "pipeline.json").exists()


def test_a_killed_holder_leaves_no_lock_behind(tiny_spm, tmp_path, capsys, holder):
    from lowrank import locks

    out = tmp_path / "merged"
    process = holder(out)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    locks.hold(out)  # taken over at once: the operating system dropped the dead process's lock
    assert locks.lock_path(out).with_name(locks.lock_path(out).name + ".pid").read_text().strip() == str(os.getpid())
    locks.release(out)


def test_the_holder_releases_its_lock_when_the_command_ends(tiny_spm, tmp_path, capsys):
    adapter = make_adapter(tiny_spm, tmp_path / "adapter", seed=1)
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(tiny_spm), "--adapter", str(adapter), "--out", str(out)]) == 0
    probe = subprocess.run([sys.executable, "-c", "import sys\nfrom lowrank import locks\nlocks.hold(sys.argv[1])",
                            str(out)], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert json.loads((out / "lowrank.json").read_text())["stage"] == "merge"
