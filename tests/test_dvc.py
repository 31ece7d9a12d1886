"""A real DVC round trip of a stored volume: add, push to a local remote, wipe, pull, compare bytes;
and the lab's way: push from one clone, pull in a fresh clone, `dvc repro` there, a corrupted cache
file detected and fetched again.

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


def isolated_env(tmp_path: Path) -> dict[str, str]:
    """DVC and git with configs and caches of their own (nothing of the user's or the machine's)."""
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
    return env


DVC = [sys.executable, "-m", "dvc"]


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_dvc_push_pull_roundtrip(tmp_path, params):
    repo, remote = tmp_path / "repo", tmp_path / "remote"
    repo.mkdir()
    env = isolated_env(tmp_path)
    dvc = DVC

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


STATS_STAGE = """stages:
  grey_range:
    cmd: python -m socseg.cli stats data/sample/image.tif --percentiles 0.5,99.5 > grey_range.json
    deps:
    - data/sample
    outs:
    - grey_range.json:
        cache: false
"""


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_a_fresh_clone_pulls_the_pushed_data_bit_for_bit_runs_repro_on_it_and_refetches_a_corrupt_cache(
        tmp_path, params):
    """What a lab does with a shared remote: one member pushes, another clones, pulls and reproduces."""
    first, fresh, remote = tmp_path / "first", tmp_path / "fresh", tmp_path / "lab-remote"
    first.mkdir()
    env = isolated_env(tmp_path)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the stage's `python`
    run(["git", "init", "-q"], first, env)
    run(DVC + ["init", "-q"], first, env)
    save_volume(synth_from_params(params, "sample", shape=(6, 48, 48), seed=3), first / "data" / "sample")
    (first / "dvc.yaml").write_text(STATS_STAGE)
    run(DVC + ["add", "data"], first, env)
    run(DVC + ["remote", "add", "-d", "lab", str(remote)], first, env)
    run(DVC + ["repro"], first, env)
    run(["git", "add", "-A"], first, env)
    run(["git", "commit", "-qm", "data and pipeline"], first, env)
    run(DVC + ["push"], first, env)

    run(["git", "clone", "-q", str(first), str(fresh)], tmp_path, env)
    assert not (fresh / "data").exists()  # git carries data.dvc, not the data
    run(DVC + ["pull"], fresh, env)
    assert digests(fresh / "data") == digests(first / "data")
    run(DVC + ["repro", "--force"], fresh, env)  # the pulled volume is the stage's input
    assert (fresh / "grey_range.json").read_text() == (first / "grey_range.json").read_text()
    assert "up to date" in run(DVC + ["status"], fresh, env)

    cached = sorted(p for p in (fresh / ".dvc" / "cache").rglob("*") if p.is_file() and not p.name.endswith(".dir"))
    victim = max(cached, key=lambda p: p.stat().st_size)  # the image stack
    victim.chmod(0o644)
    victim.write_bytes(b"corrupted")
    shutil.rmtree(fresh / "data")
    pulled = run(DVC + ["pull"], fresh, env)
    assert "1 file fetched" in pulled, pulled  # the corrupt object was detected and fetched again
    assert digests(fresh / "data") == digests(first / "data")
