"""Time the test suite as CI runs it: `bash .ci/run` in a fresh clone of the committed HEAD.

`.ci/run` installs the environment (pip's wheel cache warm), starts PostgreSQL and an MLflow
server on loopback and runs the README's test command (`bash scripts/test.sh`). The pytest
summary line and the wall-clock times go to ``suite.json`` / ``suite.md`` in --out.

    python benchmarks/suite_bench.py
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS, run_metadata, write_result  # noqa: E402

SUMMARY = re.compile(r"^=*\s*(\d+ (passed|failed).*) in ([\d.]+)s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "suite")
    parser.add_argument("--shared-data", type=Path, default=REPO.parent / "shared" / "data" / "socpristine",
                        help="The SOCPristine slices the real-data tests read (SOCSEG_SHARED_DATA).")
    args = parser.parse_args()
    metadata = run_metadata(__file__)
    with tempfile.TemporaryDirectory(prefix="socseg-suite-") as tmp:
        os.chmod(tmp, 0o755)  # the lab services run PostgreSQL as its own user: it must reach the clone
        clone = Path(tmp) / "socseg"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VIRTUAL_ENV"))}
        env.update(CI="true", SOCSEG_SHARED_DATA=str(args.shared_data))
        started = time.perf_counter()
        done = subprocess.run(["bash", ".ci/run"], cwd=clone, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
    lines = (done.stdout + done.stderr).splitlines()
    args.out.mkdir(parents=True, exist_ok=True)  # the pytest part of the output, failures included
    (args.out / "suite.log").write_text(done.stdout[-200_000:])
    summary = next((m for m in map(SUMMARY.match, reversed(lines)) if m), None)
    row = {"exit_code": done.returncode, "ci_run_s": round(seconds, 1),
           "pytest_s": float(summary.group(3)) if summary else None,
           "summary": summary.group(1) if summary else "no pytest summary line"}
    write_result(args.out, "suite", "Test suite as CI runs it (.ci/run on a fresh clone)", metadata,
                 settings={"shared_data": "SOCSEG_SHARED_DATA set to the SOCPristine slices"},
                 figures=row, columns=[("exit_code", "exit code"), ("ci_run_s", ".ci/run (s)", ".0f"),
                                       ("pytest_s", "pytest (s)", ".0f"), ("summary", "pytest summary")],
                 rows=[row])
    print(row)
    if done.returncode != 0:
        print("\n".join(lines[-60:]))
        raise SystemExit(done.returncode)


if __name__ == "__main__":
    main()
