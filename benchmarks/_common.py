"""What every benchmark records beside its figures: command, commit, hardware, software.

Shared by accuracy.py, search_real.py, serving_bench.py and scaleout_bench.py (imported as a
sibling module: the scripts are run as ``python benchmarks/<script>.py``). ``write_result`` writes
the JSON + Markdown pair of the benches that have no table writer of their own.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
ONEDNN_ISA_ENV = "ONEDNN_MAX_CPU_ISA"  # oneDNN (TensorFlow's CPU kernels) uses no instructions above this
PACKAGES = ("socseg", "keras", "tensorflow", "tensorflow-cpu", "jax", "mlflow", "mlflow-skinny", "optuna", "numpy",
            "scikit-learn", "psycopg2-binary", "SQLAlchemy")


def command_line(script: str | Path, argv: Sequence[str] | None = None) -> str:
    """``python benchmarks/<script> ARGS`` as it was typed (``argv`` default: this process's arguments)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return f"python benchmarks/{Path(script).name} {shlex.join(args)}".rstrip()


def git_commit() -> str:
    """Short commit of the checkout, or ``unknown`` outside git."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def git_dirty() -> bool | None:
    """Whether tracked files differ from the commit (the figures may then come from uncommitted code).

    Result files under ``benchmarks/results`` do not count: they are written by benchmarks, not run
    by them, and a chain of benchmarks would otherwise mark every run after the first as dirty."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                              ":(exclude)benchmarks/results"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.strip())


def cpu_info() -> dict[str, Any]:
    """CPU model, cores (all, and usable by this process), AVX-512 / bf16 / AMX flags, RAM."""
    info: dict[str, Any] = {"model": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        info["cores_usable"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["model"] = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")))
        info["flags"] = {flag: flag in flags for flag in CPU_FLAGS}
    except (OSError, StopIteration):
        pass
    try:
        kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))
        info["ram_gib"] = round(kib / 1024**2, 1)
    except (OSError, StopIteration, ValueError):
        pass
    return info


def cpu_class(flags: Mapping[str, bool], onednn_isa: str | None = None) -> str:
    """The CPU class a speed figure belongs to, from the CPU flags and any oneDNN ISA limit.

    Speed on CPUs differs most by vector width and native bf16: ``AVX-512 + AMX`` (Xeon since
    Sapphire Rapids), ``AVX-512 + bf16`` (e.g. AMD Zen 4), ``AVX-512``, ``AVX2`` (most laptops,
    desktops and AMD before Zen 4). ``ONEDNN_MAX_CPU_ISA=AVX2`` on an AVX-512 machine approximates
    the AVX2 class for TensorFlow's convolutions (numpy and scikit-learn are not limited by it).
    """
    isa = (onednn_isa or "").upper()
    if isa.startswith("AVX2") or isa in ("AVX", "SSE41"):
        native = cpu_class(flags)
        return f"AVX2 (oneDNN limited by {ONEDNN_ISA_ENV}={isa} on an {native} CPU)" if native != "AVX2" else "AVX2"
    if flags.get("amx_bf16") or flags.get("amx_tile"):
        return "AVX-512 + AMX"
    if flags.get("avx512_bf16"):
        return "AVX-512 + bf16"
    if flags.get("avx512f"):
        return "AVX-512"
    return "AVX2" if flags.get("avx2", True) else "pre-AVX2"


def machine_load() -> dict[str, Any]:
    """What else ran: the 1-minute load average and the other processes using CPU right now.

    Taken at the start and at the end of a benchmark, so that a reader can tell a quiet
    machine from a shared one (a load near the core count before we start means we shared it).
    """
    load: dict[str, Any] = {}
    try:
        load["loadavg_1min"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    try:
        out = subprocess.run(["ps", "-eo", "pid,ppid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True,
                             check=True, timeout=10).stdout.splitlines()[1:]
        mine = {os.getpid(), os.getppid()}
        busy = []
        for line in out:
            pid, ppid, pcpu, args = line.split(None, 3)
            if float(pcpu) < 10.0:
                break
            if int(pid) in mine or int(ppid) == os.getpid() or args.startswith("ps "):
                continue
            busy.append(f"{args[:80]} ({pcpu} % CPU)")
        load["other_busy_processes"] = busy[:5]
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return load


def software_versions() -> dict[str, str]:
    """Python, OS and the installed versions of the packages that shape the figures (missing ones left out)."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    versions["keras_backend"] = os.environ.get("KERAS_BACKEND", "tensorflow")
    return versions


def hardware() -> str:
    """One line for table headers: CPU model (bf16 flags); accelerator, Keras / backend, Python."""
    import keras

    from socseg.training.runtime import accelerator

    backend = keras.backend.backend()
    version = ""
    if backend == "tensorflow":
        import tensorflow as tf

        version = f" {tf.__version__}"
    cpu = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = [f for f in ("avx512_bf16", "amx_bf16") if f in info]
        cpu = f"{model}{' (' + ', '.join(flags) + ')' if flags else ''}; "
    except (OSError, StopIteration):
        pass
    return f"{cpu}{accelerator()}, Keras {keras.__version__} / {backend}{version}, Python {platform.python_version()}"


def run_metadata(script: str | Path, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command, date, commit, hardware and software of this run (no Keras import: cheap in any process)."""
    return {
        "command": command_line(script, argv),
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "hardware": {**cpu_info(), ONEDNN_ISA_ENV: os.environ.get(ONEDNN_ISA_ENV)},
        "cpu_class": cpu_class(cpu_info().get("flags", {}), os.environ.get(ONEDNN_ISA_ENV)),
        "software": software_versions(),
        "load_start": machine_load(),
    }


def describe_load(load: Mapping[str, Any] | None) -> str:
    """``load 0.12, nothing else busy`` or ``load 1.87; also running: pytest ...`` for headers."""
    if not load:
        return "not recorded"
    busy = load.get("other_busy_processes") or []
    text = f"load average {load.get('loadavg_1min', '?')}"
    return text + ("; also running: " + "; ".join(busy) if busy else "; no other process above 10 % CPU")


def describe_hardware(hw: Mapping[str, Any]) -> str:
    flags = hw.get("flags", {})
    shown = ", ".join(f"{flag} {'yes' if flags[flag] else 'no'}" for flag in CPU_FLAGS if flag in flags)
    cores = f"{hw.get('cores')} cores" + (f" ({hw['cores_usable']} usable)" if hw.get("cores_usable") not in (None, hw.get("cores")) else "")
    return f"{hw.get('model')}, {cores}, {hw.get('ram_gib', '?')} GiB RAM" + (f"; {shown}" if shown else "")


def write_result(out: Path, name: str, title: str, metadata: Mapping[str, Any], settings: Mapping[str, Any],
                 figures: Mapping[str, Any], columns: Sequence[tuple[str, ...]], rows: Sequence[Mapping[str, Any]],
                 notes: Sequence[str] = ()) -> tuple[Path, Path]:
    """``<out>/<name>.json`` (metadata, settings, figures, table rows) and ``<out>/<name>.md`` (header + table).

    ``columns`` are (key, heading) or (key, heading, format spec) for ``rows``; floats are shown with
    the spec (default ``,.2f``) in the table, unrounded in the JSON.
    """
    out.mkdir(parents=True, exist_ok=True)
    record = {**metadata, "load_end": machine_load(), "settings": dict(settings), "figures": dict(figures),
              "rows": [dict(r) for r in rows]}
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    software = metadata.get("software", {})
    header = {
        "command": f"`{metadata.get('command', '')}`",
        "date / commit": f"{metadata.get('date')} / {metadata.get('git_commit')}"
                         + (" (uncommitted changes in tracked files)" if metadata.get("git_dirty") else ""),
        "hardware": describe_hardware(metadata.get("hardware", {})),
        "cpu class": metadata.get("cpu_class") or cpu_class(metadata.get("hardware", {}).get("flags", {})),
        "what else ran": f"start: {describe_load(metadata.get('load_start'))}; end: {describe_load(record['load_end'])}",
        "software": ", ".join(f"{k} {v}" for k, v in software.items() if k != "platform"),
        "settings": "; ".join(f"{k} {v}" for k, v in settings.items()),
    }

    def cell(value: Any, spec: str) -> str:
        if value is None:
            return "-"
        return format(value, spec) if isinstance(value, float) else str(value)

    specs = [(c[0], c[1], c[2] if len(c) > 2 else ",.2f") for c in columns]
    lines = [f"# {title}", ""] + [f"- **{k}**: {v}" for k, v in header.items()]
    lines += ["", "| " + " | ".join(h for _, h, _ in specs) + " |", "|" + "---|" * len(specs)]
    lines += ["| " + " | ".join(cell(row.get(k), spec) for k, _, spec in specs) + " |" for row in rows]
    lines += [""] + [f"{note}" for note in notes] + ([""] if notes else [])
    md_path = out / f"{name}.md"
    md_path.write_text("\n".join(lines))
    return json_path, md_path


def model_rows(csv_path: Path, task: str | None = None) -> "pd.DataFrame":
    """The rows of an ``accuracy.py`` CSV that name a logged model (``model_uri``), of ``task``
    when given; refuses a CSV with none."""
    import pandas as pd

    models = pd.read_csv(csv_path)
    wanted = models["model_uri"].notna() & ((models["task"] == task) if task else True)
    if not wanted.any():
        raise SystemExit(f"{csv_path}: no {task + '-task ' if task else ''}row with a model_uri")
    return models[wanted]


def quickstart_command() -> tuple[str, dict[str, str]]:
    """The ``mlflow run`` line of ``scripts/quickstart.sh`` and its ``-P name=value`` parameters."""
    script = (REPO / "scripts" / "quickstart.sh").read_text()
    line = next(row.strip() for row in script.splitlines() if row.strip().startswith("mlflow run")).rstrip(" \\")
    words = shlex.split(line)
    parameters = dict(words[i + 1].split("=", 1) for i, word in enumerate(words[:-1]) if word == "-P")
    return line, parameters


def segment_volume_timing(model_uri: str, image: "np.ndarray",
                          planes: Sequence[str | None] = ("z", "zyx")) -> list[dict[str, Any]]:
    """``socseg.inference.segment.segment()`` of a whole volume (TIFF in and out, the model's own
    runtime, smoothing and fusion settings), once per distinct ``planes`` (None: the model's own
    ``inference.planes``): seconds and slices/s, what a user of ``socseg segment`` waits for
    (reading and writing included, model loading not)."""
    import tempfile

    import tifffile

    from socseg.inference.pyfunc import model_config
    from socseg.inference.request import InferenceOptions
    from socseg.inference.segment import SegmentOutputs, segment

    config = model_config(model_uri)  # segment() loads the network itself
    rows = []
    with tempfile.TemporaryDirectory(prefix="socseg-volume-time-") as tmp:
        grey = Path(tmp) / "grey.tif"
        tifffile.imwrite(grey, image, photometric="minisblack")
        for plane in dict.fromkeys(plane or config.planes for plane in planes):
            result = segment(model_uri, grey, SegmentOutputs.check(grey, Path(tmp) / f"{plane}.tif"),
                             InferenceOptions(planes=plane), slice_batch=8, progress=False)
            rows.append({"planes": plane, "slices": int(image.shape[0]), "seconds": result.seconds,
                         "slices_per_s": result.slices_per_second, "runtime": result.runtime,
                         "chunk": "8 slices" if plane == "z" else
                         f"{config.fusion_depth} slices, halo {config.fusion_halo} (the model's)"})
            print(f"whole volume, planes {plane}: {result.seconds:.1f} s ({result.slices_per_second:.2f} slices/s)", flush=True)
    return rows


def add_socpristine_arguments(parser: "argparse.ArgumentParser | argparse._ArgumentGroup") -> None:
    """``--source`` (the SOCPristine folder) and ``--cache-dir`` (where :func:`import_socpristine`
    keeps its import): the data arguments of every benchmark that reads the real volume."""
    parser.add_argument("--source", type=Path,
                        default=Path(os.environ.get("SOCSEG_SHARED_DATA", REPO.parent / "shared/data/socpristine")),
                        help="SOCPristine folder (data/, labels/) [default: $SOCSEG_SHARED_DATA or ../shared/data/socpristine]")
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(os.environ.get("SOCSEG_CACHE", Path.home() / ".cache/socseg")) / "accuracy",
                        help="where the imported SOCPristine volume (and accuracy.py's shuffled copy) live "
                             "[default: $SOCSEG_CACHE/accuracy or ~/.cache/socseg/accuracy]")


def add_fold_model_arguments(parser: "argparse.ArgumentParser", method_help: str) -> None:
    """``--models`` (an accuracy.py ``--folds`` CSV), ``--method`` (its U-Net rows) and ``--split``
    (the CV run's): the arguments of every benchmark that reuses a cross-validation's fold models."""
    parser.add_argument("--models", type=Path, nargs="+", required=True, metavar="CSV",
                        help="accuracy.py --folds CSV(s) with a phases U-Net row per fold; folds trained in "
                             "separate runs are given as several CSVs")
    parser.add_argument("--method", default="pv", help=method_help)
    parser.add_argument("--split", type=lambda t: floats(t, 4), default=[0.6, 0.1, 0.3, 8], metavar="TRAIN,VAL,TEST,GAP",
                        help="the CV run's --split")


def joined_paths(paths: Sequence[Path]) -> str:
    """``--models a.csv b.csv`` as the result files and messages name it."""
    return ", ".join(map(str, paths))


def floats(text: str, n: int | None = None) -> list[float]:
    """``"0.6,0.2,0.2,4"`` -> floats (argparse type); ``n`` numbers exactly when given."""
    import argparse

    values = [float(v) for v in text.split(",")]
    if n is not None and len(values) != n:
        raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got {text!r}")
    return values


def import_socpristine(source: Path, cache: Path) -> Path:
    """Import SOCPristine once into the cache (validated, checksummed) and reuse it afterwards."""
    from socseg.data.volumes import import_slices, save_volume

    target = cache / "data" / "socpristine"
    if not (target / "volume.json").is_file():
        print(f"importing {source} -> {target}", flush=True)
        volume = import_slices(
            "socpristine", str(source / "data/SOCprist*.tiff"), str(source / "labels/slice__*.tif"),
            phase_map={0: "pore", 128: "ysz", 255: "ni"},
        )
        save_volume(volume, target)
    return target


def serving_client():
    """``serving/client.py`` as a module (it is a script, not part of the package): its REST client,
    ``local_server`` and ``free_port`` are what the benchmarks use."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("serving_client", REPO / "serving" / "client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
