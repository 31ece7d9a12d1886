"""U-Net builders: VGG16 / ResNet50 encoders from ``keras.applications`` or a small from-scratch U-Net.

Backend-agnostic Keras 3 only (no TensorFlow imports), so the same models train under
``KERAS_BACKEND=jax`` on a GPU. Every model takes normalised grey values ``(batch, H, W, in_channels)``
with H, W multiples of 32 and returns float32 probabilities ``(batch, H, W, task.n_outputs(n_classes))``,
even under a mixed precision policy.

The encoder sits in the model as a nested sub-model named ``"encoder"``
(``model.get_layer("encoder")``), so it can be frozen or unfrozen later as one block.
"""

from __future__ import annotations

import os

import keras
import numpy as np
from keras import layers, ops

from socseg.data.context import n_channels
from socseg.data.tasks import Task, get_task
from socseg.params import ENCODERS

# Mean pixel of ImageNet in BGR order: the "caffe" preprocessing VGG16 and ResNet50 were trained with.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)

# keras.applications constructor, skip layers (shallow to deep), bridge layer, decoder filters (deep to shallow).
_APPLICATIONS = {
    "vgg16": (
        "VGG16",
        ("block1_conv2", "block2_conv2", "block3_conv3", "block4_conv3"),
        "block5_conv3",
        (512, 256, 128, 64),
    ),
    "resnet50": (
        "ResNet50",
        ("conv1_relu", "conv2_block3_out", "conv3_block4_out", "conv4_block6_out"),
        "conv5_block3_out",
        (512, 256, 128, 64, 32),  # the last level joins the full-resolution stem
    ),
}
_RESNET_STEM_FILTERS = 16
_UNET_LEVELS = 4
# VGG16's conv stack: (convs, filters) per block, as in keras.applications.VGG16.
_VGG16_BLOCKS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))


def _centre_slice_init(in_channels: int):
    """Initial in_channels->3 mapping that copies the centre slice: a 2.5D model starts as the 2D one."""

    def init(shape, dtype=None):
        kernel = np.zeros(shape, dtype="float32")
        kernel[in_channels // 2, :] = 1.0
        return ops.convert_to_tensor(kernel, dtype=dtype)

    return init


@keras.saving.register_keras_serializable(package="socseg")
class GreyToRGB(layers.Layer):
    """Turn grey values in [0, 1] into the caffe-style BGR input VGG16/ResNet50 were trained on.

    One channel is repeated three times; several channels (2.5D: neighbouring slices) are mixed
    into three by a learnable 1x1 projection that starts as a copy of the centre slice. Then
    ``x * 255 - BGR mean``. Doing this inside the model means saved models need no external
    preprocessing and ImageNet weights see the value range they expect.
    """

    def __init__(self, in_channels: int = 1, **kwargs):
        super().__init__(**kwargs)
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.in_channels = int(in_channels)

    def build(self, input_shape):
        if input_shape[-1] is not None and input_shape[-1] != self.in_channels:
            raise ValueError(f"GreyToRGB expects {self.in_channels} channels, got shape {input_shape}")
        if self.in_channels > 1:
            self.kernel = self.add_weight(
                shape=(self.in_channels, 3),
                initializer=_centre_slice_init(self.in_channels),
                name="kernel",
            )

    def call(self, inputs):
        if self.in_channels == 1:
            rgb = ops.repeat(inputs, 3, axis=-1)
        else:
            rgb = ops.matmul(inputs, self.kernel)
        mean = ops.convert_to_tensor(CAFFE_BGR_MEAN, dtype=rgb.dtype)
        return rgb * 255.0 - mean

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (3,)

    def get_config(self):
        config = super().get_config()
        config["in_channels"] = self.in_channels
        return config


def _conv_bn_relu(x, filters: int, name: str):
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def _double_conv(x, filters: int, name: str):
    x = _conv_bn_relu(x, filters, f"{name}_a")
    return _conv_bn_relu(x, filters, f"{name}_b")


def _decoder_block(x, skip, filters: int, dropout: float, name: str):
    """Upsample x2, join the skip, two conv+BN+ReLU, dropout."""
    x = layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"{name}_up")(x)
    x = layers.Concatenate(name=f"{name}_concat")([x, skip])
    x = _double_conv(x, filters, name)
    return layers.Dropout(dropout, name=f"{name}_dropout")(x)


def _weights_kind(encoder_weights: str | None) -> str:
    """Classify ``encoder_weights`` as "none", "imagenet" or "file"."""
    if encoder_weights is None or str(encoder_weights).strip().lower() in {"none", "null", ""}:
        return "none"
    if str(encoder_weights).strip().lower() == "imagenet":
        return "imagenet"
    return "file"


