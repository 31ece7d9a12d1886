"""U-Net builders: shapes, dtypes, weights handling, freezing and .keras round trips."""

import keras
import numpy as np
import pytest

import socseg.model.losses  # noqa: F401  (registers the custom objects load_model needs)
import socseg.model.metrics  # noqa: F401
from socseg.model.losses import get_loss
from socseg.model.metrics import ThresholdedIoU
from socseg.data.tasks import get_task
from socseg.model.unet import ENCODERS, GreyToRGB, build_encoder, build_model, use_encoder_batchnorm

RNG = np.random.default_rng(0)
X = RNG.random((2, 64, 64, 1)).astype("float32")


@pytest.fixture(scope="module")
def built():
    """Build each (encoder, task) model once per module: ResNet50/VGG16 take seconds."""
    cache = {}

    def get(encoder, task):
        if (encoder, task) not in cache:
            cache[encoder, task] = build_model(encoder, task, n_classes=3)
        return cache[encoder, task]

    return get


@pytest.fixture
def mixed_bfloat16():
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.config.set_dtype_policy("float32")


def predict(model, x=X):
    return keras.ops.convert_to_numpy(model(x, training=False))


def weights_equal(a, b):
    return all(np.array_equal(u, v) for u, v in zip(a.get_weights(), b.get_weights(), strict=True))


def n_outputs(task, n_classes):
    return get_task(task).n_outputs(n_classes)


def test_n_outputs():
    assert n_outputs("ni", 3) == 1
    assert n_outputs("phases", 3) == 3
    with pytest.raises(ValueError, match="n_classes >= 2"):
        n_outputs("phases", 1)
    with pytest.raises(ValueError, match="ni, phases"):
        n_outputs("pores", 3)
    with pytest.raises(ValueError, match="ni, phases"):
        build_model("unet", "pores")


def test_output_layer_follows_the_task_object():
    model = build_model("unet", get_task("ni"), base_filters=4)
    assert model.get_layer("probabilities").get_config()["activation"] == "sigmoid"
    assert model.output.shape[-1] == 1 and model.name == "unet_unet_ni"


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("task", ["ni", "phases"])
def test_output_shape_and_range(built, encoder, task):
    out = predict(built(encoder, task))
    assert out.shape == (2, 64, 64, n_outputs(task, 3))
    assert out.dtype == np.float32
    assert np.all((out >= 0) & (out <= 1))
    if task == "phases":
        np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)


def test_other_multiples_of_32(built):
    x = RNG.random((1, 32, 96, 1)).astype("float32")
    assert predict(built("resnet50", "ni"), x).shape == (1, 32, 96, 1)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_float32_output_under_mixed_precision(mixed_bfloat16, encoder):
    model = build_model(encoder, "phases")
    assert model.get_layer("logits").compute_dtype == "bfloat16"
    out = model(X[:1, :32, :32], training=False)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out).sum(-1), 1.0, atol=1e-3)


def test_grey_to_rgb_is_caffe_preprocessing():
    mean = np.array([103.939, 116.779, 123.68], dtype="float32")
    x = np.array([0.0, 0.5, 1.0], dtype="float32").reshape(1, 1, 3, 1)
    out = keras.ops.convert_to_numpy(GreyToRGB()(x))
    np.testing.assert_allclose(out, x * 255.0 - mean, rtol=1e-6)


def test_multi_slice_input_starts_as_the_centre_slice():
    x = RNG.random((1, 4, 4, 5)).astype("float32")
    layer = GreyToRGB(in_channels=5)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(layer(x)), keras.ops.convert_to_numpy(GreyToRGB()(x[..., 2:3])), rtol=1e-6
    )
    assert len(layer.trainable_weights) == 1
    model = build_model("vgg16", "ni", context_slices=2)
    assert predict(model, RNG.random((1, 32, 32, 5)).astype("float32")).shape == (1, 32, 32, 1)


@pytest.mark.parametrize("encoder", ["vgg16", "unet"])
def test_freeze_encoder_drops_trainable_weights(built, encoder):
    trainable = len(built(encoder, "ni").trainable_weights)
    frozen = build_model(encoder, "ni", freeze_encoder=True)
    assert 0 < len(frozen.trainable_weights) < trainable
    assert not frozen.get_layer("encoder").trainable
    assert frozen.get_layer("dec0_up").trainable


def test_local_weights_file_is_loaded(tmp_path):
    path = tmp_path / "vgg16.weights.h5"
    # stands in for ImageNet weights saved on an online machine
    saved = build_encoder("vgg16", encoder_batchnorm=False)
    saved.save_weights(path)
    model = build_model("vgg16", "ni", encoder_weights=str(path))
    encoder = model.get_layer("encoder")
    for name in ("block1_conv1", "block5_conv3"):
        assert weights_equal(encoder.get_layer(name), saved.get_layer(name))
    fresh = build_model("vgg16", "ni").get_layer("encoder")
    assert not weights_equal(fresh.get_layer("block1_conv1"), saved.get_layer("block1_conv1"))


