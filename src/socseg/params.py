"""Parameters: one ``params.yaml`` read by DVC and by socseg, and the typed schema it must fit.

Lookup order: an explicit path, ``$SOCSEG_PARAMS``, ``./params.yaml``, then the copy shipped
inside the package (so an installed ``socseg`` works outside the repository).
Values given on the command line override single keys via :func:`override`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

PARAMS_ENV = "SOCSEG_PARAMS"


def params_path(path: str | os.PathLike | None = None) -> Path | None:
    """Where params come from; ``None`` means the packaged defaults."""
    if path is not None:
        return Path(path)
    if os.environ.get(PARAMS_ENV):
        return Path(os.environ[PARAMS_ENV])
    local = Path.cwd() / "params.yaml"
    return local if local.is_file() else None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: plain YAML keeps the last one
    silently, so a setting pasted twice would be read from a line the user may not be looking at."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ValueError(f"params: key {key!r} is given twice in one section (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_params(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Load the parameter tree (a plain nested dict); a key given twice in a section is refused."""
    source = params_path(path)
    if source is None:
        text = resources.files("socseg").joinpath("defaults/params.yaml").read_text()
    else:
        if not source.is_file():
            raise FileNotFoundError(f"params file not found: {source}")
        text = source.read_text()
    params = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    if not isinstance(params, dict):
        raise ValueError(f"params file {source} must hold a mapping at top level")
    return params


def override(params: Mapping[str, Any], section: str, **values: Any) -> dict[str, Any]:
    """Return a copy of ``params`` with ``params[section][key] = value`` for each non-None value."""
    updated = copy.deepcopy(dict(params))
    target = updated.setdefault(section, {})
    for key, value in values.items():
        if value is not None:
            target[key] = value
    return updated


