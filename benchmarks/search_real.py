"""Optuna search on real PXCT slices: a U-Net's settings found on the validation slab, not guessed.

    python benchmarks/search_real.py --encoder unet --task ni --n-trials 12 --out benchmarks/results/search_unet_ni
    python benchmarks/accuracy.py --methods threshold,rf,unet,searched --variant searched=unet \\
        --from-search searched=benchmarks/results/search_unet_ni/search.json

This is ``socseg.training.search.run_search`` (the same code as ``socseg search`` and the MLproject) on the
same data and split as ``accuracy.py``: SOCPristine from ``../shared`` (imported once into the
cache) or ``--train-volume``, slabs from ``--split`` (default: params.yaml). Trials are chosen on
the validation slab only; the test slab is never seen, so ``accuracy.py --from-search`` can score
the result on it honestly. The study lives in ``--storage`` (default: SQLite in the cache folder):
re-running the command resumes it. Writes ``search.json`` (as ``socseg search`` does),
``trials.csv`` and ``search.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import yaml

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests) rather than run as a script
    sys.path.append(str(Path(__file__).resolve().parent))

from _common import REPO, add_socpristine_arguments, command_line, floats, git_commit, hardware, import_socpristine  # noqa: E402

from socseg.params import ENCODERS  # noqa: E402

if TYPE_CHECKING:
    import optuna
    import pandas as pd

# Keys of params.yaml's search.space that only mean something for a pretrained-style encoder.
ENCODER_ONLY_KEYS = ("train.freeze_encoder", "train.unfreeze_after")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="unet", choices=[*ENCODERS, "all"])
    p.add_argument("--task", default="ni", choices=["ni", "phases"])
    p.add_argument("--n-trials", type=int, default=12, help="finished trials the study should hold (resumes)")
    p.add_argument("--epochs", type=int, default=20, help="epochs per trial (the median pruner stops poor ones early)")
    p.add_argument("--steps-per-epoch", type=int, default=None)
    p.add_argument("--precision", default=None, choices=["float32", "mixed_bfloat16", "mixed_float16"])
    p.add_argument("--split", type=lambda t: floats(t, 4), default=None, metavar="TRAIN,VAL,TEST,GAP")
    p.add_argument("--space", type=Path, help="YAML mapping dotted key -> distribution (default: params.yaml search.space, "
                                              "without the encoder-only keys for a from-scratch U-Net)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="fixed params override for every trial, e.g. train.reduce_lr_patience=5")
    p.add_argument("--train-volume", type=Path, help="volume folder (default: SOCPristine from --source)")
    add_socpristine_arguments(p)
    p.add_argument("--params", type=Path, default=REPO / "params.yaml")
    p.add_argument("--study-name", default=None, help="default: real-<encoder>-<task>")
    p.add_argument("--storage", default=None, help="Optuna RDB URL (default: sqlite in --cache-dir)")
    p.add_argument("--experiment", default="socseg-search-real", help="MLflow experiment")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/search")
    return p.parse_args(argv)


def search_params(args: argparse.Namespace, volume_dir: Path) -> dict:
    """params.yaml with the data, split, trial length and space of this benchmark."""
    from socseg.params import load_params, set_dotted

    params = load_params(args.params)
    params["data"].update(dir=str(volume_dir.parent), volumes=[volume_dir.name])
    if args.split:
        params["split"] = dict(zip(("train", "val", "test", "gap"), args.split))
    params["train"].update(encoder=args.encoder, task=args.task, epochs=args.epochs)
    if args.precision:
        params["train"]["precision"] = args.precision
    if args.steps_per_epoch:
        params["tiles"]["steps_per_epoch"] = args.steps_per_epoch
    params["mlflow"]["experiment"] = args.experiment
    for item in args.sets:
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise KeyError("no '='")
            set_dotted(params, key, yaml.safe_load(value))
        except KeyError as error:
            raise SystemExit(f"bad --set {item!r}: {error.args[0]}") from None
    if args.space:
        space = yaml.safe_load(args.space.read_text())
    else:
        space = dict(params["search"]["space"])
        if args.encoder == "unet":
            space = {k: v for k, v in space.items() if k not in ENCODER_ONLY_KEYS}
    params["search"]["space"] = space
    return params


def trials_table(study: "optuna.Study") -> "pd.DataFrame":
    """One row per trial, best first, with the sampled settings as plain column names."""
    table = study.trials_dataframe(attrs=("number", "value", "state", "params", "duration"))
    table["duration"] = table["duration"].dt.total_seconds().round(0)
    table.columns = [c.removeprefix("params_") for c in table.columns]
    return table.sort_values("value", ascending=False, na_position="last")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from socseg.training.search import open_study, run_search, write_result

    volume_dir = args.train_volume or import_socpristine(args.source, args.cache_dir)
    params = search_params(args, volume_dir.resolve())
    study_name = args.study_name or f"real-{args.encoder}-{args.task}"
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    storage = args.storage or f"sqlite:///{args.cache_dir.resolve() / 'optuna-search-real.db'}"
    result = run_search(params, encoder=args.encoder, n_trials=args.n_trials, study_name=study_name, storage=storage)

    args.out.mkdir(parents=True, exist_ok=True)
    write_result(result, args.out / "search.json")
    table = trials_table(open_study(params, study_name, storage))
    table.to_csv(args.out / "trials.csv", index=False, float_format="%.6g")
    split, train = params["split"], params["train"]
    command = command_line(__file__, argv)
    header = {
        "command": f"`{command}`",
        "date / commit": f"{dt.datetime.now().strftime('%Y-%m-%d %H:%M')} / {git_commit()}",
        "hardware": hardware(),
        "data": f"{volume_dir.name}, split train/val/test/gap = {split['train']:g}/{split['val']:g}/{split['test']:g}/{split['gap']:g}; "
                "trials scored on the validation slab only",
        "trial": f"{args.encoder} U-Net, task {args.task}, {train['epochs']} epochs x {params['tiles']['steps_per_epoch']} steps, "
                 f"{train['precision']}, TPE sampler (seed {params['search'].get('sampler_seed', 0)}) + median pruner",
        "space": "; ".join(f"{k}: {v}" for k, v in params["search"]["space"].items()),
        "best": f"trial {result.best_trial}, val mean IoU {result.best_value:.4f}: {result.best_params}",
        "MLflow run": f"{result.parent_run_id} (experiment {args.experiment})",
    }
    lines = ["# Search on real data", ""] + [f"- **{k}**: {v}" for k, v in header.items()]
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in table.itertuples(index=False)]
    lines += ["", "| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells] + [""]
    (args.out / "search.md").write_text("\n".join(lines))
    print(f"{result.n_finished} finished trials; best trial {result.best_trial} val mean IoU {result.best_value:.4f} "
          f"-> {args.out / 'search.json'}\nnext: python benchmarks/accuracy.py --variant searched={result.best_encoder} "
          f"--methods threshold,rf,{result.best_encoder},searched --from-search searched={args.out / 'search.json'}")


if __name__ == "__main__":
    main()
