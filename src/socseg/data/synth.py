"""A synthetic PXCT phantom of a Ni/YSZ cermet with exactly known labels.

Real labelled volumes are scarce (one sample here), so tests, demos and pipeline runs use a
phantom that looks like SOCPristine: three interpenetrating phases with its volume fractions
and grey levels, a Gaussian PSF and Gaussian noise, so that a global threshold is good but not
perfect. Everything is drawn from one seeded ``numpy`` Generator: same arguments, same bytes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import yaml
from scipy import ndimage

from socseg.data.volumes import (
    IMAGE_FILE,
    LABELS_FILE,
    META_FILE,
    Volume,
    VolumeError,
    VolumeMeta,
    normalise_phase_map,
    save_volume,
)
from socseg.params import Params, typed


def _random_field(rng: np.random.Generator, shape: tuple[int, int, int], grain_size: float) -> np.ndarray:
    """Gaussian-correlated noise: thresholding it gives blobby, interconnected grains of ~grain_size."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    return ndimage.gaussian_filter(noise, sigma=grain_size, mode="wrap")


def _phase_labels(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    order: Sequence[int],
    fractions: Sequence[float],
    grain_size: float,
) -> np.ndarray:
    """Assign phases one at a time, each from its own random field thresholded at a quantile.

    Phase k takes the lowest-valued voxels of field k among the voxels not yet assigned, so each
    phase hits its fraction to within ties and forms a connected network when its share is
    above the percolation threshold of a Gaussian field (~0.16 of the volume).
    """
    labels = np.full(shape, order[-1], dtype=np.uint8)
    free = np.ones(shape, dtype=bool)
    remaining = 1.0
    for value, fraction in zip(order[:-1], fractions[:-1]):
        field = _random_field(rng, shape, grain_size)
        share = min(max(fraction / remaining, 0.0), 1.0) if remaining > 0 else 0.0
        candidates = field[free]
        if candidates.size == 0 or share == 0.0:
            continue
        threshold = np.quantile(candidates, share)
        chosen = free & (field <= threshold)
        labels[chosen] = value
        free &= ~chosen
        remaining -= fraction
    return labels


def synth_volume(
    name: str,
    *,
    shape: Sequence[int],
    seed: int,
    fractions: Mapping[str, float],
    grain_size: float,
    grey_levels: Mapping[str, float],
    blur_sigma: float,
    noise_sigma: float,
    phase_map: Mapping[int, str],
) -> Volume:
    """Generate a labelled uint16 phantom (Z, Y, X); labels are the phase map's label values.

    Every setting is required: the values live in params.yaml (:func:`synth_from_params`).
    """
    fractions = dict(fractions)
    grey_levels = dict(grey_levels)
    phase_map = normalise_phase_map(phase_map)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise VolumeError(f"synth shape must be three positive integers (Z, Y, X), got {shape}")
    phases = set(phase_map.values())
    for what, given in (("fractions", fractions), ("grey_levels", grey_levels)):
        if set(given) != phases:
            raise VolumeError(f"synth {what} names {sorted(given)} must match the phase map {sorted(phases)}")
    if any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-3:
        raise VolumeError(f"synth fractions must be >= 0 and sum to 1, got {fractions}")
    if grain_size <= 0 or blur_sigma < 0 or noise_sigma < 0:
        raise VolumeError("synth grain_size must be > 0, blur_sigma and noise_sigma >= 0")

    order = sorted(phase_map)  # label values; fields are drawn in this order
    rng = np.random.default_rng(seed)
    labels = _phase_labels(rng, shape, order, [fractions[phase_map[v]] for v in order], float(grain_size))

    lut = np.zeros(256, dtype=np.float32)
    for value in order:
        lut[value] = grey_levels[phase_map[value]]
    grey = lut[labels]
    if blur_sigma > 0:
        grey = ndimage.gaussian_filter(grey, sigma=float(blur_sigma), mode="nearest")
    if noise_sigma > 0:
        grey += rng.standard_normal(shape, dtype=np.float32) * np.float32(noise_sigma)
    image = np.clip(np.rint(grey), 0, np.iinfo(np.uint16).max).astype(np.uint16)

    settings = {
        "shape": list(shape),
        "seed": int(seed),
        "fractions": {k: float(v) for k, v in fractions.items()},
        "grain_size": float(grain_size),
        "grey_levels": {k: float(v) for k, v in grey_levels.items()},
        "blur_sigma": float(blur_sigma),
        "noise_sigma": float(noise_sigma),
    }
    meta = VolumeMeta(
        name=name,
        shape=shape,  # type: ignore[arg-type]
        image_dtype="uint16",
        phase_map=phase_map,
        source=f"synthetic phantom seed={seed} shape={'x'.join(map(str, shape))} grain_size={grain_size:g}",
        has_labels=True,
        extra={"synth": settings},
    )
    return Volume(image=image, labels=labels, meta=meta)


