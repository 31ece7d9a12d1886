"""The project's own files agree with each other: pins, params, MLproject, CLI."""

import re
import tomllib

import yaml


def _pins(lines):
    pins = {}
    for line in lines:
        match = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==(\S+)", line.strip())
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def test_conda_yaml_lists_the_same_pins_as_pyproject(repo_root):
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    declared = _pins(project["dependencies"] + project["optional-dependencies"]["test"])
    conda = yaml.safe_load((repo_root / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert _pins(pip_section) == declared
    assert "python=3.11.7" in conda["dependencies"]
    for required in ("tensorflow-cpu", "keras", "mlflow", "optuna", "dvc", "tifffile", "numpy", "pandas", "pytest"):
        assert required in declared, required


def test_packaged_default_params_are_the_repository_params(repo_root):
    from importlib import resources

    packaged = resources.files("socseg").joinpath("defaults/params.yaml").read_text()
    assert packaged == (repo_root / "params.yaml").read_text()


def test_mlproject_train_parameters_are_all_passed_to_the_cli(repo_root):
    from click.testing import CliRunner

    from socseg.cli import main

    project = yaml.safe_load((repo_root / "MLproject").read_text())
    assert project["conda_env"] == "conda.yaml"
    train = project["entry_points"]["train"]
    help_text = CliRunner().invoke(main, ["train", "--help"]).output
    for name in train["parameters"]:
        assert "{" + name + "}" in train["command"], name
        assert "--" + name.replace("_", "-") in help_text, name


def test_required_top_level_layout(repo_root):
    for name in ("MLproject", "conda.yaml", "dvc.yaml", "src", "data.dvc", "tests", "README.md", "serving",
                 "pyproject.toml", "params.yaml", ".ci/run"):
        assert (repo_root / name).exists(), name
