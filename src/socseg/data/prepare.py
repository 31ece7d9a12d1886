"""Labelled volumes -> what training and scoring work on: slabs, the normalisation, the data version.

The ``prepare`` stage of ``dvc repro`` records this; training recomputes the same (deterministic)
split and normalisation, and scoring takes its test slabs from it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from socseg.data.normalise import Normaliser, grey_range
from socseg.data.split import SUBSETS, SlabSplit, split_from_params
from socseg.data.tasks import check_task, task_class_names, task_targets
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

    def targets(self, task: str) -> np.ndarray:
        """Task class indices (uint8) of the slab's labels."""
        start, stop = self.z_range
        return task_targets(self.volume.class_index(slice(start, stop)), task, self.volume.class_names)


@dataclass
class PreparedData:
    task: str
    class_names: list[str]
    phase_map: dict[int, str]
    # What the exported model's IntensityNormalisation layer holds: the training slabs' grey range
    # (mode fixed), or 0..1 (mode per_volume: the predictor maps each volume's own range first).
    normaliser: Normaliser
    splits: dict[str, SlabSplit]
    slabs: dict[str, list[Slab]]  # subset -> slabs (one per volume with a non-empty subset)
    fingerprint: str
    normalisation_mode: str  # fixed | per_volume (normalise.mode)
    volume_normalisers: dict[str, Normaliser]  # per_volume: volume name -> its whole-volume grey range

    def slab_normaliser(self, slab: Slab) -> Normaliser:
        """The mapping to [0, 1] of ``slab``'s grey values: its volume's own (per_volume) or the model's."""
        if self.normalisation_mode == "per_volume":
            return self.volume_normalisers[slab.name]
        return self.normaliser

    def normalised(self, slab: Slab) -> np.ndarray:
        """The slab's grey values as the network is trained on them (float32 in [0, 1])."""
        start, stop = slab.z_range
        return self.slab_normaliser(slab).apply(slab.volume.image[start:stop])

    def grey_ranges(self) -> dict[str, tuple[float, float]] | None:
        """per_volume: volume name -> the whole-volume grey range training mapped it with, which
        scoring a slab of that volume maps too (estimated once, here); fixed: None."""
        if self.normalisation_mode != "per_volume":
            return None
        return {name: (n.low, n.high) for name, n in self.volume_normalisers.items()}

    def normalisation_record(self) -> dict:
        """The model config's ``normalisation``: mode, the layer's low/high and the percentiles."""
        return {"mode": self.normalisation_mode, **self.normaliser.to_dict()}


def volumes_fingerprint(checksums: Iterable[Mapping[str, str]]) -> str:
    """One sha256 over the stored-file checksums of the volumes used: the data version of a run."""
    digest = hashlib.sha256()
    for entry in checksums:
        digest.update(json.dumps(dict(sorted(entry.items())), sort_keys=True).encode())
    return digest.hexdigest()


def load_labelled_volumes(params: Mapping | Params, names: Sequence[str] | None = None) -> list[Volume]:
    """The labelled volumes ``names`` (default ``data.volumes``) under ``data.dir``; the built-in
    sample is made on first use (a fresh clone has none)."""
    from socseg.data.synth import BUILTIN_SAMPLE, materialise_sample

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


def prepare_data(params: Mapping | Params, volumes: Sequence[Volume], task: str) -> PreparedData:
    """Split every volume into slabs; fit the normaliser on the training slabs only (mode fixed),
    or estimate each volume's own whole-volume grey range (mode per_volume: :func:`grey_range`,
    the function scoring and ``socseg segment`` use on the volume they are given)."""
    p = typed(params)
    check_task(task)
    class_names = task_class_names(task, volumes[0].class_names)
    splits = {v.meta.name: split_from_params(v.image.shape[0], p.split) for v in volumes}
    low_p, high_p = p.normalise.low_percentile, p.normalise.high_percentile
    volume_normalisers: dict[str, Normaliser] = {}
    if p.normalise.mode == "per_volume":
        volume_normalisers = {v.meta.name: grey_range(v.image, low_p, high_p) for v in volumes}
        normaliser = Normaliser(0.0, 1.0, float(low_p), float(high_p))
    else:
        normaliser = Normaliser.fit([v.image[splits[v.meta.name].range("train")] for v in volumes], low_p, high_p)
    slabs: dict[str, list[Slab]] = {subset: [] for subset in SUBSETS}
    for volume in volumes:
        split = splits[volume.meta.name]
        for subset in SUBSETS:
            start, stop = getattr(split, subset)
            if stop > start:
                slabs[subset].append(Slab(volume, (start, stop)))
    if not slabs["train"]:
        raise ValueError("the split leaves no training slices")
    return PreparedData(
        task=task,
        class_names=class_names,
        phase_map=dict(volumes[0].meta.phase_map),
        normaliser=normaliser,
        splits=splits,
        slabs=slabs,
        fingerprint=volumes_fingerprint([dict(v.meta.checksums) for v in volumes]),
        normalisation_mode=p.normalise.mode,
        volume_normalisers=volume_normalisers,
    )


# --------------------------------------------------------------------------- the prepare stage


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
    """Record each volume's slab split, the training-slab normalisation and the data fingerprint.

    Training recomputes the same (deterministic) split and normalisation; this file is what DVC
    tracks, so changing the data or the split/normalise params reruns everything downstream.
    """
    p = typed(params)
    data = prepare_data(p, load_labelled_volumes(p), p.train.task)
    summary = {
        "volumes": {slab.name: {"shape": list(slab.volume.image.shape), **data.splits[slab.name].to_dict()}
                    for slab in data.slabs["train"]},
        "normalisation": data.normalisation_record(),
        **({"volume_grey_ranges": {name: n.to_dict() for name, n in data.volume_normalisers.items()}}
           if data.volume_normalisers else {}),
        "class_names": data.class_names,
        "phase_map": {str(k): v for k, v in data.phase_map.items()},
        "data_fingerprint": data.fingerprint,
    }
    write_json(summary, out)
    return summary
