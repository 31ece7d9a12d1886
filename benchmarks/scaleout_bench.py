"""Search throughput (trials/hour) with 1, 2, ... workers sharing one Optuna study on PostgreSQL.

    python benchmarks/scaleout_bench.py [--workers 1,2] [--trials 6]
    source LAB/lab.env && python benchmarks/scaleout_bench.py --params params.yaml --no-tiny \\
        --worker-prefix 'srun --ntasks=1 --gres=gpu:1' --workers 1,2,4 --trials 16

For each worker count it makes a fresh study, starts that many ``socseg search`` processes at
once and waits for them. Services: ``$SOCSEG_STORAGE`` and ``$MLFLOW_TRACKING_URI`` (what
``source LAB/lab.env`` sets), else a private PostgreSQL + ``mlflow server`` started with
scripts/lab_services.sh and stopped at the end. Default trials are the test suite's tiny ones (a
24x64x64 phantom, 32-pixel tiles, 1 epoch of 2 steps, from-scratch U-Net): they measure the
coordination and tracking overhead rather than training. Two figures per run:
``wall`` counts from launch to the last worker's exit (process start-up included), ``trials`` counts
from the first trial's start to the last one's end. The study-wide target can be overshot by up
to workers - 1 trials (each worker checks it after its own trial); the rates count what ran.
Writes ``scaleout.json`` (figures, command, commit, hardware, software) and ``scaleout.md`` into
``--out`` after every worker count (an interrupted run keeps what it measured).
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Sequence

import yaml

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests) rather than run as a script
    sys.path.append(str(Path(__file__).resolve().parent))

from _common import REPO, RESULTS, run_metadata, serving_client, write_result  # noqa: E402

SCRIPT = REPO / "scripts" / "lab_services.sh"
COLUMNS = [("workers", "workers"), ("trials", "trials"), ("wall_s", "wall s", ".0f"),
           ("per_hour_wall", "trials/h (wall)", ".0f"), ("span_s", "first trial start to last end, s", ".0f"),
           ("per_hour_trials", "trials/h (trials)", ".0f"), ("speedup_wall", "speed-up (wall)", ".2f"),
           ("speedup_trials", "speed-up (trials)", ".2f")]


def start_services(directory: Path) -> dict[str, str]:
    """A private lab on free loopback ports; returns the variables of its lab.env."""
    free_port = serving_client().free_port
    pg_port = free_port()
    env = {**os.environ, "LAB_PG_PORT": str(pg_port), "LAB_MLFLOW_PORT": str(free_port({pg_port})),
           "LAB_PYTHON": sys.executable}
    subprocess.run(["bash", str(SCRIPT), "start", str(directory)], env=env, check=True, timeout=300)
    values = {}
    for line in (directory / "lab.env").read_text().splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export":
            key, value = words[1].split("=", 1)
            values[key] = value
    return values


def tiny_params(params: dict, data_dir: Path) -> dict:
    """The test suite's tiny trials (see tests/conftest.py::tiny_params)."""
    from socseg.data.synth import synth_from_params
    from socseg.data.volumes import save_volume

    p = copy.deepcopy(params)
    p["data"].update(dir=str(data_dir), volumes=["tiny"])
    p["split"].update(train=0.6, val=0.2, test=0.2, gap=2)
    p["tiles"].update(size=32, steps_per_epoch=2)
    p["train"].update(encoder="unet", epochs=1, batch_size=2, base_filters=4, patience=1)
    p["search"]["space"] = {"train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                            "train.loss": {"type": "categorical", "choices": ["ce", "ce_dice"]}}
    save_volume(synth_from_params(p, "tiny", shape=(24, 64, 64), seed=1), data_dir / "tiny")
    return p


def run_workers(n_workers: int, n_trials: int, params_file: Path, storage: str, prefix: list[str],
                encoder: str, log_dir: Path, timeout: float) -> dict:
    import optuna
    from optuna.trial import TrialState

    study_name = f"bench-{n_workers}w-{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    command = [*prefix, sys.executable, "-m", "socseg.cli", "search", "--params", str(params_file),
               "--encoder", encoder, "--storage", storage, "--study-name", study_name,
               "--n-trials", str(n_trials)]
    started = time.time()
    procs = []
    for number in range(n_workers):
        log = open(log_dir / f"{study_name}-{number}.log", "wb")
        procs.append(subprocess.Popen(command + ["--out", str(log_dir / f"{study_name}-{number}.json")], env=env,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, started + timeout - time.time()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    wall = time.time() - started
    failed = [p.returncode for p in procs if p.returncode != 0]
    if failed:
        raise SystemExit(f"{len(failed)} worker(s) failed; logs in {log_dir}")
    trials = optuna.load_study(study_name=study_name, storage=storage).get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    span = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
    numbers = [t.number for t in trials]
    assert len(set(numbers)) == len(numbers), "duplicate trial numbers"
    return {"workers": n_workers, "trials": len(trials), "wall_s": wall, "span_s": span,
            "per_hour_wall": 3600 * len(trials) / wall, "per_hour_trials": 3600 * len(trials) / span}


def with_speedups(results: list[dict]) -> list[dict]:
    """Each row with its speed-up over the first worker count (the first row's is 1)."""
    base = results[0]
    return [{**r, "speedup_wall": r["per_hour_wall"] / base["per_hour_wall"],
             "speedup_trials": r["per_hour_trials"] / base["per_hour_trials"]} for r in results]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts to measure")
    parser.add_argument("--trials", type=int, default=6, help="study-wide trial target for each measurement")
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--no-tiny", action="store_true", help="use --params as it is (real data, real trials)")
    parser.add_argument("--encoder", default="unet", help="passed to socseg search (vgg16, resnet50, unet, all)")
    parser.add_argument("--worker-prefix", default="", help="launcher for each worker, e.g. 'srun --ntasks=1'")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per measurement")
    parser.add_argument("--out", type=Path, default=RESULTS / "scaleout", help="folder for scaleout.json and scaleout.md")
    parser.add_argument("--note", default="", help="free text for the result file (e.g. what else ran on the machine)")
    args = parser.parse_args(argv)
    metadata = run_metadata(__file__, argv)

    from mlflow.tracking import MlflowClient

    from socseg.params import load_params

    work = Path(tempfile.mkdtemp(prefix="socseg-bench-"))
    work.chmod(0o755)  # the postgres user must reach a private lab's cluster directory
    own_services = not (os.environ.get("SOCSEG_STORAGE") and os.environ.get("MLFLOW_TRACKING_URI"))
    try:
        if own_services:
            os.environ.update(start_services(work / "lab"))
        params = load_params(args.params)
        if not args.no_tiny:
            params = tiny_params(params, work / "data")
        params["mlflow"]["experiment"] = experiment = f"scaleout-bench-{uuid.uuid4().hex[:6]}"
        # Created once here: concurrent first-time creation by the workers would race (see README).
        MlflowClient().create_experiment(experiment)
        params_file = work / "params.yaml"
        params_file.write_text(yaml.safe_dump(params))
        print(f"{os.cpu_count()} CPU cores; tracking {os.environ['MLFLOW_TRACKING_URI']}; "
              f"{'tiny' if not args.no_tiny else 'full'} trials, study target {args.trials}")
        settings = {"trials": "tiny (24x64x64 phantom, 32-px tiles, 1 epoch of 2 steps, unet base 4)" if not args.no_tiny
                    else f"full ({args.params} as it is)",
                    "study-wide trial target": args.trials, "encoder": args.encoder,
                    "services": "private PostgreSQL + mlflow server (scripts/lab_services.sh)" if own_services
                    else "$SOCSEG_STORAGE / $MLFLOW_TRACKING_URI",
                    "worker prefix": args.worker_prefix or "none"}
        if args.note:
            settings["note"] = args.note
        notes = ["wall: launch to the last worker's exit (process start-up included); trials: first trial's start to "
                 "the last one's end. Speed-ups are against the first worker count."]
        results = []
        for n_workers in (int(n) for n in args.workers.split(",")):
            result = run_workers(n_workers, args.trials, params_file, os.environ["SOCSEG_STORAGE"],
                                 shlex.split(args.worker_prefix), args.encoder, work, args.timeout)
            results.append(result)
            rows = with_speedups(results)
            write_result(args.out, "scaleout", "Scale-out benchmark", metadata, settings,
                         {"by_workers": {str(r["workers"]): r for r in rows}}, COLUMNS, rows, notes)
            print(f"{n_workers} worker(s): {result['trials']} trials, wall {result['wall_s']:.0f} s "
                  f"-> {result['per_hour_wall']:.0f} trials/h (first trial start to last end "
                  f"{result['span_s']:.0f} s -> {result['per_hour_trials']:.0f} trials/h)", flush=True)
        base = results[0]
        for result in with_speedups(results)[1:]:
            print(f"speed-up {result['workers']} vs {base['workers']} worker(s): "
                  f"{result['speedup_wall']:.2f}x wall, {result['speedup_trials']:.2f}x trials")
        print(f"wrote {args.out / 'scaleout.json'} and {args.out / 'scaleout.md'}")
    finally:
        if own_services:
            subprocess.run(["bash", str(SCRIPT), "stop", str(work / "lab")], timeout=120)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
