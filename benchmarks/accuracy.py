"""Accuracy on real PXCT data: socseg U-Nets against the baselines users would otherwise pick.

    python benchmarks/accuracy.py                                   # SOCPristine 1-200, slab split
    python benchmarks/accuracy.py --train-volume data/a --test-volume data/b

Every method is trained on the same training data and scored on the same test slices with the
same scoring code (``socseg.inference.evaluate``: one confusion matrix per method,
``socseg.model.metrics.segmentation_scores``): global thresholds tuned on the training slab (the
floor), an ilastik-style random forest, and socseg U-Nets (``socseg.training.train`` with
``train.max_minutes`` as the time budget, scored through the logged model's predictor exactly as
the evaluate stage and ``socseg evaluate`` score it). One more U-Net run uses the original
report's random 80/20 *slice* split to show how much that split inflates the score.

Default data: the real SOCPristine slices (``../shared/data/socpristine`` or
``$SOCSEG_SHARED_DATA``), imported once with ``socseg.data.volumes.import_slices`` into a cache folder
(``--cache-dir``), never into the repository. ``--train-volume``/``--test-volume`` take volume
folders as ``socseg data import`` writes them; a test volume that is not a training volume is
scored whole, and the training volumes are then split into train | gap | val only.

Writes ``<out>/accuracy.csv`` and ``<out>/accuracy.md`` after every method (a crash keeps what
was measured) and logs them, with one nested run per method, to MLflow (``$MLFLOW_TRACKING_URI``
or params' ``mlflow.tracking_uri``). The documentation shows the table through
``python benchmarks/render.py`` (a ``render:`` block reads ``<out>/accuracy.csv``); this script
writes no README.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests) rather than run as a script
    sys.path.append(str(Path(__file__).resolve().parent))

from _common import (REPO, ONEDNN_ISA_ENV, add_socpristine_arguments, command_line, cpu_class, cpu_info, describe_load, floats, git_commit,  # noqa: E402
                     git_dirty, hardware, import_socpristine, machine_load, write_result)

from socseg.params import ENCODERS  # noqa: E402
BASELINES = ("threshold", "rf")
METHOD_LABELS = {
    "threshold": "global threshold(s)",
    "rf": "random forest (ilastik features)",
    "unet": "U-Net (from scratch)",
    "vgg16": "U-Net, VGG16 encoder",
    "resnet50": "U-Net, ResNet50 encoder",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--train-volume", action="append", type=Path, help="training volume folder (repeatable)")
    data.add_argument("--test-volume", type=Path, help="test volume folder (default: test slab of each training volume)")
    add_socpristine_arguments(data)
    data.add_argument("--split", type=lambda t: floats(t, 4), default=None, metavar="TRAIN,VAL,TEST,GAP",
                      help="slab split fractions and gap [default: params.yaml split]")
    data.add_argument("--params", type=Path, default=REPO / "params.yaml")
    run = p.add_argument_group("what to run")
    run.add_argument("--tasks", default="ni,phases", help="comma list of ni, phases")
    run.add_argument("--methods", default="threshold,rf,unet,vgg16,resnet50", help="comma list of threshold, rf, unet, vgg16, resnet50")
    run.add_argument("--leakage", action="append", metavar="METHOD:TASK",
                     help="also train METHOD on TASK with a random slice split (repeatable) [default: unet:ni]; 'none' to skip")
    run.add_argument("--leakage-split", type=lambda t: floats(t, 4), default=[0.7, 0.1, 0.2, 0],
                     metavar="TRAIN,VAL,TEST,GAP", help="random split: the report's 80/20, 1/8 of the 80 for early stopping")
    run.add_argument("--folds", type=int, default=0, metavar="K",
                     help="k contiguous z-folds instead of one test slab: each fold held out in turn, GAP slices "
                          "dropped on each side of it, validation from the rest (cross-validation; one training "
                          "volume, no --test-volume)")
    run.add_argument("--only-folds", type=lambda t: [int(v) for v in t.split(",")], default=None, metavar="I,J",
                     help="with --folds: run only these folds (1-based), e.g. to measure a costly variant where "
                          "the full cross-validation showed a weak fold; the summary covers the folds run")
    run.add_argument("--seeds", type=int, default=1, metavar="N",
                     help="train each U-Net method N times (train.seed, seed + 1, ...); N > 1 also scores the "
                          "ensemble of the N (their probabilities averaged: socseg.inference.predictor.Ensemble)")
    run.add_argument("--tta", default="", help="comma list of encoders also scored with 8-fold flip/rotation TTA")
    run.add_argument("--variant", action="append", default=[], metavar="NAME=ENCODER",
                     help="one more U-Net method named NAME (usable in --methods, --set NAME:..., --minutes NAME=...), "
                          "e.g. --variant 2.5D=unet --set 2.5D:train.context_slices=1")
    unet = p.add_argument_group("U-Net training (params.yaml overrides, for all encoders unless --set says otherwise)")
    unet.add_argument("--epochs", type=int, default=None)
    unet.add_argument("--steps-per-epoch", type=int, default=None)
    unet.add_argument("--batch-size", type=int, default=None)
    unet.add_argument("--precision", default=None, choices=["float32", "mixed_bfloat16", "mixed_float16"])
    unet.add_argument("--patience", type=int, default=None)
    unet.add_argument("--minutes", action="append", default=[], metavar="[ENCODER=]MIN",
                      help="wall-clock training budget per model: training stops after the epoch that would overrun it")
    unet.add_argument("--set", dest="sets", action="append", default=[], metavar="[ENCODER:]SECTION.KEY=VALUE",
                      help="any params override, e.g. vgg16:train.learning_rate=1e-4 or unet:tiles.augment.intensity_jitter=0.05")
    unet.add_argument("--from-search", action="append", default=[], metavar="[METHOD=]SEARCH_JSON",
                      help="train METHOD (default: the search's best encoder) with the best trial's settings from "
                           "the search.json that `socseg search` writes; only --set METHOD:KEY=... may override one of "
                           "them (a --set without prefix or with METHOD's encoder as prefix that hits a searched key "
                           "is refused)")
    rf = p.add_argument_group("random forest")
    rf.add_argument("--rf-trees", type=int, default=100)
    rf.add_argument("--rf-samples", type=int, default=150_000, help="training pixels, drawn evenly from the training slices")
    rf.add_argument("--rf-jobs", type=int, default=2)
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=REPO / "benchmarks/results")
    out.add_argument("--experiment", default="socseg-accuracy", help="MLflow experiment")
    out.add_argument("--note", default="", help="free text for the Markdown header (e.g. what else ran on the machine)")
    args = p.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.methods = [m for m in args.methods.split(",") if m]
    args.tta = [m for m in args.tta.split(",") if m]
    args.variants = {}
    for item in args.variant:
        name, sep, encoder = item.partition("=")
        if not sep or not name or encoder not in ENCODERS or name in ENCODERS or name in BASELINES:
            p.error(f"--variant takes NAME=ENCODER with a new NAME and ENCODER one of {', '.join(ENCODERS)}; got {item!r}")
        args.variants[name] = encoder
    bad = sorted(set(args.methods) - set(BASELINES) - set(ENCODERS) - set(args.variants))
    bad += sorted(set(args.tasks) - {"ni", "phases"})
    if bad:
        p.error(f"unknown methods/tasks: {bad}")
    args.search_sources = {}
    searched = []
    for item in args.from_search:
        try:
            method, sources, overrides = search_overrides(item, args.variants)
        except (OSError, ValueError, KeyError) as error:
            p.error(f"--from-search {item!r}: {error}")
        args.search_sources[method] = sources
        searched += overrides
    problems = shadowed_search_values(args.sets, searched, args.variants)
    if problems:
        p.error("\n".join(problems))
    # The search's values first, then --set in the order given; a --set naming a searched method goes
    # last, so that the explicit override decides for that method wherever it stands on the line.
    named = [s for s in args.sets if s.partition("=")[0].rpartition(":")[0] in args.search_sources]
    args.sets = searched + [s for s in args.sets if s not in named] + named
    if args.folds and (args.folds < 2 or args.test_volume is not None or len(args.train_volume or []) > 1):
        p.error("--folds takes K >= 2, one training volume and no --test-volume")
    if args.only_folds is not None and (not args.folds or not all(1 <= f <= args.folds for f in args.only_folds)):
        p.error(f"--only-folds takes fold numbers 1..K of --folds K, got {args.only_folds}")
    leakage = args.leakage if args.leakage is not None else (["none"] if args.folds else ["unet:ni"])
    args.leakage = [] if leakage == ["none"] else [tuple(s.split(":", 1)) for s in leakage]
    if any(len(s) != 2 for s in args.leakage):
        p.error("--leakage takes METHOD:TASK, e.g. unet:ni")
    return args


def search_overrides(item: str, variants: dict[str, str]) -> tuple[str, str, list[str]]:
    """``[METHOD=]search.json`` -> (method, "study S, trial N", ["METHOD:dotted.key=value", ...]).

    The search's best encoder must be the method's encoder: a VGG16 learning rate says nothing
    about a ResNet50.
    """
    import json

    method, sep, path = item.partition("=")
    if not sep:
        method, path = "", item
    best = json.loads(Path(path).read_text())
    method = method or best["best_encoder"]
    encoder = variants.get(method, method)
    if encoder not in ENCODERS:
        raise ValueError(f"{method!r} is not a U-Net method ({', '.join(ENCODERS)} or a --variant)")
    if best["best_encoder"] != encoder:
        raise ValueError(f"the search's best trial is a {best['best_encoder']} U-Net, not {encoder}")
    found = {key: value for key, value in sorted(best["best_params"].items()) if key != "train.encoder"}
    overrides = [f"{method}:{key}={json.dumps(value)}" for key, value in found.items()]
    chosen = ", ".join(f"{key.rpartition('.')[2]} {f'{value:.3g}' if isinstance(value, float) else value}"
                       for key, value in found.items())
    source = (f"search {best['study_name']} trial {best['best_trial']} (val mean IoU {float(best['best_value']):.4f}; "
              f"{chosen})")
    return method, source, overrides


def shadowed_search_values(sets: Sequence[str], searched: Sequence[str], variants: dict[str, str]) -> list[str]:
    """Errors for each --set that would silently replace a value a --from-search set.

    ``searched`` holds the search's overrides (``METHOD:KEY=VALUE``). A --set reaches a method when
    it has no prefix, or its prefix is the method or the method's encoder (``unet_params``). Only a
    --set that names the searched method itself may replace the search's value: ``unet:...`` also
    reaches ``--variant searched=unet``, and an un-prefixed --set reaches every method, so either
    would train the "searched" row with a hand-picked value and still credit the search for it.
    Such a broader --set is accepted when a --set METHOD:KEY=... says explicitly what the searched
    method gets (parse_args applies that one last).
    """

    def parts(item: str) -> tuple[str, str, str, bool]:
        head, sep, value = item.partition("=")
        prefix, _, key = head.rpartition(":")
        return prefix, key, value, bool(sep)

    def reaches(given_key: str, key: str) -> bool:
        return given_key == key or key.startswith(given_key + ".")  # the key or a section holding it

    problems = []
    for item in searched:
        method, key, value, _ = parts(item)
        encoder = variants.get(method, method)
        if any(prefix == method and reaches(given_key, key) for prefix, given_key, _, _ in map(parts, sets)):
            continue  # the user said explicitly what this method gets
        for given in sets:
            prefix, given_key, given_value, sep = parts(given)
            if not sep or not reaches(given_key, key) or (prefix and prefix != encoder):
                continue
            how = f"--set {given!r}" + (f" (prefix {prefix!r} is the encoder of {method!r})" if prefix else " (no prefix: every method)")
            problems.append(
                f"{how} would override {key}={value}, which --from-search set for {method!r}, so the {method!r} row "
                f"would no longer be the search's setting. To replace the search's value, say so for that method: "
                f"add --set {method}:{key}={given_value} (a --set naming the method decides for it). To keep the "
                f"search's value, set {key} for the other methods by name instead (one that shares the encoder "
                f"{encoder!r} needs its own --variant, e.g. --variant hand={encoder} --set hand:{key}={given_value})."
            )
    return problems


# --------------------------------------------------------------------------- data


@dataclass
class Setting:
    """Where a method trains and what it is tested on."""

    label: str  # e.g. "z-slabs, gap 8"
    data_dir: Path  # holds (links to) the training volumes, for socseg.training.train
    train_names: list[str]
    split: dict[str, float]
    tests: list[tuple[Path, tuple[int, int] | None]]  # (volume folder, z range or None: whole)
    volume_dirs: dict[str, Path] = field(default_factory=dict)


def shuffled_copy(volume_dir: Path, cache: Path, seed: int = 0) -> Path:
    """The volume with its slices in a fixed random order: a slab split of it is a random slice split.

    This is how the leakage run reuses the unchanged training code.
    """
    import numpy as np

    from socseg.data.volumes import Volume, VolumeMeta, load_volume, save_volume

    volume = load_volume(volume_dir)
    name = f"{volume.meta.name}-shuffled{seed}"
    target = cache / "data" / name
    if not (target / "volume.json").is_file():
        order = np.random.default_rng(seed).permutation(volume.image.shape[0])
        meta = VolumeMeta(**{**volume.meta.__dict__, "name": name, "checksums": {},
                             "extra": {**volume.meta.extra, "shuffled_from": volume.meta.name, "seed": seed,
                                       "order": order.tolist()}})
        save_volume(Volume(volume.image[order], volume.labels[order], meta), target)
    return target


def fold_bounds(n_slices: int, folds: int, fold: int) -> tuple[int, int]:
    """[start, stop) of contiguous z-fold ``fold`` of ``folds`` (sizes differ by at most one slice)."""
    edges = [round(n_slices * k / folds) for k in range(folds + 1)]
    return edges[fold], edges[fold + 1]


def fold_order(n_slices: int, folds: int, fold: int, gap: int) -> tuple[list[int], int]:
    """Slice order of a volume copy whose slab split (train | gap | val | gap | test) holds ``fold``
    out as the test slab, and the number of slices used for train + val.

    The copy is ``after[gap:] + before + fold``: the held-out fold last, the ``gap`` slices after it
    dropped, the ``gap`` slices before it become the split's gap before the test slab, so nothing
    within ``gap`` slices of the fold on either side is trained or validated on, and the fold's
    first slice reads its real neighbours as 2.5D context (and the y and x planes of fusion run on
    into them). Where ``after`` meets ``before`` (slices n-1 and 0) the training part has a seam;
    the fold's last slice reads its own copy as context on the far side (its real neighbour is
    dropped), as the volume's last slice does.

    The first fold has nothing before it, so that order would put slice n-1 right before slice 0:
    slice 0 would read slice n-1 as its neighbour, a wrong context that ruined its prediction. Its
    copy is the volume reversed instead, ``after`` from slice n-1-gap down, then the fold from its
    last slice down to slice 0: the ``gap`` slices after the fold become the split's gap before it
    (real neighbours, not trained on) and slice 0 ends the copy (mirror context, as in the volume);
    the slices trained and validated on are the same set as the other order's, z-flipped."""
    start, stop = fold_bounds(n_slices, folds, fold)
    if start == 0:
        order = list(range(n_slices - 1 - gap, stop - 1, -1)) + list(range(stop - 1, -1, -1))
    else:
        order = list(range(min(stop + gap, n_slices), n_slices)) + list(range(0, start)) + list(range(start, stop))
    return order, len(order) - (stop - start)


