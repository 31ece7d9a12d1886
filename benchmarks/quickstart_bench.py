"""Time the README's quick start from fresh clones: install, then `bash scripts/quickstart.sh`.

Each run clones the committed HEAD into a temporary folder (no data, no stores, no .venv), runs
``bash scripts/setup_env.sh`` (timed as "install": pip reuses its wheel cache, as on a machine that
installed once) and then ``bash scripts/quickstart.sh`` (timed as "after install": MLproject `main`
with the default encoder, evaluation, registration, `socseg segment` of the sample). The champion's
test Ni IoU is read from the clone's metrics.json, its encoder from outputs/search.json, and the
seconds `socseg segment` reports for the sample from the log. Writes ``quickstart.json`` and
``quickstart.md`` to --out.

    python benchmarks/quickstart_bench.py --runs 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS, quickstart_command, run_metadata, write_result  # noqa: E402

from socseg.model.precision import resolve_precision  # noqa: E402

# The install step is the quick start's own (no test or docs tools), timed apart from the rest.
STEPS = {"install": ["bash", "-c", "SOCSEG_NO_TEST=1 SOCSEG_TOOLS= bash scripts/setup_env.sh"],
         "after_install": ["bash", "scripts/quickstart.sh"]}


def load_average() -> float:
    return os.getloadavg()[0]


def segment_seconds(log: str) -> float | None:
    """The seconds ``socseg segment`` reports for the sample ("segmented 48x192x192 in 85.3 s ..."),
    or None when the log has no such line."""
    found = re.findall(r"^segmented \S+ in ([0-9.]+) s", log, flags=re.M)
    return float(found[-1]) if found else None


def one_run(number: int, log_dir: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="socseg-quickstart-") as tmp:
        clone = Path(tmp) / "socseg"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        row: dict = {"run": number, "load_before": round(load_average(), 2)}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VIRTUAL_ENV"))}
        for step, command in STEPS.items():
            started = time.perf_counter()
            with open(log_dir / f"run{number}-{step}.log", "w") as log:
                done = subprocess.run(command, cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT)
            row[f"{step}_s"] = round(time.perf_counter() - started, 1)
            if done.returncode != 0:
                raise SystemExit(f"run {number}: `{' '.join(command)}` failed (rc {done.returncode}); "
                                 f"see {log_dir / f'run{number}-{step}.log'}")
        metrics = json.loads((clone / "metrics.json").read_text())
        row["test_iou_ni"] = round(float(metrics["test_iou_ni"]), 4)
        row["encoder"] = json.loads((clone / "outputs" / "search.json").read_text())["best_encoder"]
        row["segmented"] = (clone / "outputs" / "sample_segmented.tif").is_file()
        row["segment_s"] = segment_seconds((log_dir / f"run{number}-after_install.log").read_text())
        row["load_after"] = round(load_average(), 2)
    print(f"run {number}: {row}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "quickstart")
    args = parser.parse_args()
    metadata = run_metadata(__file__)
    # What is measured is a fresh clone of the commit: uncommitted changes of this checkout are not in it.
    metadata["checkout_dirty"], metadata["git_dirty"] = metadata["git_dirty"], False
    log_dir = Path(tempfile.mkdtemp(prefix="socseg-quickstart-logs-"))
    rows = [one_run(number, log_dir) for number in range(1, args.runs + 1)]
    figures = {
        "median_after_install_s": statistics.median(r["after_install_s"] for r in rows),
        "median_install_s": statistics.median(r["install_s"] for r in rows),
        "min_test_iou_ni": min(r["test_iou_ni"] for r in rows),
    }
    mlflow_line, _ = quickstart_command()
    write_result(
        args.out, "quickstart", "Quick start from fresh clones", metadata,
        settings={"runs": args.runs, "quickstart": mlflow_line,
                  "measured": f"fresh clones of commit {metadata['git_commit']} (the checkout's uncommitted changes, "
                              f"if any, are not in them: checkout dirty {metadata['checkout_dirty']})"},
        figures=figures,
        columns=[("run", "run"), ("install_s", "install (s)", ".1f"), ("after_install_s", "after install (s)", ".1f"),
                 ("test_iou_ni", "champion test Ni IoU", ".4f"), ("encoder", "champion encoder"),
                 ("segmented", "sample segmented"), ("segment_s", "socseg segment of the sample (s)", ".1f"),
                 ("load_before", "load avg before", ".2f"), ("load_after", "load avg after", ".2f")],
        rows=rows,
        notes=[f"Median after install: {figures['median_after_install_s']:.0f} s; median install (pip wheel cache "
               f"warm): {figures['median_install_s']:.0f} s. train.precision: auto resolved to "
               f"{resolve_precision('auto')} on this machine."],
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
