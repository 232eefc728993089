"""What a lowrank command printed on stderr, as the fault and bad-input tests read it."""

from __future__ import annotations


def command_lines(err: str, command: str) -> list[str]:
    """The lines ``lowrank <command>: ...`` of ``err`` (log lines and progress bars left out).

    There must be no traceback, and the last line of ``err`` must be one of them.
    """
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith(f"lowrank {command}: "), err
    return [line for line in lines if line.startswith(f"lowrank {command}:")]
