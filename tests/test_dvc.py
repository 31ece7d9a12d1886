"""A real DVC round trip of a stored volume: add, push to a local remote, wipe, pull, compare bytes.

Also checks what the storage format promises DVC: writing the same volume again changes no hash.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from socseg.data.synth import synth_from_params
from socseg.data.volumes import save_volume

pytestmark = pytest.mark.slow


def run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def digests(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_dvc_push_pull_roundtrip(tmp_path, params):
    repo, remote = tmp_path / "repo", tmp_path / "remote"
    repo.mkdir()
    env = dict(os.environ)
    env.update(
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(tmp_path / "site-cache"),
        DVC_GLOBAL_CONFIG_DIR=str(tmp_path / "dvc-global"),
        GIT_CONFIG_GLOBAL=str(tmp_path / "gitconfig"),
        GIT_AUTHOR_NAME="socseg test",
        GIT_AUTHOR_EMAIL="test@example.invalid",
        GIT_COMMITTER_NAME="socseg test",
        GIT_COMMITTER_EMAIL="test@example.invalid",
    )
    dvc = [sys.executable, "-m", "dvc"]

    def make_sample(overwrite: bool = False) -> None:
        volume = synth_from_params(params, "sample", shape=(6, 48, 48), seed=0)
        save_volume(volume, repo / "data" / "sample", overwrite=overwrite)

    run(["git", "init", "-q"], repo, env)
    run(dvc + ["init", "-q"], repo, env)
    make_sample()
    before = digests(repo / "data")
    assert set(before) == {"sample/image.tif", "sample/labels.tif", "sample/volume.json"}

    run(dvc + ["add", "data"], repo, env)
    run(dvc + ["remote", "add", "-d", "store", str(remote)], repo, env)
    run(dvc + ["push"], repo, env)
    assert any(p.is_file() for p in remote.rglob("*"))

    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    run(dvc + ["pull"], repo, env)
    assert digests(repo / "data") == before

    # deterministic bytes: regenerating the same volume is not a change for DVC
    make_sample(overwrite=True)
    assert digests(repo / "data") == before
    status = run(dvc + ["status", "data.dvc"], repo, env)
    assert "up to date" in status, status