def fold_copy(volume_dir: Path, cache: Path, folds: int, fold: int, gap: int) -> tuple[Path, list[int], int]:
    """The volume in :func:`fold_order` (cached), that order and its slices for train + val."""
    import numpy as np

    from socseg.data.volumes import Volume, VolumeMeta, load_volume, save_volume

    volume = load_volume(volume_dir, mmap=True, verify=False)
    order, used = fold_order(volume.image.shape[0], folds, fold, gap)
    name = f"{volume.meta.name}-fold{fold + 1}of{folds}-gap{gap}"
    target = cache / "data" / name
    if (target / "volume.json").is_file() and load_volume(target, mmap=True, verify=False).meta.extra.get("order") != order:
        shutil.rmtree(target)  # cached by an earlier version of fold_order
    if not (target / "volume.json").is_file():
        index = np.asarray(order)
        meta = VolumeMeta(**{**volume.meta.__dict__, "name": name, "checksums": {}, "shape": (len(order), *volume.image.shape[1:]),
                             "extra": {**volume.meta.extra, "fold_of": volume.meta.name, "order": order}})
        save_volume(Volume(np.asarray(volume.image[index]), np.asarray(volume.labels[index]), meta), target)
    return target, order, used


def fold_setting(volume_dir: Path, cache: Path, folds: int, fold: int, split: Sequence[float], tmp: Path) -> Setting:
    """Fold ``fold``'s setting: its copy split into train | gap | val | gap | test = the fold, the
    validation share ``split[1] / (split[0] + split[1])`` of the slices left."""
    train, val, _, gap = split
    copy, order, used = fold_copy(volume_dir, cache, folds, fold, int(gap))
    held_out = len(order) - used
    rest = used - 2 * int(gap)  # slices for train + val (two gaps inside the copy)
    n_val = max(1, round(rest * val / (train + val)))
    usable = rest + held_out
    fractions = [(rest - n_val) / usable, n_val / usable, held_out / usable, gap]  # exact slice counts
    setting = make_setting(f"z-fold {fold + 1}/{folds}, gap {int(gap)}", [copy], None, fractions, tmp)
    if setting.tests[0][1] != (used, len(order)):
        raise SystemExit(f"fold {fold + 1}: the split's test slab {setting.tests[0][1]} is not the held-out fold")
    return setting


