"""The command line: every failure is one line `error: ...`, never a traceback (SOCSEG_DEBUG=1 shows it)."""

from click.testing import CliRunner

from socseg.cli import main


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
    (tmp_path / "params.yaml").write_text("data: {dir: nowhere, volumes: [mine], phase_map: {0: pore, 128: ysz, 255: ni}}\n"
                                          "train: {task: ni}\nsplit: {train: 0.6, val: 0.2, test: 0.2, gap: 1}\n"
                                          "normalise: {low_percentile: 0.5, high_percentile: 99.5}\n")
    result = CliRunner().invoke(main, ["prepare", "--out", str(tmp_path / "p.json")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "nowhere/mine" in result.stderr and "no volume.json" in result.stderr