def _application(encoder: str, imagenet: bool) -> keras.Model:
    constructor = getattr(keras.applications, _APPLICATIONS[encoder][0])
    kwargs = dict(include_top=False, input_shape=(None, None, 3))
    if not imagenet:
        return constructor(weights=None, **kwargs)
    try:
        return constructor(weights="imagenet", **kwargs)
    except Exception as err:  # get_file raises a bare Exception when offline
        raise RuntimeError(
            f"ImageNet weights for {encoder} could not be downloaded ({err}). Pass "
            "encoder_weights=none, or a path to a local weights file: e.g. on a machine that is "
            f"online run keras.applications.{_APPLICATIONS[encoder][0]}(weights='imagenet', "
            f"include_top=False).save_weights('{encoder}.weights.h5'), or download the "
            "Keras-hosted *_notop.h5 file, and pass its path."
        ) from err


def _vgg16_batchnorm_backbone() -> keras.Model:
    """VGG16's conv stack with BatchNorm after every conv (the torchvision ``vgg16_bn`` layout).

    Plain VGG16 has no normalisation and learns slowly from random initialisation; with BatchNorm
    it trains like the other encoders. Conv layers keep keras.applications' names and shapes, so
    ImageNet or file weights transfer conv by conv (:func:`_copy_conv_weights`).
    """
    inputs = keras.Input(shape=(None, None, 3), name="vgg16_input")
    x = inputs
    for block, (n_convs, filters) in enumerate(_VGG16_BLOCKS, start=1):
        if block > 1:
            x = layers.MaxPooling2D(2, name=f"block{block - 1}_pool")(x)
        for conv in range(1, n_convs + 1):
            name = f"block{block}_conv{conv}"
            x = layers.Conv2D(filters, 3, padding="same", name=name)(x)
            x = layers.BatchNormalization(name=f"{name}_bn")(x)
            x = layers.Activation("relu", name=f"{name}_relu")(x)
    return keras.Model(inputs, x, name="vgg16_bn")


def _copy_conv_weights(source: keras.Model, target: keras.Model) -> None:
    for layer in source.layers:
        if isinstance(layer, layers.Conv2D):
            target.get_layer(layer.name).set_weights(layer.get_weights())


def use_encoder_batchnorm(encoder: str, encoder_weights: str | None, setting: str | bool | None = "auto") -> bool:
    """Resolve ``train.encoder_batchnorm``: "auto" adds BatchNorm to VGG16 only when it trains from scratch.

    Pretrained VGG16 keeps its original layout (its features were learned without BatchNorm).
    ResNet50 and the from-scratch U-Net always have BatchNorm, so the setting does not apply to them.
    """
    if encoder != "vgg16":
        return False
    text = str(setting).strip().lower()
    if text == "auto":
        return _weights_kind(encoder_weights) == "none"
    if text in {"true", "1", "yes"}:
        return True
    if text in {"false", "0", "no"}:
        return False
    raise ValueError(f"encoder_batchnorm must be auto, true or false, got {setting!r}")


def _load(backbone: keras.Model, path: str | os.PathLike) -> keras.Model:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"encoder weights file not found: {path}")
    backbone.load_weights(path)
    return backbone


def _unet_backbone(in_channels: int, base_filters: int) -> keras.Model:
    inputs = keras.Input(shape=(None, None, in_channels), name="unet_input")
    x = inputs
    for level in range(_UNET_LEVELS):
        x = _double_conv(x, base_filters * 2**level, f"enc{level}")
        x = layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
    x = _double_conv(x, base_filters * 2**_UNET_LEVELS, "bridge")
    return keras.Model(inputs, x, name="unet_backbone")


def build_encoder(
    encoder: str,
    encoder_weights: str = "none",
    in_channels: int = 1,
    base_filters: int = 16,
    encoder_batchnorm: str | bool = "auto",
) -> keras.Model:
    """The bare encoder (backbone) with weights loaded.

    For vgg16/resnet50 a weights file belongs to the ``keras.applications`` model
    (``include_top=False``, 3-channel input), so a file written by
    ``build_encoder("vgg16", "imagenet").save_weights(...)`` on a machine that is online, or the
    Keras-hosted ``*_notop.h5``, loads offline. With ``encoder_batchnorm`` VGG16 gets BatchNorm
    after every conv and the application's conv weights are copied into it.
    """
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; valid encoders: {', '.join(ENCODERS)}")
    kind = _weights_kind(encoder_weights)
    batchnorm = use_encoder_batchnorm(encoder, encoder_weights, encoder_batchnorm)
    if encoder == "unet":
        if kind == "imagenet":
            raise ValueError("the from-scratch 'unet' encoder has no ImageNet weights; use vgg16 or resnet50")
        backbone = _unet_backbone(in_channels, base_filters)
        return backbone if kind == "none" else _load(backbone, encoder_weights)
    if batchnorm and kind == "none":
        return _vgg16_batchnorm_backbone()
    backbone = _application(encoder, imagenet=kind == "imagenet")
    if kind == "file":
        _load(backbone, encoder_weights)
    if batchnorm:
        with_batchnorm = _vgg16_batchnorm_backbone()
        _copy_conv_weights(backbone, with_batchnorm)
        backbone = with_batchnorm
    return backbone


