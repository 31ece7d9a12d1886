"""Precision chosen from the hardware (train.precision: auto), and the tags every run carries."""

import pytest

from socseg.model.precision import resolve_precision
from socseg.training.runtime import runs_eagerly, runtime_tags


@pytest.mark.parametrize(
    "flags, gpu_bf16, expected",
    [
        ({"avx2", "avx512f"}, None, "float32"),               # AVX-512 without bf16: emulated bf16 is slower
        ({"avx2"}, None, "float32"),
        ({"avx512f", "avx512_bf16"}, None, "measured"),       # bf16 without AMX: the probe decides
        ({"amx_bf16", "amx_tile"}, None, "mixed_bfloat16"),
        ({"avx2"}, True, "mixed_bfloat16"),                   # an Ampere/Hopper GPU decides, not the CPU
        ({"avx512_bf16"}, False, "float32"),                  # an older GPU: float32 there
    ],
)
def test_auto_precision_follows_the_hardware(flags, gpu_bf16, expected, monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    if gpu_bf16 is None:  # no GPU on this machine, whatever the test machine has
        monkeypatch.setattr("socseg.model.precision.gpu_supports_bf16", lambda: None)
    assert resolve_precision("auto", flags=flags, gpu_bf16=gpu_bf16, probe=lambda: "measured") == expected


@pytest.mark.parametrize(
    "cap, expected",
    [
        ("AVX2", "float32"),              # the stand-in for CPUs without AVX-512: no native bf16 there
        ("avx512_core", "float32"),       # AVX-512 without its bf16 extension
        ("AVX512_CORE_BF16", "measured"),  # bf16 units but AMX capped away: the probe decides
        ("AVX512_CORE_AMX", "mixed_bfloat16"),
        ("", "mixed_bfloat16"),           # set but empty: no cap
    ],
)
def test_a_onednn_isa_cap_below_bf16_makes_auto_choose_float32(cap, expected, monkeypatch):
    monkeypatch.setattr("socseg.model.precision.gpu_supports_bf16", lambda: None)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert resolve_precision("auto", flags={"avx512f", "avx512_bf16", "amx_bf16"}, probe=lambda: "measured") == expected


def test_explicit_precision_is_kept_and_unknown_is_refused():
    assert resolve_precision("float32", flags={"amx_bf16"}) == "float32"
    assert resolve_precision("mixed_bfloat16", flags=set()) == "mixed_bfloat16"
    with pytest.raises(ValueError, match="auto, float32"):
        resolve_precision("bf16")


@pytest.mark.parametrize(
    "cpu, gpu, expected",
    [
        ({"avx2", "avx512f"}, None, "float32"),
        ({"avx512_bf16", "amx_bf16"}, None, "mixed_bfloat16"),
        ({"avx512_bf16"}, None, "float32"),  # the (faked) probe found float32 the faster here
        ({"amx_bf16"}, (8, 0), "mixed_bfloat16"),
        ({"amx_bf16"}, (7, 5), "float32"),  # a Turing GPU trains, and it has no native bf16
        (set(), (9, 0), "mixed_bfloat16"),
    ],
)
def test_run_tags_name_the_precision_resolved_from_the_probed_hardware(cpu, gpu, expected, tmp_path, monkeypatch):
    """Only the probes' sources are faked (the cpuinfo file, TensorFlow's device list): the real
    cpu_flags, gpu_supports_bf16 and resolve_precision decide what the run tags say."""
    import tensorflow as tf

    from socseg.model import precision as runtime  # where the probes live; runtime_tags reads them

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: fpu sse2 {' '.join(sorted(cpu))}\n\n")
    real_flags = runtime.cpu_flags
    monkeypatch.setattr(runtime, "cpu_flags", lambda: real_flags(str(cpuinfo)))
    monkeypatch.setattr(runtime, "measured_cpu_precision", lambda: "float32")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    device = tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [device] if gpu and kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "get_device_details",
                        lambda d: {"compute_capability": gpu, "device_name": "fake GPU"})
    assert runtime.gpu_supports_bf16() is (None if gpu is None else gpu >= (8, 0))
    assert runtime_tags("auto")["precision"] == expected
    assert runtime_tags("float32")["precision"] == "float32"  # an explicit choice is never overridden


def test_cpu_flags_are_read_from_cpuinfo_and_a_missing_file_gives_none(tmp_path):
    from socseg.model.precision import cpu_flags

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 amx_bf16 amx_tile\nbugs\t\t: spectre_v1\n")
    assert cpu_flags(str(cpuinfo)) == {"fpu", "avx2", "amx_bf16", "amx_tile"}
    assert cpu_flags(str(tmp_path / "absent")) == set()
    (tmp_path / "no_flags").write_text("processor\t: 0\n")
    assert cpu_flags(str(tmp_path / "no_flags")) == set()  # no flags line: no bf16 claimed


def test_short_trainings_run_eagerly_long_ones_as_a_graph():
    assert runs_eagerly(1, 2, 32) and runs_eagerly(4, 8, 32)
    assert not runs_eagerly(3, 11, 32)  # 33 steps: tracing pays off
    assert not runs_eagerly(1, 2, 0)  # 0: always a graph
    assert runtime_tags("float32", eager=True)["execution"] == "eager"
    assert runtime_tags("float32", eager=False)["execution"] == "graph"
    assert "execution" not in runtime_tags("float32")  # a run that does not train (a search's parent run)
