"""Time and peak memory of a whole volume's microstructure with intervals, as a user runs it.

    python benchmarks/microstructure_volume.py --model runs:/<id>/model [--samples 12] [--with-tortuosity] \\
        [--with-everything] [--skip-metrics] [--out benchmarks/results/microstructure_volume]

The commands, each a fresh process timed by ``/usr/bin/time`` (wall seconds, peak RSS):

1. ``socseg segment MODEL VOLUME store.zarr --probabilities`` on all 200 slices of SOCPristine
   (501x501), the probabilities kept in the store;
2. ``socseg microstructure store.zarr --samples N --unit voxel``: every metric of the argmax labels
   with its class-bias interval (Ni sizes included, no tortuosity); ``--skip-metrics`` leaves it
   out (a re-run after a change to the tortuosity only);
3. with ``--with-tortuosity``: ``socseg microstructure store.zarr --samples 0 --tortuosity``: the
   tortuosity of the argmax labels along z, y and x, the cost one labels volume adds (an interval
   measures it again on each class's two extreme volumes: 7 volumes for three classes);
4. with ``--with-everything``: ``socseg microstructure store.zarr --samples N --tortuosity``: every
   metric with its interval, Ni sizes and the tortuosity of each phase along each axis included
   (the argmax and each phase's two extremes): the whole microstructure a report holds.

Writes ``microstructure_volume.json`` / ``.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests) rather than run as a script
    sys.path.append(str(Path(__file__).resolve().parent))

from _common import RESULTS, add_socpristine_arguments, import_socpristine, run_metadata, write_result  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a logged 3-phase segmenter (runs:/... or models:/...)")
    add_socpristine_arguments(p)
    p.add_argument("--samples", type=int, default=12)
    p.add_argument("--with-tortuosity", action="store_true", help="also time the tortuosity of the argmax labels")
    p.add_argument("--with-everything", action="store_true",
                   help="also time every metric with its interval, tortuosity included")
    p.add_argument("--skip-metrics", action="store_true", help="leave out step 2 (every metric without tortuosity)")
    p.add_argument("--out", type=Path, default=RESULTS / "microstructure_volume")
    p.add_argument("--note", default="")
    return p.parse_args(argv)


def tree_rss_bytes(process: "psutil.Process") -> int:
    """RSS of ``process`` and all its descendants (worker processes run side by side)."""
    import psutil

    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:  # exited between the listing and the reading
            pass
    return total


def timed(step: str, command: list[str], workdir: Path) -> dict[str, Any]:
    """Run ``command`` under ``/usr/bin/time``: its wall seconds and peak RSS (GiB) of the largest
    process, and the peak of the whole process tree's RSS sampled every 0.2 s (what parallel
    worker processes need together)."""
    import psutil

    report = workdir / f"{step}.time"
    started = time.perf_counter()
    running = subprocess.Popen(["/usr/bin/time", "-f", "%e %M", "-o", str(report), *command], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    tree_peak, root = 0, psutil.Process(running.pid)
    while running.poll() is None:
        tree_peak = max(tree_peak, tree_rss_bytes(root))
        time.sleep(0.2)
    stdout, stderr = running.communicate()
    done = subprocess.CompletedProcess(running.args, running.returncode, stdout, stderr)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{step} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    seconds, kib = report.read_text().split()[-2:]
    print(f"[{time.strftime('%H:%M:%S')}] {step}: {float(seconds):.0f} s, peak RSS {int(kib) / 2**20:.2f} GiB, "
          f"all processes {tree_peak / 2**30:.2f} GiB", flush=True)
    return {"step": step, "command": " ".join(command[1:]), "seconds": float(seconds), "wall_s": wall,
            "peak_rss_gib": int(kib) / 2**20, "peak_tree_rss_gib": tree_peak / 2**30}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    metadata = run_metadata(__file__, argv)
    volume = import_socpristine(args.source, args.cache_dir)
    socseg = str(Path(sys.executable).with_name("socseg"))
    rows = []
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="socseg-microstructure-volume-") as tmp:
        work = Path(tmp)
        store = work / "volume.zarr"
        rows.append(timed("segment", [socseg, "segment", args.model, str(volume), str(store), "--probabilities"], work))
        if not args.skip_metrics:
            metrics = work / "metrics.json"
            rows.append(timed("microstructure", [socseg, "microstructure", str(store), "--samples", str(args.samples),
                                                 "--unit", "voxel", "--output", str(metrics)], work))
            record = json.loads(metrics.read_text())
            figures["metrics_with_intervals"] = len(record.get("intervals") or {})  # the JSON of --output
        if args.with_tortuosity:
            rows.append(timed("tortuosity (argmax labels)", [socseg, "microstructure", str(store), "--samples", "0",
                                                            "--unit", "voxel", "--size-phases", "none", "--tortuosity",
                                                            "--output", str(work / "tortuosity.json")], work))
        if args.with_everything:
            rows.append(timed("everything (intervals, tortuosity)",
                              [socseg, "microstructure", str(store), "--samples", str(args.samples), "--unit", "voxel",
                               "--tortuosity", "--output", str(work / "everything.json")], work))
            record = json.loads((work / "everything.json").read_text())
            figures["everything_tortuosity_intervals"] = sum(1 for key in record.get("intervals") or {} if key.startswith("tau."))
    for row in rows:
        key = row["step"].split()[0]
        figures[f"{key}_seconds"], figures[f"{key}_peak_rss_gib"] = row["seconds"], row["peak_rss_gib"]
        figures[f"{key}_peak_tree_rss_gib"] = row["peak_tree_rss_gib"]
    settings = {"volume": "SOCPristine slices 1-200, 200x501x501 uint16", "model": args.model,
                "samples": args.samples, "timing": "/usr/bin/time of each command, a fresh process each (peak RSS: "
                "the largest process); all processes: the sum of the command's process tree, sampled every 0.2 s"}
    if args.note:
        settings["note"] = args.note
    columns = [("step", "step"), ("seconds", "seconds", ".0f"), ("peak_rss_gib", "peak RSS (GiB)", ".2f"),
               ("peak_tree_rss_gib", "all processes (GiB)", ".2f"), ("command", "command")]
    json_path, md_path = write_result(args.out, "microstructure_volume", "A whole volume's microstructure with intervals: time and memory",
                                      metadata, settings, figures, columns, rows)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