def volume_slices(volume_dir: Path) -> int:
    from socseg.data.volumes import load_volume

    return int(load_volume(volume_dir, mmap=True, verify=False).image.shape[0])


def link_volumes(dirs: Sequence[Path], into: Path) -> list[str]:
    """socseg.training.train reads volumes by name from one data dir: link each folder in under its name."""
    from socseg.data.volumes import load_volume

    names = []
    for d in dirs:
        name = load_volume(d, mmap=True, verify=False).meta.name
        if name in names:
            raise SystemExit(f"two training volumes are both named {name!r}")
        (into / name).symlink_to(d.resolve(), target_is_directory=True)
        names.append(name)
    return names


def make_setting(label: str, dirs: Sequence[Path], test_dir: Path | None, split: Sequence[float], tmp: Path) -> Setting:
    from socseg.data.split import slab_split
    from socseg.data.volumes import load_volume

    data_dir = tmp / re.sub(r"[^A-Za-z0-9]+", "_", label)
    data_dir.mkdir(parents=True)
    names = link_volumes(dirs, data_dir)
    train, val, test, gap = split
    cross = test_dir is not None and test_dir.resolve() not in {d.resolve() for d in dirs}
    if cross:
        test = 0.0  # the other volume is the test set; the training volumes give train | gap | val
        tests: list[tuple[Path, tuple[int, int] | None]] = [(test_dir, None)]
    else:
        tests = []
        for d in dirs:
            n = load_volume(d, mmap=True, verify=False).image.shape[0]
            tests.append((d, slab_split(n, train, val, test, int(gap)).test))
    split_params = {"train": train, "val": val, "test": test, "gap": int(gap)}
    return Setting(label, data_dir, names, split_params, tests, dict(zip(names, dirs)))


