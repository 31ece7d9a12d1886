"""socseg files as napari layers and napari label layers as socseg files, without Qt.

napari calls :func:`get_reader` and :func:`write_labels` through the plugin manifest
(``napari.yaml``); both only build or take napari's plain *layer data* tuples
``(data, keyword arguments, layer type)``, so they are tested without a viewer.

Two kinds of label layer exist, told apart by their ``metadata["socseg"]["role"]``:

- ``labels``: label values of the phase map as ``socseg segment`` writes them (e.g. 0 / 128 / 255 =
  pore / YSZ / Ni), coloured per phase (:mod:`socseg.data.phases`);
- ``correction``: what an annotator paints: 0 is *unlabelled* (napari's background, what an
  untouched pixel holds), class ``k`` of the model is painted as ``k + 1``. Written to disk it
  becomes a sparse label stack: label values where painted, the ignore value
  (``finetune.ignore_value``) elsewhere, which is what ``socseg finetune`` reads.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from socseg.data.chunked import LABEL_NAME, ChunkedLabels, write_label_store
from socseg.data.formats import MULTIPAGE_TIFF, TIFF_SUFFIXES, VOLUME_DIRECTORY, ZARR_SUFFIXES, open_zarr_labels
from socseg.data.phases import phase_colours, rgba
from socseg.data.stacks import LabelStackWriter, read_stack
from socseg.data.volumes import VolumeError, normalise_phase_map

LayerData = tuple[Any, dict[str, Any], str]
LABELS_ROLE = "labels"
CORRECTION_ROLE = "correction"
UNCERTAINTY_COLORMAP = "magma"


def _colour_dict(values: Sequence[int], names: Sequence[str]) -> dict[Any, Any]:
    """napari's direct label colormap: each value's phase colour, anything else transparent."""
    colours = {int(v): np.array(rgba(c), dtype=np.float32) / 255.0 for v, c in zip(values, phase_colours(names))}
    return {None: np.zeros(4, dtype=np.float32), **colours}


def labels_layer(data: Any, phase_map: Mapping[int, str], name: str, **extra: Any) -> LayerData:
    """Label values of ``phase_map`` as a Labels layer: a fixed colour and the phase name per value."""
    phase_map = {int(k): str(v) for k, v in sorted(phase_map.items())}
    values, names = list(phase_map), list(phase_map.values())
    meta = {"socseg": {"role": LABELS_ROLE, "phase_map": {str(k): v for k, v in phase_map.items()}, **extra}}
    return data, {"name": name, "colormap": _colour_dict(values, names), "features": {"index": values, "phase": names},
                  "metadata": meta, "opacity": 0.6}, "labels"


def correction_layer(shape: Sequence[int], phase_map: Mapping[int, str], name: str = "corrections",
                     source: str = "") -> LayerData:
    """An empty correction layer (all unlabelled) for a model whose label phase map is ``phase_map``:
    paint class ``k`` (in label-value order) as ``k + 1``."""
    phase_map = {int(k): str(v) for k, v in sorted(phase_map.items())}
    names = list(phase_map.values())
    codes = list(range(1, len(names) + 1))
    meta = {"socseg": {"role": CORRECTION_ROLE, "phase_map": {str(k): v for k, v in phase_map.items()}, "source": source}}
    return (np.zeros(tuple(shape), dtype=np.uint8),
            {"name": name, "colormap": _colour_dict(codes, names),
             "features": {"index": [0, *codes], "phase": ["unlabelled", *names]}, "metadata": meta}, "labels")


def correction_to_labels(painted: np.ndarray, phase_map: Mapping[int, str], ignore_value: int) -> np.ndarray:
    """A correction layer's paint -> label values, ``ignore_value`` where nothing was painted."""
    values = [int(v) for v in sorted(phase_map)]
    if ignore_value in values:
        raise VolumeError(f"ignore value {ignore_value} is a label value of the phase map {dict(phase_map)}: "
                          "choose another (finetune.ignore_value)")
    painted = np.asarray(painted)
    if painted.size and int(painted.max()) > len(values):
        raise VolumeError(f"the correction layer holds value {int(painted.max())}; paint 1..{len(values)} "
                          f"({', '.join(f'{i + 1} = {phase_map[v]}' for i, v in enumerate(values))}), 0 = unlabelled")
    lut = np.array([ignore_value, *values], dtype=np.uint8)
    return lut[painted.astype(np.intp)]


