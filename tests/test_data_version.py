"""data.dvc describes exactly the built-in sample volume, so a fresh clone can rebuild `data/` with synth."""

import os
import shutil
import subprocess
import sys

import pytest
import yaml


@pytest.mark.slow
def test_data_dvc_matches_the_synthesised_default_sample(repo_root, params, tmp_path):
    from socseg.data.synth import synth_from_params
    from socseg.data.volumes import save_volume

    expected = yaml.safe_load((repo_root / "data.dvc").read_text())["outs"][0]
    project = tmp_path / "project"
    project.mkdir()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=project, check=True, env=env)
    for name in params["data"]["volumes"]:
        save_volume(synth_from_params(params, name), project / "data" / name)
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "data"], cwd=project, check=True, env=env)
    actual = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]
    assert (actual["md5"], actual["nfiles"], actual["size"]) == (expected["md5"], expected["nfiles"], expected["size"])
    shutil.rmtree(project)