# --------------------------------------------------------------------------- methods


def test_slabs(setting: Setting, phase_names: list[str] | None = None) -> list:
    """The test slices of a setting as slabs (a whole volume where no z range is given), checked
    against the training volumes' ``phase_names`` when given."""
    from socseg.data.prepare import Slab
    from socseg.data.volumes import load_volume

    slabs = []
    for d, z in setting.tests:
        volume = load_volume(d)
        if phase_names is not None and volume.class_names != phase_names:
            raise SystemExit(f"test volume {d} has phases {volume.class_names}, training {phase_names}")
        slabs.append(Slab(volume, tuple(z or (0, volume.image.shape[0]))))
    return slabs


@dataclass
class FittedBaseline:
    """A threshold or forest baseline fitted on a setting's training slabs, with the prepared data
    that normalises any slab as it was trained (:meth:`PreparedData.normalised`) and the test slabs."""

    model: Any
    data: Any
    tests: list
    train_s: float


def fit_baseline(method: str, task: str, setting: Setting, params: dict, args) -> FittedBaseline:
    """``method`` ("threshold" or "rf") trained on the setting's training slabs of ``task``."""
    from socseg.data.prepare import load_labelled_volumes, prepare_data
    from socseg.model.baselines import RandomForestBaseline, ThresholdBaseline

    p = {**params, "data": {**params["data"], "dir": str(setting.data_dir)}, "split": setting.split}
    volumes = load_labelled_volumes(p, setting.train_names)
    tests = test_slabs(setting, volumes[0].class_names)
    # A test volume that is not a training volume: its own grey range (per_volume), the training one (fixed)
    data = prepare_data(p, volumes, task, test_volumes=[s.volume for s in tests if s.name not in setting.train_names])
    images = [data.normalised(s) for s in data.slabs["train"]]
    targets = [s.targets(task) for s in data.slabs["train"]]
    if method == "threshold":
        model: Any = ThresholdBaseline(n_classes=len(data.class_names))
    else:
        model = RandomForestBaseline(n_estimators=args.rf_trees, n_samples=args.rf_samples, n_jobs=args.rf_jobs)
    started = time.perf_counter()
    model.fit(images, targets)
    return FittedBaseline(model, data, tests, time.perf_counter() - started)


