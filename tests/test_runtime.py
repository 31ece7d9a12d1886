"""Precision chosen from the hardware (train.precision: auto), and the tags every run carries."""

import pytest

from socseg.training.runtime import resolve_precision, runs_eagerly, runtime_tags


@pytest.mark.parametrize(
    "flags, gpu_bf16, expected",
    [
        ({"avx2", "avx512f"}, None, "float32"),               # AVX-512 without bf16: emulated bf16 is slower
        ({"avx2"}, None, "float32"),
        ({"avx512f", "avx512_bf16"}, None, "mixed_bfloat16"),
        ({"amx_bf16", "amx_tile"}, None, "mixed_bfloat16"),
        ({"avx2"}, True, "mixed_bfloat16"),                   # an Ampere/Hopper GPU decides, not the CPU
        ({"avx512_bf16"}, False, "float32"),                  # an older GPU: float32 there
    ],
)
def test_auto_precision_follows_the_hardware(flags, gpu_bf16, expected, monkeypatch):
    if gpu_bf16 is None:  # no GPU on this machine, whatever the test machine has
        monkeypatch.setattr("socseg.training.runtime.gpu_supports_bf16", lambda: None)
    assert resolve_precision("auto", flags=flags, gpu_bf16=gpu_bf16) == expected


def test_explicit_precision_is_kept_and_unknown_is_refused():
    assert resolve_precision("float32", flags={"amx_bf16"}) == "float32"
    assert resolve_precision("mixed_bfloat16", flags=set()) == "mixed_bfloat16"
    with pytest.raises(ValueError, match="auto, float32"):
        resolve_precision("bf16")


def test_run_tags_name_the_resolved_precision(monkeypatch):
    monkeypatch.setattr("socseg.training.runtime.resolve_precision", lambda p: "float32" if p == "auto" else p)
    assert runtime_tags("auto")["precision"] == "float32"


def test_short_trainings_run_eagerly_long_ones_as_a_graph():
    assert runs_eagerly(1, 2, 32) and runs_eagerly(4, 8, 32)
    assert not runs_eagerly(3, 11, 32)  # 33 steps: tracing pays off
    assert not runs_eagerly(1, 2, 0)  # 0: always a graph
    assert runtime_tags("float32", eager=True)["execution"] == "eager"
    assert runtime_tags("float32", eager=False)["execution"] == "graph"
    assert "execution" not in runtime_tags("float32")  # a run that does not train (a search's parent run)