def synth_from_params(
    params: Mapping[str, Any] | Params,
    name: str,
    shape: Sequence[int] | None = None,
    seed: int | None = None,
) -> Volume:
    """The phantom described by the ``synth`` and ``data.phase_map`` sections of params.yaml;
    ``shape`` and ``seed`` override theirs when given."""
    p = typed(params)
    s = p.synth
    return synth_volume(
        name,
        shape=s.shape if shape is None else shape,
        seed=s.seed if seed is None else int(seed),
        fractions=s.fractions,
        grain_size=s.grain_size,
        grey_levels=s.grey_levels,
        blur_sigma=s.blur_sigma,
        noise_sigma=s.noise_sigma,
        phase_map=p.data.phase_map,
    )


# --------------------------------------------------------------------------- the built-in sample

BUILTIN_SAMPLE = "sample"


def dvc_dir_md5(files: Mapping[str, Path]) -> str:
    """The md5 DVC 3 records for a directory holding ``files`` (relative path -> file).

    DVC hashes a directory as the md5 of the JSON list of ``{"md5", "relpath"}`` of its files,
    sorted by path: computing it here checks a generated sample against ``data.dvc`` without
    running DVC (``mlflow run`` does not need DVC installed).
    """
    entries = [{"md5": hashlib.md5(Path(path).read_bytes()).hexdigest(), "relpath": rel}
               for rel, path in sorted(files.items())]
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def recorded_dvc_md5(dvc_file: str | Path) -> str | None:
    """The directory md5 a ``.dvc`` file records for its single output (``None`` if absent)."""
    record = _dvc_out(dvc_file)
    return str(record.get("md5", "")).removesuffix(".dir") or None


def _dvc_out(dvc_file: str | Path) -> dict[str, Any]:
    """The single ``outs`` entry of a ``.dvc`` file (``{}`` if the file or a single output is absent)."""
    path = Path(dvc_file)
    if not path.is_file():
        return {}
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or []
    return dict(outs[0]) if len(outs) == 1 else {}


def recorded_sample_md5s(dvc_file: str | Path) -> dict[str, str] | None:
    """File md5s (``sample/<name>`` -> md5) that a ``.dvc`` file of a *larger* data folder records
    for the built-in sample, read from the directory manifest in the DVC cache.

    Once users ``dvc add`` their own volumes beside ``sample/``, the directory md5 covers their
    files too and can no longer be recomputed from the sample alone; DVC's ``.dir`` manifest still
    lists each file's md5. ``None`` when the manifest is not in the local cache (before
    ``dvc pull``); ``{}`` when the folder versions no sample.
    """
    md5 = str(_dvc_out(dvc_file).get("md5", ""))
    if not md5.endswith(".dir"):
        return None
    manifest = Path(dvc_file).parent / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    if not manifest.is_file():
        return None
    entries = json.loads(manifest.read_text())
    return {e["relpath"]: e["md5"] for e in entries if e["relpath"].startswith(f"{BUILTIN_SAMPLE}/")}


def materialise_sample(params: Mapping[str, Any], directory: str | Path, check_against: str | None = None) -> Path:
    """Write the built-in phantom to ``directory`` (``<data.dir>/sample``) and check it.

    The sample is made, not downloaded: it is a deterministic function of the code and the
    ``synth`` params. ``check_against`` (default ``synth.check_against``, normally ``data.dvc``)
    names a DVC file that versions the same sample as ``<dir>/sample``: the generated files must
    hash to the md5 it records, so a run on a fresh clone trains on exactly the versioned data.
    On a mismatch nothing is left behind.
    """
    target = Path(directory)
    if check_against is None:
        check_against = typed(params).synth.check_against
    save_volume(synth_from_params(params, BUILTIN_SAMPLE), target, overwrite=True)
    if not check_against:
        return target
    files = {f"{BUILTIN_SAMPLE}/{name}": target / name for name in (IMAGE_FILE, LABELS_FILE, META_FILE)}
    refused = ("the synth params were changed or this machine does not reproduce the phantom bit for bit; "
               "set synth.check_against to '' to use it anyway")
    if _dvc_out(check_against).get("nfiles", len(files)) == len(files):  # the folder holds the sample alone
        expected = recorded_dvc_md5(check_against)
        actual = dvc_dir_md5(files)
        if expected is not None and actual != expected:
            shutil.rmtree(target, ignore_errors=True)
            raise VolumeError(f"the generated sample (md5 {actual}) differs from the one {check_against} versions "
                              f"(md5 {expected}): {refused}")
        return target
    recorded = recorded_sample_md5s(check_against)  # the user's own volumes are versioned beside it
    if recorded is None:
        warnings.warn(f"{check_against} versions more than the built-in sample and its manifest is not in the "
                      "DVC cache (run `dvc pull`): the generated sample is not checked against it", stacklevel=2)
        return target
    differing = sorted(rel for rel, md5 in recorded.items()
                       if rel not in files or hashlib.md5(files[rel].read_bytes()).hexdigest() != md5)
    if differing:
        shutil.rmtree(target, ignore_errors=True)
        raise VolumeError(f"the generated sample differs from the one {check_against} versions "
                          f"({', '.join(differing)}): {refused}")
    return target