def run_baseline(method: str, task: str, setting: Setting, params: dict, args) -> dict[str, Any]:
    import mlflow
    import numpy as np

    from socseg.inference.evaluate import slab_confusion
    from socseg.model.metrics import segmentation_scores

    with mlflow.start_run(run_name=f"{method}-{task}", nested=True) as run:
        fitted = fit_baseline(method, task, setting, params, args)
        model, data, tests, train_s = fitted.model, fitted.data, fitted.tests, fitted.train_s
        cm = np.zeros((len(data.class_names),) * 2, dtype=np.int64)
        infer_s, n_slices = 0.0, 0
        for slab in tests:
            started = time.perf_counter()
            pred = model.predict(data.normalised(slab))
            infer_s += time.perf_counter() - started
            n_slices += len(pred)
            cm += slab_confusion(slab, pred, task)
        scores = segmentation_scores(cm, data.class_names)
        if method == "threshold" and data.grey_ranges() is not None:  # no one raw scale: each volume's own
            settings = ("thresholds " + ", ".join(f"{t:.3f}" for t in model.thresholds)
                        + " of each volume's own grey range (max. train mean IoU)")
        elif method == "threshold":
            raw = [data.normaliser.low + t * (data.normaliser.high - data.normaliser.low) for t in model.thresholds]
            settings = "raw grey thresholds " + ", ".join(f"{t:.0f}" for t in raw) + " (max. train mean IoU)"
        else:
            settings = f"{args.rf_trees} trees, {args.rf_samples // 1000}k px, {len(model.sigmas)} sigmas x 7 filters + grey, 2-D"
        mlflow.set_tags({"method": method, "task": task, "split": setting.label})
        mlflow.log_params({"settings": settings[:500], **{f"split.{k}": v for k, v in setting.split.items()}})
        mlflow.log_metrics({**{f"test_{k}": v for k, v in scores.items()}, "train_seconds": train_s,
                            "infer_seconds_per_slice": infer_s / n_slices})
        return {**scores, "train_s": train_s, "infer_s_per_slice": infer_s / n_slices, "precision": "float32 (NumPy/sklearn)",
                "settings": settings, "run_id": run.info.run_id, "n_test_slices": n_slices}


def method_label(method: str, args) -> str:
    encoder = args.variants.get(method)
    return f"{METHOD_LABELS[encoder]}, {method}" if encoder else METHOD_LABELS[method]


def unet_params(encoder: str, task: str, params: dict, args, setting: Setting, method: str | None = None) -> dict:
    import copy

    import yaml

    from socseg.params import set_dotted

    p = copy.deepcopy(params)
    p["data"]["dir"] = str(setting.data_dir)
    p["split"] = dict(setting.split)
    p["mlflow"]["experiment"] = args.experiment
    p["train"].update(encoder=encoder, task=task)
    for key, value in (("epochs", args.epochs), ("batch_size", args.batch_size), ("precision", args.precision),
                       ("patience", args.patience)):
        if value is not None:
            p["train"][key] = value
    if args.steps_per_epoch is not None:
        p["tiles"]["steps_per_epoch"] = args.steps_per_epoch
    for item in args.sets:
        key, _, value = item.partition("=")  # a value may hold ':' (a path), the key part not
        target, _, key = key.rpartition(":")
        if target and target not in (encoder, method):
            continue
        try:
            set_dotted(p, key, yaml.safe_load(value))
        except KeyError as error:
            raise SystemExit(f"bad --set {item!r}: {error.args[0]}") from None
    return p


def minutes_for(method: str, args) -> float | None:
    """Budget of ``method``: its own --minutes, else its encoder's (variants), else the default."""
    budget = None
    named = {}
    for item in args.minutes:
        name, sep, value = item.rpartition("=")
        if not sep:
            budget = float(value) if budget is None else budget
        else:
            named.setdefault(name, float(value))
    return named.get(method, named.get(args.variants.get(method, method), budget))


def score_model(model_uri: str, setting: Setting, task: str, tta: bool = False):
    """A logged model (or several, comma-separated: their ensemble) on the setting's test slices:
    its predictor through ``socseg.inference.evaluate.score_slabs``, as the evaluate stage and
    ``socseg evaluate`` score it."""
    from socseg.inference.evaluate import score_slabs
    from socseg.inference.predictor import load_predictor
    from socseg.inference.request import InferenceOptions

    # score_slabs checks the model's classes against each volume's phases
    return score_slabs(load_predictor(model_uri), test_slabs(setting), task, options=InferenceOptions(tta=tta))


