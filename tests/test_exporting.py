"""lowrank.exporting: the export stage as a library call that returns what it wrote and measured, and prints nothing."""

from __future__ import annotations

from lowrank.export.gguf import ExportConfig
from lowrank.exporting import export_model


def test_export_model_returns_files_fits_and_passing_reports_without_printing(tiny_bpe, tmp_path, capsys):
    events, written_seen, reported = [], [], []
    config = ExportConfig(type=["f16", "q8_0"], out=str(tmp_path), name="m", fit="4GiB")
    result = export_model(config, tiny_bpe, on_tensor=events.append,
                          on_written=lambda r: written_seen.append((list(r.written), list(r.reports))),
                          on_report=reported.append)
    assert capsys.readouterr().out == ""
    assert [p.name for p in result.paths] == ["m-f16.gguf", "m-q8_0.gguf"] and all(p.exists() for p in result.paths)
    assert result.written == result.paths  # no base or LoRA files without adapters
    assert [p.name for p in result.modelfiles] == ["m-f16.Modelfile", "m-q8_0.Modelfile"]
    assert all(p.exists() for p in result.modelfiles)
    assert [f.path for f in result.fits] == [str(p) for p in result.paths]
    assert result.fits[0].file_bytes > result.fits[1].file_bytes > 0
    assert result.budget == 4 * 1024**3
    # The files are announced before verification starts, then each report as it comes.
    assert written_seen == [(result.paths, [])]
    assert reported == result.reports and len(result.reports) == 2
    assert result.passed and all(r.passed for r in result.reports), [r.problems for r in result.reports]
    assert {e["file"] for e in events} and all(e["total"] > 0 for e in events)


def test_export_model_with_lora_checks_base_plus_adapter_against_the_merged_file(tiny_spm, tmp_path, capsys):
    from test_lora_gguf import make_adapter

    adapter = make_adapter(tiny_spm, tmp_path / "adapter", seed=5)
    config = ExportConfig(type=["f16"], out=str(tmp_path / "out"), name="m", lora=True)
    result = export_model(config, tiny_spm, [str(adapter)], base_name="base")
    assert capsys.readouterr().out == ""
    assert [p.name for p in result.written] == ["m-f16.gguf", "base-f16.gguf", "m-lora.gguf"]
    assert all(p.exists() for p in result.written)
    assert "m-lora.Modelfile" in [p.name for p in result.modelfiles]
    merged_report, base_report = result.reports
    assert merged_report.lora_max_diff is not None and merged_report.lora_max_diff < merged_report.lora_tolerance
    assert result.passed and base_report.passed and not result.lora_check_skipped
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".merged-")]  # temp merge removed


def test_export_model_lora_only_writes_only_the_adapter_and_verifies_nothing(tiny_spm, tmp_path, capsys):
    from test_lora_gguf import make_adapter

    adapter = make_adapter(tiny_spm, tmp_path / "adapter", seed=5)
    result = export_model(ExportConfig(out=str(tmp_path / "out"), lora_only=True), tiny_spm, [str(adapter)])
    assert capsys.readouterr().out == ""
    assert [p.name for p in result.written] == ["adapter-lora.gguf"] and result.lora_paths[0].exists()
    assert result.reports == [] and result.passed
