"""Serving under load: concurrent clients against `mlflow models serve` with 1 and 2 workers.

    python benchmarks/serving_load_bench.py [--model-uri URI] [--workers 1,2] [--clients 4] [--requests 25]
        [--slices-per-request 4] [--slices 16] [--encoding tiff] [--encoder unet --base-filters 8 --tile 128]
        [--out benchmarks/results/serving_load] [--note TEXT]

For each worker count W, one ``mlflow models serve --env-manager local --workers W`` of the model on
loopback (``serving/client.py``'s ``local_server``; W through ``MLFLOW_MODELS_WORKERS``, the option's
environment variable), then ``--clients`` threads, released together, each sending ``--requests``
requests of ``--slices-per-request`` 501x501 uint16 SOCPristine slices (the phantom where ../shared
is missing) in the compact form ``serving/client.py`` sends (base64 TIFF by default), one after the
other, without retries (a failure is an error, not hidden by backoff). Recorded per W: errors (a
non-200 answer, a timeout, a refused connection; must be 0), per-request latency p50 / p95 / max,
slices/s over the whole load (all answered slices / wall time from release to the last answer),
whether every answer's labels equal the answer to the same request sent alone before the load (so
concurrency changes nothing), and the server's peak RSS: the largest VmHWM of any process in its
tree (the mlflow CLI, uvicorn, its workers) and their sum (an upper bound of the tree's peak: the
processes need not peak together). Before the load every distinct request is sent once alone
(reference labels; it also traces the model in the worker that answers), then one untimed
concurrent round of one request per client warms the other workers.

Without ``--model-uri`` the model is serving_bench.py's untrained U-Net (weights do not change the
cost). Writes ``serving_load.json`` and ``serving_load.md`` into ``--out``; the documentation
renders its pages from them (``benchmarks/render.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import tifffile

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests) rather than run as a script
    sys.path.append(str(Path(__file__).resolve().parent))

from _common import RESULTS, run_metadata, serving_client, write_result  # noqa: E402



def tree_rss_mib(pid: int) -> tuple[float, float, int]:
    """(largest VmHWM, sum of VmHWM, processes) over ``pid`` and its descendants.

    Children are read from every thread's ``children`` file: a process started from another
    thread than the main one is listed only there.
    """
    peaks: dict[int, float] = {}
    todo = [pid]
    while todo:
        current = todo.pop()
        if current in peaks:
            continue
        try:
            status = Path(f"/proc/{current}/status").read_text()
            peaks[current] = int(next(l.split()[1] for l in status.splitlines() if l.startswith("VmHWM"))) / 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return max(peaks.values(), default=0.0), sum(peaks.values()), len(peaks)


@contextlib.contextmanager
def workers_env(workers: int) -> Iterator[None]:
    """``MLFLOW_MODELS_WORKERS`` (``mlflow models serve --workers``' variable) for the server started inside."""
    before = os.environ.get("MLFLOW_MODELS_WORKERS")
    os.environ["MLFLOW_MODELS_WORKERS"] = str(workers)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_MODELS_WORKERS", None)
        else:
            os.environ["MLFLOW_MODELS_WORKERS"] = before


def request_groups(n_slices: int, per_request: int) -> list[list[int]]:
    """Consecutive slices, ``per_request`` at a time, wrapping around so every request is full."""
    groups = max(1, -(-n_slices // per_request))
    return [[(g * per_request + i) % n_slices for i in range(per_request)] for g in range(groups)]


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def labels_of(predictions: Any) -> list[np.ndarray]:
    from socseg.inference.pyfunc import decode_array

    return [decode_array(row["labels"]) for row in predictions]


def run_load(client_module: Any, url: str, bodies: Sequence[bytes], reference: Sequence[list[np.ndarray]], clients: int,
             requests: int, per_request: int, timeout: float) -> dict[str, Any]:
    """``clients`` threads x ``requests`` POSTs, released together; latencies, errors, label checks."""
    latencies: list[float] = []
    errors: list[str] = []
    mismatches = 0
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def one_client(c: int) -> None:
        nonlocal mismatches
        rest = client_module.RestSegmenter(url, retries=0, timeout=timeout)
        start.wait()
        for j in range(requests):
            g = (c * requests + j) % len(bodies)
            began = time.perf_counter()
            try:
                predictions = rest.post(bodies[g])
            except Exception as exc:  # noqa: BLE001 - every failure under load is a recorded error
                with lock:
                    errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")
                continue
            seconds = time.perf_counter() - began
            same = all(np.array_equal(a, b) for a, b in zip(labels_of(predictions), reference[g]))
            with lock:
                latencies.append(seconds)
                mismatches += 0 if same else 1

    threads = [threading.Thread(target=one_client, args=(c,), daemon=True) for c in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    return {"latencies": latencies, "errors": errors, "mismatches": mismatches, "wall_s": wall,
            "slices": len(latencies) * per_request}


COLUMNS = [("workers", "workers"), ("requests_ok", "requests answered"), ("errors", "errors"),
           ("latency_p50_s", "p50 latency s", ".2f"), ("latency_p95_s", "p95 latency s", ".2f"),
           ("latency_max_s", "max latency s", ".2f"), ("slices_per_s", "slices/s", ".2f"),
           ("server_peak_rss_mib", "server peak RSS MiB (largest process)", ",.0f"),
           ("server_rss_sum_mib", "sum over its processes MiB", ",.0f"), ("labels_consistent", "labels = alone")]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", default=None, help="a pyfunc segmenter (default: untrained U-Net)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts, one server each")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    parser.add_argument("--requests", type=int, default=25, help="requests per client")
    parser.add_argument("--slices-per-request", type=int, default=4)
    parser.add_argument("--slices", type=int, default=16, help="distinct SOCPristine slices the requests cycle through")
    parser.add_argument("--encoding", choices=("tiff", "npy"), default="tiff", help="compact form encoding")
    parser.add_argument("--encoder", default="unet", choices=["unet", "vgg16", "resnet50"], help="untrained model only")
    parser.add_argument("--base-filters", type=int, default=8, help="untrained model only")
    parser.add_argument("--tile", type=int, default=128, help="untrained model only")
    parser.add_argument("--timeout", type=float, default=300.0, help="client seconds per request (the server's own "
                        "limit is MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, default 60 s: a 504 counts as an error)")
    parser.add_argument("--out", type=Path, default=RESULTS / "serving_load", help="folder for serving_load.json / .md")
    parser.add_argument("--note", default="", help="free text for the result file (e.g. what else ran on the machine)")
    args = parser.parse_args(argv)
    try:
        worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        parser.error(f"--workers must be comma-separated integers, got {args.workers!r}")
    if not worker_counts or min(worker_counts) < 1:
        parser.error(f"--workers needs counts >= 1, got {args.workers!r}")
    if min(args.clients, args.requests, args.slices_per_request, args.slices) < 1:
        parser.error("--clients, --requests, --slices-per-request and --slices must be >= 1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    metadata = run_metadata(__file__, argv)
    load_before = ", ".join(f"{v:.2f}" for v in os.getloadavg())

    from serving_bench import _model, _volume

    client = serving_client()
    rows: list[dict[str, Any]] = []
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        volume_text = _volume(args.slices, folder / "grey.tif")
        stack = tifffile.imread(folder / "grey.tif")
        uri, described = _model(args, folder)
        groups = request_groups(len(stack), args.slices_per_request)
        encoder = client.RestSegmenter("http://127.0.0.1:1", encoding=args.encoding)  # payloads only, no traffic
        bodies = [encoder.payload(stack[g]) for g in groups]
        print(f"volume: {volume_text}\nmodel: {described}\n{len(bodies)} distinct requests of {args.slices_per_request} "
              f"slices, {np.mean([len(b) for b in bodies]) / 2**20:.1f} MiB each; load average {load_before}", flush=True)
        for workers in worker_counts:
            print(f"workers {workers}: starting the server", flush=True)
            with workers_env(workers), client.local_server(uri, timeout=300, log_path=folder / f"server-{workers}.log") as (url, process):
                alone = client.RestSegmenter(url, retries=0, timeout=args.timeout)
                reference = [labels_of(alone.post(body)) for body in bodies]
                warm = run_load(client, url, bodies, reference, args.clients, 1, args.slices_per_request, args.timeout)
                print(f"  warmed up ({len(warm['latencies'])} concurrent requests, {len(warm['errors'])} errors); "
                      f"{args.clients} clients x {args.requests} requests", flush=True)
                load = run_load(client, url, bodies, reference, args.clients, args.requests, args.slices_per_request,
                                args.timeout)
                peak, total, processes = tree_rss_mib(process.pid)
            latencies = load["latencies"]
            row = {
                "workers": workers, "requests_ok": len(latencies), "errors": len(load["errors"]),
                "latency_p50_s": percentile(latencies, 50), "latency_p95_s": percentile(latencies, 95),
                "latency_max_s": max(latencies, default=None), "slices_per_s": load["slices"] / load["wall_s"],
                "wall_s": load["wall_s"], "server_peak_rss_mib": peak, "server_rss_sum_mib": total,
                "server_processes": processes, "labels_consistent": load["mismatches"] == 0 and bool(latencies),
                "warmup_errors": len(warm["errors"]),
            }
            rows.append(row)
            figures[f"workers_{workers}"] = {"errors": load["errors"][:20], "latencies_s": latencies}
            print(f"  {row['requests_ok']} answered, {row['errors']} errors, latency p50 {row['latency_p50_s'] or 0:.2f} s "
                  f"p95 {row['latency_p95_s'] or 0:.2f} s, {row['slices_per_s']:.2f} slices/s, server peak RSS "
                  f"{peak:,.0f} MiB (largest of {processes} processes; sum {total:,.0f} MiB), labels = alone: "
                  f"{row['labels_consistent']}", flush=True)
            for error in load["errors"][:5]:
                print(f"    error: {error}", flush=True)

    settings = {"volume": volume_text, "model": described, "clients": args.clients, "requests per client": args.requests,
                "slices per request": args.slices_per_request, "encoding": f"compact form, base64 {args.encoding}",
                "client timeout s": args.timeout, "load average before the run": load_before}
    if args.note:
        settings["note"] = args.note
    figures["errors_total"] = sum(row["errors"] for row in rows)
    notes = ["Latency: one request's round trip (encode excluded, the answer's JSON parsed). slices/s: answered slices "
             "over the wall time from the clients' release to the last answer. Server RSS: VmHWM of the mlflow CLI, "
             "uvicorn and its workers; the sum is an upper bound of the tree's peak."]
    json_path, md_path = write_result(args.out, "serving_load", "Serving under load", metadata, settings, figures,
                                      COLUMNS, rows, notes)
    print(f"wrote {json_path} and {md_path}")
    if figures["errors_total"]:
        raise SystemExit(f"error: {figures['errors_total']} requests failed under load (see {md_path})")


if __name__ == "__main__":
    main()
