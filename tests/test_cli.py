"""The command line: every failure is one line `error: ...`, never a traceback (SOCSEG_DEBUG=1 shows it)."""

from pathlib import Path

import yaml
from click.testing import CliRunner

from socseg.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_a_failing_command_prints_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("SOCSEG_DEBUG", raising=False)
    result = CliRunner().invoke(main, ["register", "--search", str(tmp_path / "missing.json"),
                                       "--metrics", str(tmp_path / "m.json"), "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing.json" in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "r.json").exists()


def test_debug_shows_the_exception(tmp_path, monkeypatch):
    monkeypatch.setenv("SOCSEG_DEBUG", "1")
    result = CliRunner().invoke(main, ["register", "--search", str(tmp_path / "missing.json")])
    assert isinstance(result.exception, FileNotFoundError)


def test_volume_missing_is_one_line(tmp_path, monkeypatch):
    """The failure the issue saw on a fresh clone: a configured volume that is not there."""
    monkeypatch.delenv("SOCSEG_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(dir="nowhere", volumes=["mine"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(main, ["prepare", "--out", str(tmp_path / "p.json")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "nowhere/mine" in result.stderr and "no volume.json" in result.stderr


def test_a_params_file_that_does_not_fit_the_schema_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("SOCSEG_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["learning_rte"] = 0.01  # a typo must not silently leave the default in force
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(main, ["prepare", "--out", str(tmp_path / "p.json")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "params.train: unknown key(s) learning_rte" in result.stderr
    assert not (tmp_path / "p.json").exists()
