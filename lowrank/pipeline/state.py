"""What `lowrank run` knows of an output dir between runs: which stage outputs are finished (each
stage's own marker), the settings each ran with (pipeline.json), and so which stages a run skips,
evaluates only or runs again (``decide``), and whether an interrupted one resumes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lowrank import runrecord
from lowrank.errors import UserError
from lowrank.pipeline import STATE_FILE, VERIFY_FILE, Stage


def gguf_paths(export_config) -> list[Path]:
    """The files the export stage writes (lowrank.export.gguf names them <name>-<type>.gguf)."""
    from lowrank.export.gguf import parse_types

    return [Path(export_config.out) / f"{export_config.name}-{t.name}.gguf" for t in parse_types(export_config.type)]


def output_finished(stage: Stage) -> bool:
    """Whether the stage's own marker of a finished output is there (each is written last, by rename)."""
    if stage.name == "task":
        from lowrank.tasks import MARKER

        return (stage.dir / MARKER).is_file()
    if stage.name == "export":
        return all(p.is_file() for p in gguf_paths(stage.config))
    if stage.name == "verify":
        return (stage.dir / VERIFY_FILE).is_file()
    return runrecord.exists(stage.dir)


def settings(stage: Stage) -> dict:
    """What a stage's result depends on, as recorded in pipeline.json (JSON-normalised)."""
    from lowrank.config import config_to_dict

    values = {k: v for k, v in config_to_dict(stage.config).items() if k not in ("overwrite", "resume")}
    values.update({f"evaluates_{k}": v for k, v in stage.evaluates.items()})
    return json.loads(json.dumps(values, default=str))


def read_state(out: Path) -> dict:
    path = out / STATE_FILE
    if not path.is_file():
        return {"stages": {}}
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable ({e}); remove it and run with --overwrite") from None
    if not isinstance(state, dict) or not isinstance(state.get("stages"), dict):
        raise UserError(f"{path}: not a pipeline record; remove it and run with --overwrite")
    return state


def write_state(out: Path, state: dict) -> None:
    write_json(out / STATE_FILE, state)


def decide(stages: list[Stage], state: dict, overwrite: bool) -> list[str]:
    """Per stage: 'skip' (finished with today's settings), 'eval' (finished; only its task accuracy is
    missing) or 'run'. A finished stage whose settings changed is a UserError unless ``overwrite``."""
    actions: list[str] = []
    rerun = False
    for stage in stages:
        record = state["stages"].get(stage.name)
        finished = output_finished(stage)
        if rerun or not finished:
            actions.append("run")
            rerun = True
            continue
        if record is None or record.get("settings") != settings(stage):
            if not overwrite:
                raise UserError(_changed(stage, record))
            actions.append("run")
            rerun = True
            continue
        actions.append("eval" if stage.eval_file is not None and not stage.eval_file.is_file() else "skip")
    return actions


def _changed(stage: Stage, record: dict | None) -> str:
    if record is None:
        return (f"{stage.dir} holds a finished {stage.name} output that {STATE_FILE} does not record (another run's?); "
                "pass --overwrite to replace it and every later stage, or choose another --output-dir")
    old, new = record.get("settings", {}), settings(stage)
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
    return (f"{stage.dir}: the {stage.name} stage finished with other settings ({'; '.join(diffs[:3])}{more}); "
            f"pass --overwrite to run it again, and every stage after it, or choose another --output-dir")


def may_resume(stage: Stage, state: dict) -> bool:
    """An interrupted training run with today's settings continues from its newest checkpoint."""
    from lowrank.checkpoints import list_checkpoints

    record = state["stages"].get(stage.name) or {}
    return (hasattr(stage.config, "resume") and record.get("settings") == settings(stage)
            and bool(list_checkpoints(stage.dir)))


def clear_output(stage: Stage) -> None:
    """Remove a stage's markers before it runs, so that an interrupted rerun never looks finished."""
    import shutil

    from lowrank.tasks import MARKER

    if stage.name == "export":
        shutil.rmtree(stage.dir, ignore_errors=True)  # files of types no longer asked for go too
        return
    markers = {"task": MARKER, "verify": VERIFY_FILE}
    (stage.dir / markers.get(stage.name, runrecord.RECORD_FILE)).unlink(missing_ok=True)
    if stage.eval_file is not None:
        stage.eval_file.unlink(missing_ok=True)


def write_json(path: Path, value: dict) -> None:
    """``value`` as JSON at ``path``, written to a temporary name and renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(tmp, path)
