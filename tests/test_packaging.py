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
    extras = project["optional-dependencies"]
    declared = _pins(project["dependencies"] + extras["test"])
    conda = yaml.safe_load((repo_root / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    # conda.yaml is the `mlflow run .` environment: pyproject's pins with the GPU extra folded in.
    gpu = _pins(extras["gpu"])
    assert gpu == {"tensorflow[and-cuda]": declared["tensorflow"]}
    expected = {k: v for k, v in declared.items() if k != "tensorflow"} | gpu
    assert _pins(pip_section) == expected
    assert "python=3.11.7" in conda["dependencies"]
    for required in ("tensorflow", "keras", "mlflow", "optuna", "dvc", "tifffile", "numpy", "pandas", "pytest"):
        assert required in declared, required
    assert "tensorflow-cpu" not in declared  # the CPU-only build could never use a GPU


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


def test_setup_script_adds_the_gpu_extra_only_where_a_gpu_answers(repo_root, tmp_path):
    """setup_env.sh with a fake `nvidia-smi` on PATH: GPU -> socseg[test,gpu]; none -> socseg[test]."""
    import os
    import subprocess

    script = (repo_root / "scripts" / "setup_env.sh").read_text()
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    # Run only the detection part: everything before the pip install line, then print the extras.
    detection = script[script.index("extras=test"):script.index(".venv/bin/python -m pip install --quiet -e")]
    for listing, expected in (("GPU 0: NVIDIA H200 (UUID: GPU-1)", "test,gpu"), ("", "test")):
        smi = fake_bin / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\necho '{listing}'\n")
        smi.chmod(0o755)
        env = {**os.environ, "PATH": f"{fake_bin}:/usr/bin:/bin"}
        env.pop("SOCSEG_GPU", None)
        done = subprocess.run(["bash", "-c", detection + 'echo "$extras"'], env=env, capture_output=True, text=True)
        assert done.stdout.strip() == expected, done.stderr
