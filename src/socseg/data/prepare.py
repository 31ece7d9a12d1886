"""Labelled volumes -> what training and scoring work on: slabs, the normalisation, the data version.

Training and scoring compute the same (deterministic) split and normalisation from params and
the volumes; ``socseg prepare`` writes them to a file for a look before a long search.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from socseg.data.normalise import GreyRange, Normalisation, Normaliser
from socseg.data.split import SUBSETS, SlabSplit, split_from_params
from socseg.data.synth import BUILTIN_SAMPLE, materialise_sample
from socseg.data.tasks import Task, get_task
from socseg.data.volumes import Volume, load_volume, volume_dir
from socseg.params import Params, typed


@dataclass(frozen=True)
class Slab:
    """One subset (train, val or test) of one volume: slices ``z_range`` of it."""

    volume: Volume
    z_range: tuple[int, int]

    @property
    def name(self) -> str:
        return self.volume.meta.name

    def targets(self, task: str | Task) -> np.ndarray:
        """Task class indices (uint8) of the slab's labels."""
        start, stop = self.z_range
        return get_task(task).targets(self.volume.class_index(slice(start, stop)), self.volume.class_names)


@dataclass
class PreparedData:
    task: Task
    class_names: list[str]
    phase_map: dict[int, str]
    normalisation: Normalisation  # the model's: fitted on the training slabs (fixed) or per volume
    splits: dict[str, SlabSplit]
    slabs: dict[str, list[Slab]]  # subset -> slabs (one per volume with a non-empty subset; test: + whole test volumes)
    fingerprint: str
    # Every prepared volume's grey range as the normalisation resolves it (None: raw values reach
    # the layer), estimated once here: training, validation and scoring all map a volume alike.
    volume_ranges: dict[str, GreyRange | None]

    @property
    def normaliser(self) -> Normaliser:
        """What the exported model's IntensityNormalisation layer holds."""
        return self.normalisation.layer

    def slab_normaliser(self, slab: Slab) -> Normaliser:
        """The mapping to [0, 1] of ``slab``'s grey values, as the network is trained on them.

        Only the volumes :func:`prepare_data` was given (training volumes and separate
        ``test_volumes``) are known: a range estimated here for another one would be missing from
        :meth:`grey_ranges`, which scoring uses, so such a slab is refused.
        """
        if slab.name not in self.volume_ranges:
            raise ValueError(
                f"volume {slab.name!r} was not prepared (prepared: {', '.join(sorted(self.volume_ranges))}): "
                "its grey range must be resolved with the others; pass a separate test volume to "
                "prepare_data as test_volumes")
        return self.normalisation.unit_mapping(self.volume_ranges[slab.name])

    def normalised(self, slab: Slab) -> np.ndarray:
        """The slab's grey values as the network is trained on them (float32 in [0, 1])."""
        start, stop = slab.z_range
        return self.slab_normaliser(slab).apply(slab.volume.image[start:stop])

    def grey_ranges(self) -> dict[str, GreyRange] | None:
        """Volume name -> the grey range training mapped it with (per_volume: each volume's own;
        a separate test volume's estimated the same way), which scoring a slab of that volume maps
        too; None when no volume has one (fixed: raw values)."""
        ranges = {name: r for name, r in self.volume_ranges.items() if r is not None}
        return ranges or None


def volumes_fingerprint(checksums: Iterable[Mapping[str, str]]) -> str:
    """One sha256 over the stored-file checksums of the volumes used: the data version of a run."""
    digest = hashlib.sha256()
    for entry in checksums:
        digest.update(json.dumps(dict(sorted(entry.items())), sort_keys=True).encode())
    return digest.hexdigest()


def load_labelled_volumes(params: Mapping | Params, names: Sequence[str] | None = None) -> list[Volume]:
    """The labelled volumes ``names`` (default ``data.volumes``) under ``data.dir``; the built-in
    sample is made on first use (a fresh clone has none)."""
    p = typed(params)
    volumes = []
    for name in names or p.data.volumes:
        directory = volume_dir(name, p.data.dir)
        if name == BUILTIN_SAMPLE and not directory.exists():
            print(f"socseg: {directory} is missing: generating the built-in sample", flush=True)
            materialise_sample(p, directory)
        volume = load_volume(directory)
        if volume.labels is None:
            raise ValueError(f"volume {name!r} has no labels: training and scoring need labelled volumes")
        volumes.append(volume)
    phase_names = {tuple(v.class_names) for v in volumes}
    if len(phase_names) > 1:
        raise ValueError(f"volumes disagree on their phases: {sorted(phase_names)}")
    return volumes


