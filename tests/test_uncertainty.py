"""Ranking slices by the model's uncertainty (the store `socseg segment ... --probabilities` writes)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from socseg.analysis.uncertainty import rank_slices
from socseg.cli import main
from socseg.data.chunked import ChunkedLabels
from socseg.data.volumes import VolumeError

SHAPE = (6, 8, 10)


def _store(path, probabilities: bool = True, finish: bool = True) -> ChunkedLabels:
    store = ChunkedLabels.create_or_resume(path, SHAPE, 2, run={"r": 1}, metadata={}, n_classes=3 if probabilities else 0)
    sure = np.zeros((*SHAPE, 3), np.float32)
    sure[..., 0] = 1.0
    sure[4] = 1 / 3  # slice 4: every class equally likely
    sure[1, :4] = [0.5, 0.5, 0.0]  # slice 1: half its pixels torn between two classes
    for index in range(store.n_chunks if finish else store.n_chunks - 1):
        start, stop = store.chunk(index)
        store.write(index, np.zeros((stop - start, *SHAPE[1:]), np.uint8), sure[start:stop] if probabilities else None)
    return store


def test_slices_come_most_uncertain_first(tmp_path):
    _store(tmp_path / "s.zarr")
    ranked = rank_slices(tmp_path / "s.zarr")
    assert [s.z for s in ranked[:2]] == [4, 1]
    assert ranked[0].mean == pytest.approx(1.0, abs=0.01) and ranked[0].uncertain_fraction == 1.0
    assert ranked[1].mean == pytest.approx(0.5 * np.log(2) / np.log(3), abs=0.01)
    assert ranked[1].uncertain_fraction == pytest.approx(0.5)
    assert all(s.mean == 0.0 for s in ranked[2:]) and sorted(s.z for s in ranked) == list(range(SHAPE[0]))
    out = CliRunner().invoke(main, ["suggest-slices", str(tmp_path / "s.zarr"), "--top", "2", "--json"])
    assert out.exit_code == 0 and [s["z"] for s in json.loads(out.output)] == [4, 1]


def test_a_store_without_uncertainty_or_unfinished_is_refused(tmp_path):
    _store(tmp_path / "plain.zarr", probabilities=False)
    with pytest.raises(VolumeError, match="no uncertainty: segment with --probabilities"):
        rank_slices(tmp_path / "plain.zarr")
    _store(tmp_path / "half.zarr", finish=False)
    with pytest.raises(VolumeError, match=r"not finished \(chunks \[2\] missing\)"):
        rank_slices(tmp_path / "half.zarr")
    out = CliRunner().invoke(main, ["suggest-slices", str(tmp_path / "plain.zarr")])
    assert out.exit_code == 2 and out.stderr.startswith("error: ")