def set_dotted(params: dict[str, Any], dotted: str, value: Any) -> None:
    """``set_dotted(p, "tiles.augment.intensity_jitter", 0.1)``: set a nested value in place.

    The first part must name an existing section, so a typo fails instead of adding a section nobody reads.
    """
    *parents, leaf = dotted.split(".")
    if not parents or not leaf or parents[0] not in params:
        raise KeyError(f"{dotted!r}: expected SECTION.KEY with SECTION one of {', '.join(params)} (KEY may be dotted)")
    node = params
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def parse_bool(value: Any) -> bool:
    """Accept the spellings MLflow/DVC parameters arrive in ("true", "False", 1, ...)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "y", "on"}:
        return True
    if text in {"0", "false", "no", "n", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {value!r}")


# --------------------------------------------------------------------------- the typed schema
#
# Every setting socseg reads is a field below, with no default: the values live in params.yaml
# alone (the packaged copy for an installed socseg). ``Params.from_dict`` checks the tree a run
# uses (after command-line overrides and a search trial's samples) and names what is missing,
# unknown, of the wrong type or not one of the choices. Click options (``socseg train``) are made
# from these fields and the MLproject's parameters are tested against them.

ENCODERS = ("vgg16", "resnet50", "unet")
WINDOWS = ("whole_slice", "sliding")
NORMALISATION_MODES = ("fixed", "per_volume")


def check_step_fraction(value: Any) -> float:
    """A sliding-window step (fraction of the tile) in (0, 1]: the one check of it, wherever it comes from."""
    try:
        step = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"step_fraction must be a number in (0, 1], got {value!r}") from None
    if not 0.0 < step <= 1.0:
        raise ValueError(f"step_fraction must be in (0, 1], got {value}")
    return step


# Beyond ~3 pixels the smoothing erases phase features a few voxels wide (Ni necks, thin YSZ).
MAX_SMOOTHING_SIGMA = 3.0


def check_smoothing_sigma(value: Any) -> float:
    """The in-plane Gaussian sigma (pixels) of the probability smoothing, in [0, MAX_SMOOTHING_SIGMA]."""
    try:
        sigma = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"smoothing_sigma must be a number of pixels in [0, {MAX_SMOOTHING_SIGMA:g}], got {value!r}") from None
    if not 0.0 <= sigma <= MAX_SMOOTHING_SIGMA:
        raise ValueError(f"smoothing_sigma must be in [0, {MAX_SMOOTHING_SIGMA:g}] pixels, got {value}")
    return sigma


PLANE_AXES = "zyx"


def check_planes(value: Any) -> str:
    """The planes a volume is predicted in and averaged over: distinct letters of ``zyx``, given in
    any order and returned in ``zyx`` order ("z": slice by slice; "zyx": multi-axis fusion)."""
    text = str(value).strip().lower() if value is not None else ""
    letters = set(text)
    if not text or not letters <= set(PLANE_AXES) or len(letters) != len(text):
        raise ValueError(f"planes must be distinct letters of 'zyx' (e.g. z or zyx), got {value!r}")
    return "".join(a for a in PLANE_AXES if a in letters)


def check_window(value: str) -> str:
    """An inference window name: one of :data:`WINDOWS`."""
    if value not in WINDOWS:
        raise ValueError(f"unknown window {value!r}: use one of {', '.join(WINDOWS)}")
    return value
TASKS = ("ni", "phases")
LOSSES = ("ce", "dice", "ce_dice", "focal", "boundary_ce_dice")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
AUTO = "auto"
RUNTIMES = (AUTO, "keras", "openvino")  # socseg.inference.runtime
ENCODER_BATCHNORM = (AUTO, "true", "false")


class ParamsError(ValueError):
    """A params tree that does not fit the schema; the message names the key."""


def _help(text: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(metadata={"help": text, "choices": choices})


def _convert(value: Any, kind: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    try:
        if origin in (typing.Union, types.UnionType):  # ``X | None``: null in params.yaml is None
            (inner,) = [a for a in typing.get_args(kind) if a is not type(None)]
            return None if value is None else _convert(value, inner, where)
        if dataclasses.is_dataclass(kind):
            return _build(kind, value, where)
        if kind is bool:
            return parse_bool(value)
        if kind in (int, float, str):
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(f"not a whole number: {value!r}")
            if kind is not str and isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            return kind(value) if kind is not int else int(float(value)) if isinstance(value, str) else int(value)
        if origin in (list, tuple):
            (inner, *_) = typing.get_args(kind)
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"expected a list, got {value!r}")
            items = [_convert(v, inner, f"{where}[{k}]") for k, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
        if origin is dict:
            key_type, value_type = typing.get_args(kind)
            if not isinstance(value, Mapping):
                raise ValueError(f"expected a mapping, got {value!r}")
            return {_convert(k, key_type, where): (v if value_type is Any else _convert(v, value_type, f"{where}.{k}"))
                    for k, v in value.items()}
    except ParamsError:
        raise
    except (TypeError, ValueError) as error:
        raise ParamsError(f"{where}: {error}") from None
    raise TypeError(f"schema type {kind!r} not handled")  # pragma: no cover


def _build(cls: type, tree: Any, where: str) -> Any:
    if not isinstance(tree, Mapping):
        raise ParamsError(f"{where}: expected a mapping, got {tree!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(tree) - set(names))
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} (known: {', '.join(names)})")
    missing = [n for n in names if n not in tree]
    if missing:
        raise ParamsError(f"{where}: missing {', '.join(missing)} (params.yaml holds every setting)")
    values = {}
    for f in dataclasses.fields(cls):
        value = _convert(tree[f.name], hints[f.name], f"{where}.{f.name}")
        choices = f.metadata.get("choices")
        if choices and value not in choices and not (f.metadata.get("or_path") and value):
            raise ParamsError(f"{where}.{f.name}: {value!r} is not one of {', '.join(choices)}")
        values[f.name] = value
    return cls(**values)


@dataclass(frozen=True)
class DataParams:
    dir: str = _help("folder with one sub-folder per volume (samples: the built-in sample; data: yours)")
    volumes: list[str] = _help("labelled volumes used for training and evaluation")
    phase_map: dict[int, str] = _help("label value -> phase name")


@dataclass(frozen=True)
class SynthParams:
    shape: tuple[int, ...] = _help("Z, Y, X of the phantom")
    seed: int = _help("phantom seed")
    fractions: dict[str, float] = _help("volume fraction per phase")
    grain_size: float = _help("Gaussian correlation length of the phase fields (voxels)")
    grey_levels: dict[str, float] = _help("mean grey value per phase")
    blur_sigma: float = _help("PSF of the reconstruction (voxels)")
    noise_sigma: float = _help("grey-value noise")
    check_against: str = _help("DVC file whose md5 the generated sample must match ('' = no check)")


@dataclass(frozen=True)
class SplitParams:
    train: float = _help("fraction of slices in the training slab")
    val: float = _help("fraction of slices in the validation slab")
    test: float = _help("fraction of slices in the test slab")
    gap: int = _help("slices left out between slabs")


@dataclass(frozen=True)
class NormaliseParams:
    mode: str = _help("fixed: the training slab's grey range, stored in the model; per_volume: each volume's own "
                      "grey range (training volumes and scans to segment), so another dtype or a rescaled scan "
                      "gets the same labels", NORMALISATION_MODES)
    low_percentile: float = _help("grey value mapped to 0, as a percentile of the training slab (per_volume: of each volume)")
    high_percentile: float = _help("grey value mapped to 1")


@dataclass(frozen=True)
class AugmentParams:
    flips: bool = _help("random flips")
    rot90: bool = _help("random quarter turns")
    intensity_jitter: float = _help("+- scale and offset on normalised grey values")


@dataclass(frozen=True)
class TilesParams:
    size: int = _help("crop/tile edge in pixels (multiple of 32)")
    steps_per_epoch: int = _help("random training batches per epoch")
    augment: AugmentParams = _help("training augmentation")


@dataclass(frozen=True)
class TrainParams:
    encoder: str = _help("U-Net encoder", ENCODERS)
    task: str = _help("ni: Ni vs rest; phases: pore/YSZ/Ni", TASKS)
    epochs: int = _help("training epochs")
    batch_size: int = _help("crops per batch")
    learning_rate: float = _help("Adam learning rate")
    dropout: float = _help("decoder dropout")
    loss: str = _help("training loss", LOSSES)
    precision: str = _help("auto: bf16 on a GPU or CPU that does it natively and faster (a CPU with AVX512-BF16 "
                                 "but no AMX: measured once per machine), else float32", (AUTO, *PRECISIONS))
    encoder_weights: str = field(metadata={"help": "imagenet | none | path to a local weights file",
                                           "choices": ("imagenet", "none"), "or_path": True})
    encoder_batchnorm: str = _help("VGG16 only: BatchNorm after each conv (auto: when training from scratch)",
                                   ENCODER_BATCHNORM)
    bn_momentum: float = _help("BatchNorm moving-average momentum")
    freeze_encoder: bool = _help("keep a pretrained encoder frozen")
    unfreeze_after: int = _help("with freeze_encoder: unfreeze after N epochs (0: stay frozen)")
    fine_tune_lr_factor: float = _help("learning-rate factor once the encoder is unfrozen")
    base_filters: int = _help("from-scratch U-Net width")
    context_slices: int = _help("2.5D: neighbouring slices on each side given as extra channels (0: 2-D)")
    patience: int = _help("early-stopping patience (epochs) on validation mean IoU")
    reduce_lr_patience: int = _help("lower the learning rate after N epochs without validation gain (0: never)")
    reduce_lr_factor: float = _help("learning-rate factor of each reduction")
    max_minutes: float = _help("wall-clock budget of the training loop in minutes (0: none); no epoch starts that would overrun it")
    eager_max_steps: int = _help("a training of at most this many steps (epochs x steps_per_epoch) runs eagerly: "
                                 "tracing the step into a graph costs seconds, more than a few steps gain (0: always a graph)")
    seed: int = _help("random seed")


@dataclass(frozen=True)
class PrunerParams:
    n_startup_trials: int = _help("trials before pruning starts")
    n_warmup_steps: int = _help("epochs before a trial can be pruned")


@dataclass(frozen=True)
class SearchParams:
    study_name: str = _help("study name; {task}, {encoder}, {identity} are filled in")
    storage: str = _help("Optuna RDB URL")
    n_trials: int = _help("finished trials the study should hold")
    timeout: float = _help("seconds for this invocation (0: none)")
    encoders: list[str] = _help("encoders searched with encoder=all")
    sampler_seed: int = _help("TPE sampler seed")
    pruner: PrunerParams = _help("median pruner")
    heartbeat_interval: int = _help("seconds between a trial's heartbeats")
    grace_period: int = _help("seconds after which a silent trial is failed and retried")
    space: dict[str, Any] = _help("dotted params path -> distribution")

    def __post_init__(self) -> None:
        bad = [e for e in self.encoders if e not in ENCODERS]
        if bad:
            raise ParamsError(f"params.search.encoders: {', '.join(bad)} not among {', '.join(ENCODERS)}")


@dataclass(frozen=True)
class RegistryParams:
    model_name: str = _help("registered model name; {task} is the model's task")
    metric: str = _help("test metric the champion gate compares")
    promotion_lock: str = _help("auto | postgresql:// URL | folder: where promotions of one model take turns")
    promotion_lock_timeout: float = _help("seconds to wait for another promotion of the same model")
    tpb_tolerance: float | None = _help("3-phase models: not promoted if their |TPB density error| on the test "
                                        "labels exceeds the champion's by more than this (0.03: 3 points); a search "
                                        "picks its best trial among those within it of the least val error; null: "
                                        "the metric alone")

    def __post_init__(self) -> None:
        if not self.promotion_lock_timeout > 0:
            raise ParamsError(f"params.registry.promotion_lock_timeout must be > 0 seconds, got {self.promotion_lock_timeout}")
        if self.tpb_tolerance is not None and not self.tpb_tolerance >= 0:
            raise ParamsError(f"params.registry.tpb_tolerance must be >= 0 or null, got {self.tpb_tolerance}")


@dataclass(frozen=True)
class FinetuneParams:
    epochs: int = _help("fine-tuning epochs (no validation slices: all are run, the last epoch's weights kept)")
    steps_per_epoch: int = _help("random batches per epoch, crops drawn around labelled pixels")
    learning_rate: float = _help("Adam learning rate (below training's: the parent's weights are a good start)")
    freeze_encoder: bool = _help("keep the parent's encoder frozen; train the decoder only")
    ignore_value: int = _help("label value of unlabelled pixels in a sparse label stack; must not be a phase-map value")
    test_fraction: float = _help("fraction of the labelled slices held out to score and gate the result (>= 1 "
                                 "slice with 2 or more labelled); 0: none, every labelled slice trains and the "
                                 "result is registered as challenger without a gate")
    max_minutes: float = _help("wall-clock budget of the fine-tuning loop in minutes (0: none)")

    def __post_init__(self) -> None:
        if not 0 <= self.ignore_value <= 255:
            raise ParamsError(f"params.finetune.ignore_value must be a uint8 label value 0-255, got {self.ignore_value}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ParamsError(f"params.finetune.test_fraction must be in [0, 1), got {self.test_fraction}")
        if self.epochs < 1 or self.steps_per_epoch < 1:
            raise ParamsError("params.finetune.epochs and steps_per_epoch must be >= 1")


@dataclass(frozen=True)
class MlflowParams:
    tracking_uri: str = _help("MLflow tracking URI ($MLFLOW_TRACKING_URI wins)")
    experiment: str = _help("MLflow experiment")


@dataclass(frozen=True)
class InferenceParams:
    window: str = _help("whole_slice: one pass per slice; sliding: overlapping training-size tiles", WINDOWS)
    whole_slice_max_pixels: int = _help("larger slices (after padding) take the sliding window")
    step_fraction: float = _help("sliding-window step as a fraction of the tile")
    tta: bool = _help("8-fold flip/rotation test-time augmentation")
    smoothing_sigma: float = _help("in-plane Gaussian sigma (pixels) on the class probabilities before the argmax; 0: none")
    planes: str = _help("planes predicted and averaged: z (slice by slice) or zyx (multi-axis fusion), any of z, y, x")
    fusion_depth: int = _help("with y or x in planes: slices per streamed chunk and per REST request")
    fusion_halo: int = _help("with y or x in planes: grey slices read on either side of a chunk for the y and x planes")
    batch_size: int = _help("tiles per forward pass")
    slice_batch: int = _help("slices per streamed chunk and per REST request")
    chunk_depth: int = _help("slices per z-chunk of a Zarr output: one task of a (Dask) run")
    max_slice_pixels: int = _help("largest slice the served model accepts")
    max_clipped_fraction: float = _help("refuse input with more pixels than this outside the model's grey range")
    runtime: str = _help("what runs the forward passes: auto (OpenVINO on a CPU where installed, else Keras) | keras | openvino",
                         RUNTIMES)

    def __post_init__(self) -> None:
        if self.whole_slice_max_pixels < 0:
            raise ParamsError(f"params.inference.whole_slice_max_pixels must be >= 0, got {self.whole_slice_max_pixels}")
        try:
            check_step_fraction(self.step_fraction)
        except ValueError as error:
            raise ParamsError(f"params.inference.{error}") from None
        try:
            check_smoothing_sigma(self.smoothing_sigma)
        except ValueError as error:
            raise ParamsError(f"params.inference.{error}") from None
        try:
            object.__setattr__(self, "planes", check_planes(self.planes))
        except ValueError as error:
            raise ParamsError(f"params.inference.{error}") from None
        if self.fusion_depth < 1:
            raise ParamsError(f"params.inference.fusion_depth must be >= 1, got {self.fusion_depth}")
        if self.fusion_halo < 0:
            raise ParamsError(f"params.inference.fusion_halo must be >= 0, got {self.fusion_halo}")
        if self.chunk_depth < 1:
            raise ParamsError(f"params.inference.chunk_depth must be >= 1, got {self.chunk_depth}")
        if not 0.0 < self.max_clipped_fraction <= 1.0:
            raise ParamsError(f"params.inference.max_clipped_fraction must be in (0, 1], got {self.max_clipped_fraction}")


@dataclass(frozen=True)
class Params:
    """The whole of params.yaml, typed."""

    data: DataParams
    synth: SynthParams
    split: SplitParams
    normalise: NormaliseParams
    tiles: TilesParams
    train: TrainParams
    search: SearchParams
    registry: RegistryParams
    finetune: FinetuneParams
    mlflow: MlflowParams
    inference: InferenceParams

    @classmethod
    def from_dict(cls, tree: Mapping[str, Any]) -> "Params":
        return _build(cls, tree, "params")


def typed(params: "Mapping[str, Any] | Params") -> Params:
    """``params`` as :class:`Params` (a tree is checked against the schema; a Params passes through)."""
    return params if isinstance(params, Params) else Params.from_dict(params)
