"""Volumes: the in-memory model, the on-disk layout DVC tracks, and import from TIFF slices.

A volume lives in ``DATA_DIR/NAME/``: ``image.tif`` (multi-page, zlib-compressed, axes ZYX),
``labels.tif`` when labelled, and a ``volume.json`` sidecar holding :class:`VolumeMeta`.
Files are written without timestamps so that the same input gives the same bytes and DVC
sees no change, and they are written atomically so a failed import leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import tifffile
from tqdm import tqdm

IMAGE_FILE = "image.tif"
LABELS_FILE = "labels.tif"
META_FILE = "volume.json"
FORMAT = "socseg-volume/1"

IMAGE_DTYPES = ("uint8", "uint16", "float32")

# Show a progress bar only for stacks large enough to take noticeable time.
_PROGRESS_MIN_SLICES = 32
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_LAST_INT_RE = re.compile(r"(\d+)(?!.*\d)")


class VolumeError(ValueError):
    """Bad input for a volume: the message names the file and the problem."""


@dataclass
class VolumeMeta:
    """What ``volume.json`` records: enough to validate the arrays and trace where they came from."""

    name: str
    shape: tuple[int, int, int]
    image_dtype: str
    phase_map: dict[int, str]
    voxel_size_nm: float | None = None
    source: str = ""
    checksums: dict[str, str] = field(default_factory=dict)
    has_labels: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """Deterministic JSON (sorted keys, no timestamps) so DVC hashes stay stable."""
        record = dataclasses.asdict(self)
        record["shape"] = [int(s) for s in self.shape]
        record["phase_map"] = {str(k): v for k, v in sorted(self.phase_map.items())}
        record["format"] = FORMAT
        return json.dumps(record, indent=2, sort_keys=True, default=_json_default) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = META_FILE) -> "VolumeMeta":
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise VolumeError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise VolumeError(f"{where}: expected a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(n for n in ("name", "shape", "image_dtype", "phase_map") if n not in record)
        if missing:
            raise VolumeError(f"{where}: missing keys {missing}")
        values = {k: v for k, v in record.items() if k in names}
        try:
            values["shape"] = tuple(int(s) for s in values["shape"])
            values["phase_map"] = {int(k): str(v) for k, v in values["phase_map"].items()}
        except (TypeError, ValueError, AttributeError) as exc:
            raise VolumeError(f"{where}: bad shape or phase_map ({exc})") from None
        return cls(**values)


@dataclass
class Volume:
    """A grey-value volume (Z, Y, X) and, when labelled, its per-voxel phase labels."""

    image: np.ndarray
    labels: np.ndarray | None
    meta: VolumeMeta

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Cheap structural checks (shapes, dtypes, meta agreement); label values are checked on save/load."""
        if self.image.ndim != 3:
            raise VolumeError(f"volume {self.meta.name!r}: image must be 3-D (Z, Y, X), got {self.image.shape}")
        if self.image.dtype.name not in IMAGE_DTYPES:
            raise VolumeError(
                f"volume {self.meta.name!r}: image dtype {self.image.dtype} not allowed "
                f"(allowed: {', '.join(IMAGE_DTYPES)})"
            )
        if tuple(self.meta.shape) != self.image.shape:
            raise VolumeError(f"volume {self.meta.name!r}: meta shape {self.meta.shape} != image {self.image.shape}")
        if self.meta.image_dtype != self.image.dtype.name:
            raise VolumeError(
                f"volume {self.meta.name!r}: meta dtype {self.meta.image_dtype} != image {self.image.dtype}"
            )
        if self.meta.has_labels != (self.labels is not None):
            raise VolumeError(f"volume {self.meta.name!r}: has_labels={self.meta.has_labels} disagrees with labels")
        if self.labels is not None:
            if self.labels.shape != self.image.shape:
                raise VolumeError(
                    f"volume {self.meta.name!r}: labels shape {self.labels.shape} != image {self.image.shape}"
                )
            if self.labels.dtype != np.uint8:
                raise VolumeError(f"volume {self.meta.name!r}: labels must be uint8, got {self.labels.dtype}")

    @property
    def class_names(self) -> list[str]:
        """Phase names ordered by label value: the class order models and metrics use."""
        return [self.meta.phase_map[v] for v in sorted(self.meta.phase_map)]

    def class_index(self, z: slice | None = None) -> np.ndarray:
        """Labels (of slices ``z``, default all) mapped to 0..n-1 in label-value order."""
        if self.labels is None:
            raise VolumeError(f"volume {self.meta.name!r} has no labels")
        labels = self.labels if z is None else self.labels[z]
        return label_lut(self.meta.phase_map)[np.asarray(labels)]

    def phase_fractions(self) -> dict[str, float]:
        """Volume fraction of each phase, by name (label-value order)."""
        if self.labels is None:
            raise VolumeError(f"volume {self.meta.name!r} has no labels")
        counts = np.bincount(np.asarray(self.labels).ravel(), minlength=256)
        total = max(int(counts.sum()), 1)
        return {self.meta.phase_map[v]: float(counts[v]) / total for v in sorted(self.meta.phase_map)}