def data_fingerprint(params: Mapping | Params) -> str:
    """Fingerprint of the configured labelled volumes (their stored files' sha256): what a study,
    a run and a registered version record as "the data"."""
    return volumes_fingerprint([dict(v.meta.checksums) for v in load_labelled_volumes(params)])


def prepare_data(
    params: Mapping | Params, volumes: Sequence[Volume], task: str | Task, test_volumes: Sequence[Volume] = ()
) -> PreparedData:
    """Split every volume into slabs; fit the normaliser on the training slabs only (mode fixed),
    or estimate each volume's own whole-volume grey range (mode per_volume: :func:`grey_range`,
    the function scoring and ``socseg segment`` use on the volume they are given).

    ``test_volumes``: other volumes, each a whole test slab after the test slabs of ``volumes``.
    They get their own grey range in per_volume mode (as ``socseg segment`` would estimate it)
    and the training slabs' range in fixed mode; they never touch the fit, and they count in the
    fingerprint (the test data is part of what a score means).
    """
    p = typed(params)
    task = get_task(task)
    check_separate_test_volumes(volumes, test_volumes)
    class_names = task.class_names(volumes[0].class_names)
    splits = {v.meta.name: split_from_params(v.image.shape[0], p.split, p.train.context_slices) for v in volumes}
    normalisation = Normalisation.fit(p.normalise.mode, [v.image[splits[v.meta.name].range("train")] for v in volumes],
                                      p.normalise.low_percentile, p.normalise.high_percentile)
    slabs = slab_subsets(volumes, splits)
    slabs["test"] += [Slab(v, (0, v.image.shape[0])) for v in test_volumes]
    return PreparedData(
        task=task,
        class_names=class_names,
        phase_map=dict(volumes[0].meta.phase_map),
        normalisation=normalisation,
        splits=splits,
        slabs=slabs,
        fingerprint=volumes_fingerprint([dict(v.meta.checksums) for v in (*volumes, *test_volumes)]),
        volume_ranges={v.meta.name: normalisation.source_range(v.image) for v in (*volumes, *test_volumes)},
    )


def check_separate_test_volumes(volumes: Sequence[Volume], test_volumes: Sequence[Volume]) -> None:
    """Refuse a test volume sharing a name with another volume (ranges and scores go by name) or
    with other phases than the training volumes (its labels would mean other classes)."""
    names = [v.meta.name for v in (*volumes, *test_volumes)]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ValueError(f"volume name(s) {', '.join(map(repr, clashes))} given more than once (training and "
                         "test volumes are told apart by name): rename one")
    for volume in test_volumes:
        if volume.class_names != volumes[0].class_names:
            raise ValueError(f"test volume {volume.meta.name!r} has phases {volume.class_names}, the training "
                             f"volumes {volumes[0].class_names}")


def slab_subsets(volumes: Sequence[Volume], splits: Mapping[str, SlabSplit]) -> dict[str, list[Slab]]:
    """subset -> the non-empty slabs of ``volumes`` under ``splits``; refused without training slices."""
    slabs: dict[str, list[Slab]] = {subset: [] for subset in SUBSETS}
    for volume in volumes:
        split = splits[volume.meta.name]
        for subset in SUBSETS:
            start, stop = getattr(split, subset)
            if stop > start:
                slabs[subset].append(Slab(volume, (start, stop)))
    if not slabs["train"]:
        raise ValueError("the split leaves no training slices")
    return slabs


# --------------------------------------------------------------------------- socseg prepare and the stages' JSON files


def write_json(data: Mapping, path: str | Path) -> None:
    """Write a stage's small JSON output atomically (DVC never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the stage that writes it first (dvc repro)")
    return json.loads(path.read_text())


def prepare(params: Mapping | Params, out: str | Path) -> dict:
    """Write each volume's slab split, the normalisation and the data fingerprint to ``out``:
    what training will compute from the same params and volumes (``socseg prepare``)."""
    p = typed(params)
    data = prepare_data(p, load_labelled_volumes(p), p.train.task)
    summary = {
        "volumes": {slab.name: {"shape": list(slab.volume.image.shape), **data.splits[slab.name].to_dict()}
                    for slab in data.slabs["train"]},
        "normalisation": data.normalisation.to_dict(),
        **({"volume_grey_ranges": {name: list(r) for name, r in ranges.items()}} if (ranges := data.grey_ranges()) else {}),
        "class_names": data.class_names,
        "phase_map": {str(k): v for k, v in data.phase_map.items()},
        "data_fingerprint": data.fingerprint,
    }
    write_json(summary, out)
    return summary