def _skip_layers(encoder: str, batchnorm: bool = False) -> tuple[tuple[str, ...], str, tuple[int, ...]]:
    if encoder == "unet":
        skips = tuple(f"enc{level}_b_relu" for level in range(_UNET_LEVELS))
        return skips, "bridge_b_relu", ()
    _, skips, bridge, filters = _APPLICATIONS[encoder]
    if batchnorm:  # the activation follows BatchNorm instead of being part of the conv
        skips, bridge = tuple(f"{name}_relu" for name in skips), f"{bridge}_relu"
    return skips, bridge, filters


def build_model(
    encoder: str,
    task: str | Task,
    n_classes: int = 3,
    dropout: float = 0.1,
    encoder_weights: str = "none",
    freeze_encoder: bool = False,
    base_filters: int = 16,
    context_slices: int = 0,
    encoder_batchnorm: str | bool = "auto",
    bn_momentum: float = 0.9,
) -> keras.Model:
    """Build a U-Net for ``task`` ("ni" or "phases", or its :class:`Task`) on the given encoder.

    The output layer has ``task.n_outputs(n_classes)`` channels and the task's activation.

    ``context_slices`` k > 0 makes it 2.5D: it takes ``2k + 1`` adjacent slices as channels.

    ``encoder_weights``: "none" (random init), "imagenet" (download; RuntimeError when offline) or a
    path to a local weights file for :func:`build_encoder`'s backbone. ``base_filters`` only affects
    the from-scratch "unet". ``freeze_encoder`` makes the encoder's layers non-trainable (its
    BatchNorm layers then also run in inference mode, as wanted for fine-tuning).
    ``encoder_batchnorm``: see :func:`use_encoder_batchnorm` (VGG16 only). ``bn_momentum``: see
    :func:`set_batchnorm_momentum` (all BatchNorm layers, the pretrained encoders' too).
    """
    task = get_task(task)
    in_channels = n_channels(context_slices)
    n_out = task.n_outputs(n_classes)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    backbone = build_encoder(encoder, encoder_weights, in_channels, base_filters, encoder_batchnorm)
    batchnorm = use_encoder_batchnorm(encoder, encoder_weights, encoder_batchnorm)
    skip_names, bridge_name, filters = _skip_layers(encoder, batchnorm)
    if encoder == "unet":
        filters = tuple(base_filters * 2**level for level in reversed(range(_UNET_LEVELS)))
    # Expose the skip activations as outputs of one nested "encoder" sub-model.
    feature_layers = [backbone.get_layer(name).output for name in (*skip_names, bridge_name)]
    encoder_model = keras.Model(backbone.input, feature_layers, name="encoder")
    encoder_model.trainable = not freeze_encoder

    inputs = keras.Input(shape=(None, None, in_channels), name="image")
    if encoder == "unet":
        features = encoder_model(inputs)
    else:
        features = encoder_model(GreyToRGB(in_channels, name="grey_to_rgb")(inputs))
    skips, x = list(features[:-1]), features[-1]
    if encoder == "resnet50":
        # ResNet50's first skip is at 1/2 resolution: add a full-resolution level from the grey input.
        skips.insert(0, _double_conv(inputs, _RESNET_STEM_FILTERS, "stem"))
    for level, (skip, n_filters) in enumerate(zip(reversed(skips), filters)):
        x = _decoder_block(x, skip, n_filters, dropout, f"dec{level}")
    x = layers.Conv2D(n_out, 1, name="logits")(x)
    outputs = layers.Activation(task.activation, dtype="float32", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name=f"{encoder}_unet_{task.name}")
    set_batchnorm_momentum(model, bn_momentum)
    return model


def set_batchnorm_momentum(model: keras.Model, momentum: float) -> int:
    """Set the moving-average momentum of every BatchNormalization layer, nested models included.

    Keras' 0.99 averages the batch statistics over ~100 steps: right for long ImageNet runs, but
    in short trainings with small batches the averages lag the weights and validation (which uses
    them) swings wildly while training IoU is fine. 0.9 (PyTorch's default) follows ~10 steps.
    Returns how many layers were set.
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"bn_momentum must be in [0, 1), got {momentum}")
    count = 0
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = float(momentum)
            count += 1
        elif isinstance(layer, keras.Model):
            count += set_batchnorm_momentum(layer, momentum)
    return count