def run_unet(encoder: str, task: str, setting: Setting, params: dict, args, tta: bool = False, trained=None) -> list[dict]:
    """Train through ``socseg.training.train`` (the logged model is what users get), then score it
    (:func:`score_model`); with ``--seeds N`` N times, then the ensemble of the N."""
    from socseg.training.train import train

    method, encoder = encoder, args.variants.get(encoder, encoder)
    base = unet_params(encoder, task, params, args, setting, method)
    budget = minutes_for(method, args)
    if budget:
        base["train"]["max_minutes"] = budget
    seeds = [int(base["train"]["seed"]) + k for k in range(max(1, args.seeds))]
    rows: list[dict] = []
    for seed in seeds:
        p = {**base, "train": {**base["train"], "seed": seed}}
        suffix = f" seed {seed}" if len(seeds) > 1 else ""
        result = train(p, setting.train_names, run_name=f"{method}{suffix}-{task} ({setting.label})", nested=True)
        rows += scored_unet_rows(result, p, encoder, method, setting, task, args, budget, tta, suffix)
    if len(seeds) > 1:  # the members' probabilities averaged, scored like any model
        plain = [r for r in rows if not r["method_suffix"].endswith(" + TTA")]
        members = [r["model_uri"] for r in plain]
        first = rows[0]
        for use_tta in ([False, True] if tta else [False]):
            evaluation = score_model(",".join(members), setting, task, use_tta)
            rows.append({**evaluation.scores, "train_s": sum(r["train_s"] for r in plain),
                         "infer_s_per_slice": evaluation.seconds / evaluation.n_slices,
                         "precision": first["precision"],
                         "settings": f"probability mean of the {len(members)} seeds' models above (train s: their sum)"
                                     + (", 8x TTA" if use_tta else ""),
                         "run_id": "", "model_uri": ",".join(members), "n_test_slices": evaluation.n_slices,
                         "method_suffix": f" ensemble of {len(members)}" + (" + TTA" if use_tta else "")})
    return rows


def scored_unet_rows(result, p: dict, encoder: str, method: str, setting: Setting, task: str, args,
                     budget: float | None, tta: bool, suffix: str) -> list[dict]:
    """One trained U-Net's rows: its settings and its scores on the setting's test slices (and with TTA)."""
    from socseg.model.unet import use_encoder_batchnorm
    from socseg.params import typed

    t = typed(p).train
    epochs_run = len(result.history.get("loss", []))
    settings = (f"{t.loss}, lr {t.learning_rate}, batch {t.batch_size}x{p['tiles']['size']}px, "
                f"{p['tiles']['steps_per_epoch']} steps/epoch, {epochs_run} epochs run (best {result.best_epoch + 1})"
                f"{f', {budget:g} min budget (train.max_minutes)' if budget else ''}, weights {t.encoder_weights}"
                + (f", base {t.base_filters}" if encoder == "unet" else "")
                + (f", 2.5D: {t.context_slices} neighbour slices per side" if t.context_slices else "")
                + (", BatchNorm in the encoder" if use_encoder_batchnorm(encoder, t.encoder_weights, t.encoder_batchnorm) else "")
                + (f", lr x{t.reduce_lr_factor} after {t.reduce_lr_patience} stalled epochs" if t.reduce_lr_patience else "")
                + (f", settings from {args.search_sources[method]}" if method in args.search_sources else "")
                + (f", seed {t.seed}" if suffix else ""))
    rows = []
    for use_tta in ([False, True] if tta else [False]):
        evaluation = score_model(result.model_uri, setting, task, use_tta)
        rows.append({**evaluation.scores, "train_s": result.seconds,
                     "infer_s_per_slice": evaluation.seconds / evaluation.n_slices,
                     "precision": t.precision, "settings": f"{settings}, {t.precision}" + (", 8x TTA" if use_tta else ""),
                     "run_id": result.run_id, "model_uri": result.model_uri, "n_test_slices": evaluation.n_slices,
                     "method_suffix": suffix + (" + TTA" if use_tta else "")})
    return rows


# --------------------------------------------------------------------------- output

COLUMNS = [
    ("task", "task"), ("method", "method"), ("split", "split"),
    ("iou_rest", "IoU rest"), ("iou_pore", "IoU pore"), ("iou_ysz", "IoU YSZ"), ("iou_ni", "IoU Ni"),
    ("dice_rest", "Dice rest"), ("dice_pore", "Dice pore"), ("dice_ysz", "Dice YSZ"), ("dice_ni", "Dice Ni"),
    ("mean_iou", "mean IoU"), ("accuracy", "pixel acc."), ("ni_fraction_error", "Ni frac. err."),
    ("train_s", "train s"), ("infer_s_per_slice", "infer s/slice"),
]


def _fmt(key: str, value: Any) -> str:
    if value is None or value == "" or (isinstance(value, float) and value != value):
        return "–"
    if key in ("train_s",):
        return f"{value:.0f}"
    if key == "infer_s_per_slice":
        return f"{value:.2f}"
    if key == "ni_fraction_error":
        return f"{value:.4f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def run_context() -> dict[str, Any]:
    """What the header and every row record beside the figures: the commit and whether tracked files
    differed from it (the figures may come from uncommitted code), the CPU class the speed columns
    belong to (flags and any ``ONEDNN_MAX_CPU_ISA`` limit), and what else ran when the run began."""
    return {"git_commit": git_commit(), "git_dirty": git_dirty(),
            "cpu_class": cpu_class(cpu_info().get("flags", {}), os.environ.get(ONEDNN_ISA_ENV)),
            "load_start": machine_load()}


def what_else_ran(context: dict[str, Any], load_end: dict[str, Any]) -> str:
    """The header line on the machine's load at the start of the run and when a row was written."""
    return f"start: {describe_load(context['load_start'])}; end: {describe_load(load_end)}"