def batchnorm_layers(model) -> list[str]:
    return [layer.name for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def test_vgg16_from_scratch_gets_batchnorm_pretrained_keeps_its_layout(tmp_path):
    assert len(batchnorm_layers(build_model("vgg16", "ni").get_layer("encoder"))) == 13
    path = tmp_path / "vgg16.weights.h5"
    saved = build_encoder("vgg16", encoder_batchnorm=False)
    saved.save_weights(path)
    assert batchnorm_layers(build_model("vgg16", "ni", encoder_weights=str(path)).get_layer("encoder")) == []
    assert batchnorm_layers(build_model("vgg16", "ni", encoder_batchnorm=False).get_layer("encoder")) == []
    # Forced BatchNorm on pretrained weights: the conv weights are carried over conv by conv.
    forced = build_model("vgg16", "ni", encoder_weights=str(path), encoder_batchnorm="true").get_layer("encoder")
    assert len(batchnorm_layers(forced)) == 13
    for name in ("block1_conv1", "block3_conv2", "block5_conv3"):
        assert weights_equal(forced.get_layer(name), saved.get_layer(name))


def test_encoder_batchnorm_setting():
    assert use_encoder_batchnorm("vgg16", "none", "auto")
    assert not use_encoder_batchnorm("vgg16", "imagenet", "auto")
    assert use_encoder_batchnorm("vgg16", "imagenet", "true")
    assert not use_encoder_batchnorm("resnet50", "none", True)  # has its own BatchNorm
    with pytest.raises(ValueError, match="encoder_batchnorm"):
        use_encoder_batchnorm("vgg16", "none", "sometimes")


def test_missing_weights_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere.weights.h5"
    with pytest.raises(FileNotFoundError, match="nowhere.weights.h5"):
        build_model("resnet50", "ni", encoder_weights=str(path))


def test_offline_imagenet_raises_a_helpful_error(monkeypatch):
    real = keras.applications.VGG16

    def offline(*args, weights=None, **kwargs):
        if weights == "imagenet":
            raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- [Errno -3]")
        return real(*args, weights=weights, **kwargs)

    monkeypatch.setattr(keras.applications, "VGG16", offline)
    with pytest.raises(RuntimeError, match="could not be downloaded") as info:
        build_model("vgg16", "ni", encoder_weights="imagenet")
    assert "encoder_weights=none" in str(info.value)
    assert "save_weights" in str(info.value)


def test_bad_arguments():
    with pytest.raises(ValueError, match="vgg16, resnet50, unet"):
        build_model("vgg19", "ni")
    with pytest.raises(ValueError, match="ImageNet"):
        build_model("unet", "ni", encoder_weights="imagenet")
    with pytest.raises(ValueError, match="dropout"):
        build_model("unet", "ni", dropout=1.0)


def test_unet_base_filters_and_2p5d_input():
    small = build_model("unet", "phases", base_filters=4, context_slices=1)
    assert small.count_params() < build_model("unet", "phases", base_filters=8, context_slices=1).count_params()
    assert predict(small, RNG.random((1, 32, 32, 3)).astype("float32")).shape == (1, 32, 32, 3)


def test_compiled_unet_round_trips_through_keras_file(tmp_path):
    model = build_model("unet", "phases", base_filters=4)
    model.compile(
        optimizer="adam",
        loss=get_loss("ce_dice", "phases"),
        metrics=[ThresholdedIoU("phases"), ThresholdedIoU("phases", class_id=2)],
    )
    y = RNG.integers(0, 3, size=(2, 32, 32))
    x = X[:, :32, :32]
    model.fit(x, y, epochs=1, verbose=0)  # trains end to end with the custom loss and metrics
    path = tmp_path / "unet.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(predict(loaded, x), predict(model, x), atol=1e-6)
    assert loaded.evaluate(x, y, verbose=0, return_dict=True) == pytest.approx(
        model.evaluate(x, y, verbose=0, return_dict=True)
    )


def test_pretrained_style_model_round_trips(tmp_path):
    """Nested encoder + GreyToRGB (with its 2.5D kernel) survive save/load."""
    model = build_model("vgg16", "ni", context_slices=1, freeze_encoder=True)
    path = tmp_path / "vgg16.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    x = RNG.random((1, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(predict(loaded, x), predict(model, x), atol=1e-5)
    assert not loaded.get_layer("encoder").trainable
    assert len(loaded.trainable_weights) == len(model.trainable_weights)


def test_batchnorm_momentum_reaches_nested_encoders():
    model = build_model("resnet50", "ni", bn_momentum=0.8)
    momenta = [layer.momentum for layer in model.get_layer("encoder").layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(momenta) > 40 and set(momenta) == {0.8}
    assert model.get_layer("dec0_a_bn").momentum == 0.8
    assert build_model("unet", "ni").get_layer("dec0_a_bn").momentum == 0.9  # the default
    with pytest.raises(ValueError, match="bn_momentum"):
        build_model("unet", "ni", bn_momentum=1.0)