# --------------------------------------------------------------------------- helpers


def label_lut(label_values: Iterable[int]) -> np.ndarray:
    """256-entry lookup table: uint8 label value -> its index among the sorted ``label_values``."""
    lut = np.zeros(256, dtype=np.uint8)
    for index, value in enumerate(sorted(int(v) for v in label_values)):
        lut[value] = index
    return lut


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set):
        return sorted(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _combined_sha256(digests: Iterable[str]) -> str:
    """One checksum for many source files: sha256 over their sorted per-file sha256s."""
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()


def _label_values(labels: np.ndarray) -> set[int]:
    counts = np.bincount(np.asarray(labels, dtype=np.uint8).ravel(), minlength=256)
    return {int(v) for v in np.flatnonzero(counts)}


def _check_label_values(labels: np.ndarray, phase_map: dict[int, str], where: str) -> None:
    bad = sorted(_label_values(labels) - set(phase_map))
    if bad:
        raise VolumeError(f"{where}: label values {bad} not in phase map {format_phase_map(phase_map)}")


def format_phase_map(phase_map: dict[int, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(phase_map.items()))


def parse_phase_map(text: str) -> dict[int, str]:
    """Parse ``"0=pore,128=ysz,255=ni"``: label values 0-255, unique values and names."""
    phase_map: dict[int, str] = {}
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items:
        raise VolumeError(f"empty phase map {text!r}: expected e.g. 0=pore,128=ysz,255=ni")
    for item in items:
        value, sep, name = item.partition("=")
        value, name = value.strip(), name.strip()
        if not sep or not name or not value.lstrip("-").isdigit():
            raise VolumeError(f"bad phase map entry {item!r} in {text!r}: expected VALUE=NAME, e.g. 128=ysz")
        label = int(value)
        if not 0 <= label <= 255:
            raise VolumeError(f"bad phase map entry {item!r}: label value must be 0-255")
        if label in phase_map:
            raise VolumeError(f"phase map {text!r} repeats label value {label}")
        if name in phase_map.values():
            raise VolumeError(f"phase map {text!r} repeats phase name {name!r}")
        phase_map[label] = name
    return dict(sorted(phase_map.items()))


def normalise_phase_map(phase_map: dict[Any, Any]) -> dict[int, str]:
    """Accept a phase map from YAML/JSON (keys may be strings) and validate it like the text form."""
    return parse_phase_map(",".join(f"{k}={v}" for k, v in dict(phase_map).items()))


def volume_dir(name: str, data_dir: str | os.PathLike) -> Path:
    """``DATA_DIR/NAME``; the name must be a plain folder name so it cannot escape DATA_DIR."""
    if not _NAME_RE.match(name or ""):
        raise VolumeError(
            f"bad volume name {name!r}: use letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return Path(data_dir) / name


# --------------------------------------------------------------------------- storage


def _write_tiff(path: Path, array: np.ndarray) -> None:
    # photometric must be explicit: tifffile would take a (3|4, Y, X) stack for one RGB(A) image.
    # Horizontal differencing shrinks integer grey images; no datetime tag -> deterministic bytes.
    predictor = array.dtype.kind in "ui" and array.dtype != np.uint8
    tifffile.imwrite(
        path,
        np.ascontiguousarray(array),
        photometric="minisblack",
        compression="zlib",
        predictor=predictor,
        metadata={"axes": "ZYX"},
    )


def save_volume(volume: Volume, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``image.tif``, ``labels.tif`` and ``volume.json`` into ``directory`` atomically.

    Everything is written into a hidden sibling directory first and moved into place with
    ``os.replace``; on any error the sibling is removed, so no partial volume is ever visible.
    Returns the directory. The stored files' sha256 are added to ``volume.meta.checksums``.
    """
    target = Path(directory)
    volume.validate()  # the arrays or meta may have been changed since construction
    if target.exists() and not overwrite:
        raise VolumeError(f"{target} already exists (use overwrite to replace it)")
    if volume.labels is not None:
        _check_label_values(volume.labels, volume.meta.phase_map, f"volume {volume.meta.name!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    staging = target.parent / f".{target.name}.partial-{token}"
    backup = target.parent / f".{target.name}.old-{token}"
    staging.mkdir()
    try:
        checksums = {k: v for k, v in volume.meta.checksums.items() if k not in (IMAGE_FILE, LABELS_FILE)}
        _write_tiff(staging / IMAGE_FILE, volume.image)
        checksums[IMAGE_FILE] = _sha256_file(staging / IMAGE_FILE)
        if volume.labels is not None:
            _write_tiff(staging / LABELS_FILE, volume.labels)
            checksums[LABELS_FILE] = _sha256_file(staging / LABELS_FILE)
        meta = dataclasses.replace(volume.meta, checksums=checksums)
        (staging / META_FILE).write_text(meta.to_json())
        if target.exists():
            os.replace(target, backup)
            try:
                os.replace(staging, target)
            except BaseException:
                os.replace(backup, target)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    volume.meta = meta
    return target


def read_stored_tiff(path: Path, mmap: bool) -> np.ndarray:
    """Read a stored stack; with ``mmap`` decode page by page into a disk-backed array.

    The stored files are compressed, so they cannot be mapped directly; decoding into an
    anonymous temporary file keeps a large volume out of RAM at the cost of disk space.
    """
    try:
        with tifffile.TiffFile(path) as tif:
            if not mmap:
                array = tif.asarray()
                return array[np.newaxis] if array.ndim == 2 else array
            pages = tif.pages
            first = pages[0]
            shape = (len(pages), *first.shape)
            with tempfile.TemporaryFile(prefix="socseg-", suffix=".raw") as backing:
                array = np.memmap(backing, dtype=first.dtype, mode="w+", shape=shape)  # mmap outlives the fd
            for index, page in enumerate(pages):
                array[index] = page.asarray()
            return array
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise VolumeError(f"cannot read {path}: {exc}") from None


def load_volume(directory: str | os.PathLike, mmap: bool = False, verify: bool = True) -> Volume:
    """Load a stored volume and check its files against the sidecar.

    ``verify`` also compares each file's sha256 with ``volume.json`` (catches a stale or
    hand-edited file; costs one extra read). ``mmap`` keeps the arrays on disk (see above).
    """
    root = Path(directory)
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise VolumeError(f"{root}: no {META_FILE} (not a socseg volume directory)")
    meta = VolumeMeta.from_json(meta_path.read_text(), str(meta_path))
    files = [IMAGE_FILE] + ([LABELS_FILE] if meta.has_labels else [])
    for name in files:
        path = root / name
        if not path.is_file():
            raise VolumeError(f"{path}: missing (listed by {meta_path})")
        if verify and name in meta.checksums and _sha256_file(path) != meta.checksums[name]:
            raise VolumeError(f"{path}: sha256 differs from {meta_path} (file changed after it was written)")
    image = read_stored_tiff(root / IMAGE_FILE, mmap)
    labels = read_stored_tiff(root / LABELS_FILE, mmap) if meta.has_labels else None
    if image.shape != tuple(meta.shape) or image.dtype.name != meta.image_dtype:
        raise VolumeError(
            f"{root / IMAGE_FILE}: {image.shape} {image.dtype} but {meta_path} says {tuple(meta.shape)} "
            f"{meta.image_dtype}"
        )
    if labels is not None:
        if labels.shape != image.shape or labels.dtype != np.uint8:
            raise VolumeError(f"{root / LABELS_FILE}: {labels.shape} {labels.dtype}, expected {image.shape} uint8")
        _check_label_values(labels, meta.phase_map, str(root / LABELS_FILE))
    return Volume(image=image, labels=labels, meta=meta)


# --------------------------------------------------------------------------- import


def _slice_index(path: Path) -> int | None:
    """The last integer in the file name: SOCprist0001.tiff and slice__001.tif are both slice 1."""
    match = _LAST_INT_RE.search(path.stem)
    return int(match.group(1)) if match else None


def slices_by_index(paths: Sequence[Path], what: str) -> list[tuple[int, Path]]:
    """Order files by slice number (natural sort); a missing or repeated number is an error."""
    if len(paths) == 1:
        return [(_slice_index(paths[0]) or 0, paths[0])]
    indexed: dict[int, Path] = {}
    for path in sorted(paths):
        index = _slice_index(path)
        if index is None:
            raise VolumeError(f"{path}: no slice number in the file name (needed to order and pair slices)")
        if index in indexed:
            raise VolumeError(f"{what} files {indexed[index].name} and {path.name} have the same slice number {index}")
        indexed[index] = path
    return sorted(indexed.items())


def _glob_files(pattern: str, what: str) -> list[tuple[int, Path]]:
    paths = [Path(p) for p in glob(os.path.expanduser(pattern)) if Path(p).is_file()]
    if not paths:
        raise VolumeError(f"no {what} files matched {pattern!r}")
    return slices_by_index(paths, what)


def read_slice_file(path: Path) -> tuple[np.ndarray, str]:
    """Read one TIFF file, returning the array and the sha256 of its bytes (one disk read)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise VolumeError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        with tifffile.TiffFile(io.BytesIO(raw)) as tif:
            if not tif.pages:  # tifffile only warns about a broken first-page offset
                raise ValueError("no readable image pages")
            photometric, samples = page_colour(tif.pages[0])
            array = np.asarray(tif.asarray())
    except Exception as exc:  # corrupt/truncated/not a TIFF: tifffile raises many types
        raise VolumeError(f"{path}: not a readable TIFF ({type(exc).__name__}: {exc})") from None
    if array.size == 0:
        raise VolumeError(f"{path}: not a readable TIFF (empty image)")
    check_not_colour(path, array.shape, photometric, samples)
    return array.astype(array.dtype.newbyteorder("="), copy=False), hashlib.sha256(raw).hexdigest()


# Photometric interpretations whose pixels are colours (tifffile decodes YCbCr to RGB).
_COLOUR_PHOTOMETRIC = ("RGB", "YCBCR", "CIELAB", "ICCLAB", "ITULAB", "SEPARATED")


def page_colour(page: Any) -> tuple[str, int]:
    """(photometric name, samples per pixel) of a tifffile page, ``("", 1)`` where unknown."""
    photometric = getattr(page, "photometric", None)
    name = getattr(photometric, "name", "") or ""
    try:
        samples = int(getattr(page, "samplesperpixel", 1) or 1)
    except (TypeError, ValueError):
        samples = 1
    return str(name).upper(), samples


def check_not_colour(path: str | os.PathLike, shape: Sequence[int], photometric: str = "", samples: int = 1) -> None:
    """Refuse a colour (RGB/RGBA) image, which would otherwise pass for a stack of H slices of
    W x 3 pixels. The TIFF's own description (photometric RGB, 3 or 4 samples per pixel) decides
    where it says so; otherwise a 3-D shape whose last axis is 3 or 4 (slices 3 or 4 pixels wide
    are no PXCT data) is taken for one."""
    shape = tuple(int(s) for s in shape)
    by_tags = photometric in _COLOUR_PHOTOMETRIC or samples in (3, 4)
    by_shape = len(shape) == 3 and shape[-1] in (3, 4) and shape[-2] > shape[-1]
    if not (by_tags or by_shape):
        return
    alpha = samples == 4 if samples in (3, 4) else shape[-1] == 4
    kind = "RGBA" if alpha else "RGB"
    detail = (
        f"photometric {photometric or 'unknown'}, {samples} samples per pixel"
        if by_tags
        else f"{shape[-1]} values per pixel along the last axis"
    )
    raise VolumeError(
        f"{path}: an {kind} image {shape}, not a grey-value slice stack ({detail}): convert it to greyscale "
        "(one uint8, uint16 or float32 grey value per pixel) and try again"
    )


def check_image_array(array: np.ndarray, path: Path) -> None:
    if array.dtype.name not in IMAGE_DTYPES:
        raise VolumeError(f"{path}: image dtype {array.dtype} not allowed (allowed: {', '.join(IMAGE_DTYPES)})")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise VolumeError(f"{path}: image holds NaN or infinite values")


def _check_label_array(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype.kind not in "ui":
        raise VolumeError(f"{path}: label dtype {array.dtype} must be an integer type fitting uint8")
    if array.dtype != np.uint8 and array.size and (array.min() < 0 or array.max() > 255):
        raise VolumeError(f"{path}: label values {int(array.min())}..{int(array.max())} do not fit uint8 (0-255)")
    return array.astype(np.uint8, copy=False)


def read_slices(
    files: Sequence[Path], what: str, labels: bool = False, like: tuple[Path, tuple[int, ...]] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Stack 2-D slices (or one 3-D stack) into (Z, Y, X), checking dtype and shape per file.

    ``like`` = (file, slice shape) of the images, so a label slice of another shape is named.
    """
    stack: np.ndarray | None = None
    digests: list[str] = []
    quiet = True if len(files) < _PROGRESS_MIN_SLICES else None  # None: tqdm shows a bar on a terminal only
    with tqdm(files, desc=f"reading {what}", unit="slice", disable=quiet) as bar:
        for z, path in enumerate(bar):
            array, digest = read_slice_file(path)
            digests.append(digest)
            if labels:
                array = _check_label_array(array, path)
            else:
                check_image_array(array, path)
            if array.ndim == 3 and len(files) == 1:
                return array, digests
            if array.ndim != 2:
                raise VolumeError(f"{path}: expected one 2-D grey slice, got shape {array.shape}")
            if like is not None and array.shape != like[1][-2:]:
                raise VolumeError(f"{path}: label slice is {array.shape} but image {like[0].name} is {like[1][-2:]}")
            if stack is None:
                stack = np.empty((len(files), *array.shape), dtype=array.dtype)
                first = path
            elif array.shape != stack.shape[1:] or array.dtype != stack.dtype:
                raise VolumeError(
                    f"{path}: slice is {array.shape} {array.dtype} but {first.name} is {stack.shape[1:]} {stack.dtype}"
                )
            stack[z] = array
    assert stack is not None
    return stack, digests


def _pair(images: list[tuple[int, Path]], labels: list[tuple[int, Path]], image_glob: str, label_glob: str) -> None:
    image_ids = [i for i, _ in images]
    label_ids = [i for i, _ in labels]
    if image_ids == label_ids:
        return

    def brief(ids: Iterable[int]) -> str:
        ids = sorted(ids)
        return str(ids if len(ids) <= 10 else ids[:10] + ["..."])

    only_images = set(image_ids) - set(label_ids)
    only_labels = set(label_ids) - set(image_ids)
    raise VolumeError(
        f"image and label slices do not pair: {len(images)} images ({image_glob!r}) vs {len(labels)} labels "
        f"({label_glob!r}); slice numbers only in images: {brief(only_images)}, only in labels: {brief(only_labels)}"
    )


def import_slices(
    name: str,
    images: str,
    labels: str | None,
    phase_map: Mapping[int, str],
    voxel_size_nm: float | None = None,
) -> Volume:
    """Read TIFF slices matched by glob patterns into a validated :class:`Volume` (writes nothing).

    Image and label files are paired by slice number (the last integer in the file name), so
    ``SOCprist0001.tiff`` pairs with ``slice__001.tif``. Any problem raises :class:`VolumeError`
    before anything is written.
    """
    volume_dir(name, ".")  # validate the name early, before reading anything
    phase_map = normalise_phase_map(phase_map)
    image_files = _glob_files(images, "image")
    label_files = _glob_files(labels, "label") if labels is not None else None
    if label_files is not None:
        _pair(image_files, label_files, images, labels)
    image, image_digests = read_slices([p for _, p in image_files], "images")
    checksums = {"source_images": _combined_sha256(image_digests)}
    label_stack = None
    source = f"images={images}"
    if label_files is not None:
        label_stack, label_digests = read_slices(
            [p for _, p in label_files], "labels", labels=True, like=(image_files[0][1], image.shape)
        )
        checksums["source_labels"] = _combined_sha256(label_digests)
        source += f" labels={labels}"
        if label_stack.shape != image.shape:
            raise VolumeError(
                f"{label_files[0][1]}: labels {label_stack.shape} differ from images {image.shape} "
                f"({image_files[0][1].name})"
            )
        bad = sorted(_label_values(label_stack) - set(phase_map))
        if bad:
            first = next(p for z, (_, p) in enumerate(label_files) if _label_values(label_stack[z]) - set(phase_map))
            raise VolumeError(
                f"label values {bad} not in phase map {format_phase_map(phase_map)} (first in {first})"
            )
    indices = [i for i, _ in image_files]
    extra: dict[str, Any] = {"slices": len(indices), "first_index": indices[0], "last_index": indices[-1]}
    gaps = sorted(set(range(indices[0], indices[-1] + 1)) - set(indices))
    if gaps:
        extra["missing_indices"] = gaps[:50]
    meta = VolumeMeta(
        name=name,
        shape=tuple(int(s) for s in image.shape),  # type: ignore[arg-type]
        image_dtype=image.dtype.name,
        phase_map=phase_map,
        voxel_size_nm=None if voxel_size_nm is None else float(voxel_size_nm),
        source=source,
        checksums=checksums,
        has_labels=label_stack is not None,
        extra=extra,
    )
    return Volume(image=image, labels=label_stack, meta=meta)