def sorted_rows(rows: list[dict]) -> list[dict]:
    """Table order: by task, slab split before the leaky one, then in the order methods ran."""
    return sorted(rows, key=lambda r: (r["task"] != "ni", "leaks" in r["split"]))


def markdown(rows: list[dict], header: dict[str, str]) -> str:
    rows = sorted_rows(rows)
    lines = [f"- **{k}**: {v}" for k, v in header.items()]
    lines += ["", "| " + " | ".join(label for _, label in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(k, row.get(k)) for k, _ in COLUMNS) + " |")
    lines += ["", "Settings per row:", ""]
    lines += [f"- {row['task']} / {row['method']} / {row['split']}: {row.get('settings', '')}" for row in rows]
    return "\n".join(lines) + "\n"


def write_outputs(rows: list[dict], header: dict[str, str], out: Path) -> tuple[Path, Path]:
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(sorted_rows(rows))
    ordered = [k for k, _ in COLUMNS if k in frame] + [k for k in frame if k not in dict(COLUMNS)]
    frame[ordered].to_csv(out / "accuracy.csv", index=False, float_format="%.6g")
    (out / "accuracy.md").write_text("# Accuracy benchmark\n\n" + markdown(rows, header))
    return out / "accuracy.csv", out / "accuracy.md"


def cv_summary(rows: list[dict]) -> list[dict]:
    """Per task and method over the folds: mean and standard deviation of each IoU; per U-Net
    method, the paired difference to the forest (same fold) of mean IoU and IoU Ni."""
    import numpy as np

    out = []
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k.startswith("iou_") or k == "mean_iou"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["method"]), []).append(r)
    for (task, method), mine in groups.items():
        row: dict[str, Any] = {"task": task, "method": method, "folds": len(mine)}
        for k in keys:
            values = [r[k] for r in mine if isinstance(r.get(k), float) and not math.isnan(r[k])]
            if values:
                row[f"{k}_mean"], row[f"{k}_std"] = float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        forest = {r["split"]: r for r in groups.get((task, METHOD_LABELS["rf"]), [])}
        baseline = method in (METHOD_LABELS["rf"], METHOD_LABELS["threshold"])
        paired = [] if baseline else [(r, forest[r["split"]]) for r in mine if r["split"] in forest]
        for k in ("mean_iou", "iou_ni"):
            diffs = [a[k] - b[k] for a, b in paired if k in a and k in b]
            if diffs:
                row[f"{k}_minus_forest_mean"] = float(np.mean(diffs))
                row[f"{k}_minus_forest_std"] = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0
                row[f"{k}_minus_forest_min"] = float(min(diffs))
        out.append(row)
    return out