def painted_slices(painted: np.ndarray) -> list[int]:
    """The z indices with at least one painted pixel."""
    painted = np.asarray(painted)
    return [int(z) for z in np.flatnonzero(painted.reshape(painted.shape[0], -1).any(axis=1))]


# --------------------------------------------------------------------------- reading


def _store_layers(path: Path) -> list[LayerData]:
    """A ``socseg segment`` store: the grey image, the labels, probabilities and uncertainty."""
    store = ChunkedLabels.open(path)
    attrs = store.attrs
    phase_map = normalise_phase_map({int(k): v for k, v in attrs.get("phase_map", {}).items()})
    scale = _scale(path)
    layers: list[LayerData] = []
    if store.image is not None:
        layers.append((store.image, {"name": f"{path.stem} image", "scale": scale, "metadata": {"socseg": {"role": "image"}}},
                       "image"))
    data, kwargs, kind = labels_layer(store.labels, phase_map, f"{path.stem} {LABEL_NAME}",
                                      model_uri=attrs.get("model_uri", ""), source=str(path))
    layers.append((data, {**kwargs, "scale": scale}, kind))
    if store.probabilities is not None:
        names = list(phase_map.values()) if len(phase_map) == store.probabilities.shape[-1] else None
        layers.append((store.probabilities, {"name": [f"P({n})" for n in names] if names else f"{path.stem} probabilities",
                                             "channel_axis": 3, "scale": scale, "contrast_limits": [0, 255],
                                             "visible": False}, "image"))
    if store.uncertainty is not None:
        layers.append((store.uncertainty, {"name": f"{path.stem} uncertainty", "scale": scale, "colormap": UNCERTAINTY_COLORMAP,
                                           "contrast_limits": [0, 255], "opacity": 0.6, "visible": False,
                                           "metadata": {"socseg": {"role": "uncertainty"}}}, "image"))
    return layers


def _scale(path: Path) -> list[float]:
    from socseg.analysis.intervals import recorded_voxel_size_nm

    voxel = recorded_voxel_size_nm(path)
    return [voxel / 1000.0] * 3 if voxel else [1.0, 1.0, 1.0]


def _plain_label_store_layers(path: Path) -> list[LayerData]:
    """A label store :func:`write_labels` wrote (labels only, phase map in its attributes)."""
    import zarr

    attrs = dict(dict(zarr.open_group(str(path), mode="r").attrs).get("socseg", {}))
    phase_map = normalise_phase_map({int(k): v for k, v in attrs["phase_map"].items()})
    return [labels_layer(open_zarr_labels(path), phase_map, path.stem, source=str(path))]


def _label_tiff_layers(path: Path, record: Mapping[str, Any]) -> list[LayerData]:
    phase_map = normalise_phase_map({int(k): v for k, v in record["phase_map"].items()})
    return [labels_layer(read_stack(path), phase_map, path.stem, source=str(path),
                         **({"ignore_value": record["ignore_value"]} if "ignore_value" in record else {}))]


def _volume_layers(path: Path) -> list[LayerData]:
    """A socseg volume folder: its grey image and, when labelled, its labels."""
    meta = VOLUME_DIRECTORY.volume_meta(str(path))
    assert meta is not None
    scale = [meta.voxel_size_nm / 1000.0] * 3 if meta.voxel_size_nm else [1.0, 1.0, 1.0]
    layers: list[LayerData] = [(VOLUME_DIRECTORY.read(str(path)), {"name": meta.name, "scale": scale,
                                                                   "metadata": {"socseg": {"role": "image"}}}, "image")]
    if meta.has_labels:
        data, kwargs, kind = labels_layer(VOLUME_DIRECTORY.read_labels(str(path)), meta.phase_map, f"{meta.name} labels",
                                          source=str(path))
        layers.append((data, {**kwargs, "scale": scale}, kind))
    return layers


def _socseg_tiff_record(path: Path) -> dict[str, Any] | None:
    """The JSON ``socseg segment`` put on a label TIFF's first page, if it is one (else None)."""
    try:
        record = MULTIPAGE_TIFF.socseg_record(str(path))
    except Exception:  # not a TIFF tifffile can read: napari's own reader says why
        return None
    return record if "phase_map" in record and record.get("content") in (None, LABELS_ROLE) else None