def write_cv_summary(rows: list[dict], args, header: dict[str, str]) -> None:
    """``cv.json`` / ``cv.md`` beside accuracy.csv: the cross-validated table (rewritten after each fold)."""
    summary = cv_summary(rows)
    names = sorted({k[:-5] for r in summary for k in r
                    if k.endswith("_mean") and k.startswith("iou_") and "_minus_" not in k},
                   key=lambda k: ["iou_rest", "iou_pore", "iou_ysz", "iou_ni"].index(k) if k in
                   ("iou_rest", "iou_pore", "iou_ysz", "iou_ni") else 9)
    columns = [("task", "task"), ("method", "method"), ("folds", "folds")]
    for k in [*names, "mean_iou"]:
        columns += [(f"{k}_mean", f"{k.replace('iou_', 'IoU ').replace('mean_iou', 'mean IoU')} mean", ".4f"),
                    (f"{k}_std", "sd", ".4f")]
    columns += [("mean_iou_minus_forest_mean", "mean IoU - forest", "+.4f"), ("mean_iou_minus_forest_std", "sd", ".4f"),
                ("iou_ni_minus_forest_mean", "IoU Ni - forest", "+.4f"), ("iou_ni_minus_forest_std", "sd", ".4f"),
                ("iou_ni_minus_forest_min", "worst fold", "+.4f")]
    # the commit the run started from (its rows carry it), not the checkout's HEAD when a fold ends
    metadata = {"command": header["command"].strip("`"), "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
                "git_commit": rows[0]["git_commit"], "git_dirty": rows[0]["git_dirty"], "hardware": cpu_info(),
                "cpu_class": cpu_class(cpu_info().get("flags", {}), os.environ.get(ONEDNN_ISA_ENV)),
                "load_start": None}
    settings = {"data": header.get("data", ""), "folds": args.folds, "per fold rows": str(args.out / "accuracy.csv")}
    figures: dict[str, Any] = {}  # {task: {method: {figure: value}}}: render.py reads dotted paths
    for r in summary:
        figures.setdefault(r["task"], {})[r["method"]] = {k: v for k, v in r.items() if k not in ("task", "method")}
    notes = ["sd: sample standard deviation over the folds (ddof 1). The paired difference is taken fold by fold "
             "against the forest trained and scored on the same fold."]
    write_result(args.out, "cv", f"Cross-validated accuracy ({args.folds} z-folds)", metadata, settings, figures,
                 columns, summary, notes)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import mlflow

    from socseg.params import load_params
    from socseg.training.tracking import configure_tracking

    params = load_params(args.params)
    params["mlflow"]["experiment"] = args.experiment
    split = args.split or [params["split"][k] for k in ("train", "val", "test", "gap")]
    train_dirs = args.train_volume or [import_socpristine(args.source, args.cache_dir)]
    command = command_line(__file__, argv)
    hw = hardware()
    context = run_context()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="socseg-accuracy-") as tmp:
        cross = args.test_volume is not None and args.test_volume.resolve() not in {d.resolve() for d in train_dirs}
        label = f"other volume ({args.test_volume.name})" if cross else f"z-slabs, gap {int(split[3])}"
        slab = make_setting(label, train_dirs, args.test_volume, split, Path(tmp))
        test_desc = "; ".join(f"{d.name} z {z[0]}-{z[1] - 1}" if z else f"{d.name} (whole)" for d, z in slab.tests)
        settings = [slab]
        if args.folds:
            chosen = [f - 1 for f in args.only_folds] if args.only_folds else range(args.folds)
            settings = [fold_setting(train_dirs[0], args.cache_dir, args.folds, f, split, Path(tmp)) for f in chosen]
            n = volume_slices(train_dirs[0])
            test_desc = (f"each of {args.folds} contiguous z-folds in turn ("
                         + ", ".join(f"z {a}-{b - 1}" for a, b in (fold_bounds(n, args.folds, f) for f in chosen))
                         + f"), {int(split[3])} slices dropped on each side of it; validation "
                           f"{split[1] / (split[0] + split[1]):.0%} of the rest")
        header = {
            "command": f"`{command}`",
            "date / commit": f"{dt.datetime.now().strftime('%Y-%m-%d %H:%M')} / {context['git_commit']}"
                             + (" (uncommitted changes in tracked files)" if context["git_dirty"] else ""),
            "hardware": hw,
            "cpu class": context["cpu_class"],
            "what else ran": f"start: {describe_load(context['load_start'])}",
            "data": f"train {', '.join(slab.train_names)} (split train/val/test/gap = "
                    f"{'/'.join(f'{v:g}' for v in [*split[:2], slab.split['test'], split[3]])}); "
                    f"test {test_desc}",
            "metrics": "thresholded per-class IoU/Dice from one confusion matrix over all test pixels "
                       "(socseg.inference.evaluate.segmentation_scores); Ni frac. err. = |predicted - true| Ni volume fraction "
                       "on the test slices; train s = wall-clock fit (U-Nets: incl. per-epoch validation); "
                       "infer s/slice = prediction only",
        }
        if args.note:
            header["note"] = args.note

        def add(row: dict, task: str, method: str, setting: Setting) -> None:
            row = {"task": task, "method": method_label(method, args) + row.pop("method_suffix", ""), "split": setting.label,
                   "hardware": hw, **row}
            load_end = machine_load()  # after this row's method: what ran while it trained and scored
            row.update({"cpu_class": context["cpu_class"], "git_commit": context["git_commit"],
                        "git_dirty": context["git_dirty"], "load_start": describe_load(context["load_start"]),
                        "load_end": describe_load(load_end)})
            header["what else ran"] = what_else_ran(context, load_end)
            rows.append(row)
            write_outputs(rows, header, args.out)
            print(f"[{time.strftime('%H:%M:%S')}] {task:6s} {row['method']:38s} {row['split']:22s} "
                  f"mean IoU {row['mean_iou']:.4f}  IoU Ni {row['iou_ni']:.4f}  "
                  f"train {row['train_s']:.0f} s  infer {row['infer_s_per_slice']:.2f} s/slice", flush=True)

        configure_tracking(params)
        with mlflow.start_run(run_name="accuracy-benchmark") as parent:
            mlflow.set_tags({"hardware": hw, "cpu_class": context["cpu_class"], "command": command[:5000],
                             "kind": "accuracy-benchmark"})
            mlflow.log_params({"split": "/".join(map(str, split)), "tasks": ",".join(args.tasks),
                               "methods": ",".join(args.methods), "train_volumes": ",".join(map(str, train_dirs)),
                               "test_volume": str(args.test_volume or "test slabs")})
            for setting in settings:
                for method in args.methods:  # cheap baselines first: a crash or a stop keeps them
                    for task in args.tasks:
                        if method in BASELINES:
                            add(run_baseline(method, task, setting, params, args), task, method, setting)
                        else:
                            for row in run_unet(method, task, setting, params, args, tta=method in args.tta):
                                add(row, task, method, setting)
                if args.folds:
                    write_cv_summary(rows, args, header)
            for method, task in args.leakage:
                shuffled = shuffled_copy(train_dirs[0], args.cache_dir)
                leak = make_setting("random slices 80/20 (leaks)", [shuffled], None, args.leakage_split, Path(tmp))
                if method in BASELINES:
                    add(run_baseline(method, task, leak, params, args), task, method, leak)
                else:
                    for row in run_unet(method, task, leak, params, args):
                        add(row, task, method, leak)
            header["what else ran"] = what_else_ran(context, machine_load())
            csv_path, md_path = write_outputs(rows, header, args.out)
            mlflow.log_artifact(str(csv_path), "accuracy")
            mlflow.log_artifact(str(md_path), "accuracy")
            header["MLflow run"] = f"{parent.info.run_id} (experiment {args.experiment})"
            write_outputs(rows, header, args.out)
    print(f"wrote {args.out / 'accuracy.csv'} and {args.out / 'accuracy.md'}")


if __name__ == "__main__":
    main()