def get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """napari's reader hook: a function for the socseg files it recognises, None for the rest
    (a plain grey TIFF is left to napari's own reader)."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    source = Path(path)
    if source.suffix.lower() in ZARR_SUFFIXES and source.is_dir():
        import zarr

        try:
            attrs = dict(zarr.open_group(str(source), mode="r").attrs)
        except Exception:  # not a group socseg can read: let another plugin try
            return None
        if "socseg" not in attrs:
            return None
        if "complete" in {name for name, _ in zarr.open_group(str(source), mode="r").arrays()}:
            return lambda p: _store_layers(Path(p if isinstance(p, str) else p[0]))
        return lambda p: _plain_label_store_layers(Path(p if isinstance(p, str) else p[0]))
    if source.suffix.lower() in TIFF_SUFFIXES and source.is_file():
        record = _socseg_tiff_record(source)
        return None if record is None else (lambda p: _label_tiff_layers(Path(p if isinstance(p, str) else p[0]), record))
    if source.is_dir() and VOLUME_DIRECTORY.recognises(str(source)):
        return lambda p: _volume_layers(Path(p if isinstance(p, str) else p[0]))
    return None


# --------------------------------------------------------------------------- writing


def _layer_phase_map(meta: Mapping[str, Any]) -> tuple[str, dict[int, str], Mapping[str, Any]]:
    record = dict((meta.get("metadata") or {}).get("socseg") or {})
    if "phase_map" not in record:
        raise VolumeError("this Labels layer has no socseg phase map (its metadata['socseg']['phase_map']): "
                          "save layers that socseg opened, segmented or created for corrections")
    return record.get("role", LABELS_ROLE), normalise_phase_map({int(k): v for k, v in record["phase_map"].items()}), record


def label_values_of(data: Any, meta: Mapping[str, Any], ignore_value: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """A Labels layer's data as label values, and what a label file records with them (phase map,
    ignore value of a correction layer)."""
    role, phase_map, record = _layer_phase_map(meta)
    labels = np.asarray(data)
    written: dict[str, Any] = {"phase_map": {str(k): v for k, v in phase_map.items()}, "content": LABELS_ROLE}
    if role == CORRECTION_ROLE:
        if ignore_value is None:
            from socseg.params import load_params, typed

            ignore_value = typed(load_params()).finetune.ignore_value
        labels = correction_to_labels(labels, phase_map, ignore_value)
        written.update(ignore_value=int(ignore_value), labelled_slices=painted_slices(np.asarray(data)))
    elif labels.size and not np.isin(np.unique(labels), list(phase_map)).all():
        stray = sorted(set(np.unique(labels).tolist()) - set(phase_map))
        raise VolumeError(f"label values {stray[:5]} are not in the phase map {phase_map}: paint only its values")
    return labels.astype(np.uint8), written


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """napari's writer hook for one Labels layer: a socseg label TIFF (``.tif``) or an OME-Zarr
    label image (``.zarr``), each written beside the target and renamed into place (an
    interrupted save leaves the old file, never half a new one)."""
    target = Path(path)
    labels, record = label_values_of(data, meta)
    if labels.ndim == 2:
        labels = labels[np.newaxis]
    if labels.ndim != 3:
        raise VolumeError(f"{target}: a label stack is 2-D or 3-D, this layer is {labels.ndim}-D")
    source = str(((meta.get("metadata") or {}).get("socseg") or {}).get("source", ""))
    if source and Path(source).exists() and Path(source).resolve() == target.resolve() and target.suffix.lower() in ZARR_SUFFIXES:
        raise VolumeError(f"{target} is the store this layer was read from: save it under another name")
    if target.suffix.lower() in TIFF_SUFFIXES:
        with LabelStackWriter(target, labels.shape, record) as writer:
            writer.write(labels)
    elif target.suffix.lower() in ZARR_SUFFIXES:
        partial = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
        try:
            write_label_store(partial, labels, {int(k): v for k, v in record["phase_map"].items()},
                              {k: v for k, v in record.items() if k != "phase_map"})
            if target.exists():
                old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(target, old)
                os.replace(partial, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(partial, target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    else:
        raise VolumeError(f"{target}: save labels as .tif (a socseg label TIFF) or .zarr (OME-Zarr labels)")
    return [str(target)]

