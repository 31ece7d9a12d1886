"""Baselines: thresholds recover known cuts, the random forest learns what thresholds cannot."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from socseg.model.baselines import RandomForestBaseline, ThresholdBaseline, feature_names, pixel_features


def blobs(shape, n_classes, seed):
    """Smooth random class regions (like grains), class indices 0..n-1 in roughly equal parts."""
    field = ndi.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), (0, 3, 3))
    cuts = np.quantile(field, np.linspace(0, 1, n_classes + 1)[1:-1])
    return np.searchsorted(cuts, field).astype(np.uint8)


def test_threshold_recovers_the_cuts_between_three_grey_levels():
    labels = blobs((3, 64, 64), 3, seed=0)
    levels = np.array([0.2, 0.5, 0.8], np.float32)
    image = levels[labels] + np.random.default_rng(1).normal(0, 0.02, labels.shape).astype(np.float32)
    model = ThresholdBaseline().fit(image, labels)
    assert model.class_order == [0, 1, 2]
    assert model.thresholds == pytest.approx([0.35, 0.65], abs=0.04)
    assert np.mean(model.predict(image) == labels) > 0.999
    assert model.train_mean_iou > 0.99


def test_threshold_ranks_classes_by_grey_value_and_handles_two_classes():
    labels = blobs((2, 48, 48), 2, seed=2)
    image = np.where(labels == 0, 0.9, 0.1).astype(np.float32)  # class 0 is the bright one
    model = ThresholdBaseline().fit([image[:1], image[1:]], [labels[:1], labels[1:]])  # a list of stacks works too
    assert model.class_order == [1, 0] and len(model.thresholds) == 1
    assert 0.1 < model.thresholds[0] <= 0.9
    np.testing.assert_array_equal(model.predict(image), labels)


def test_features_shape_names_and_constant_image():
    features = pixel_features(np.full((20, 30), 0.5, np.float32), sigmas=(1.0, 2.0))
    assert features.shape == (20, 30, 1 + 7 * 2) and features.dtype == np.float32
    assert len(feature_names((1.0, 2.0))) == features.shape[-1]
    np.testing.assert_allclose(features[..., 1], 0.5, atol=1e-6)  # Gaussian of a constant
    np.testing.assert_allclose(features[..., 2:8], 0.0, atol=1e-3)  # derivatives of a constant (float32 round-off)
    assert pixel_features(np.zeros((16, 16))).shape[-1] == len(feature_names())
    with pytest.raises(ValueError):
        pixel_features(np.zeros((2, 16, 16)))


def test_random_forest_learns_classes_a_threshold_cannot_separate():
    """Classes differ in mean by less than the pixel noise: only smoothed features separate them."""
    labels = blobs((4, 64, 64), 2, seed=3)
    image = (0.4 + 0.2 * labels + np.random.default_rng(4).normal(0, 0.3, labels.shape)).astype(np.float32)
    train, test = slice(0, 3), slice(3, 4)
    threshold = ThresholdBaseline().fit(image[train], labels[train])
    forest = RandomForestBaseline(n_estimators=20, n_samples=6000, sigmas=(1.0, 2.0, 3.5), n_jobs=1).fit(
        image[train], labels[train]
    )
    pred = forest.predict(image[test])
    assert pred.shape == labels[test].shape and pred.dtype == np.uint8
    forest_acc = np.mean(pred == labels[test])
    assert forest_acc > 0.85
    assert forest_acc > np.mean(threshold.predict(image[test]) == labels[test]) + 0.15


def test_random_forest_trains_on_labelled_pixels_only():
    """Sparse labels (fine-tuning's scribbles): IGNORE pixels are never drawn as training samples."""
    from socseg.data.tasks import IGNORE

    labels = blobs((2, 48, 48), 2, seed=5)
    image = (0.2 + 0.6 * labels + np.random.default_rng(6).normal(0, 0.05, labels.shape)).astype(np.float32)
    sparse = np.full_like(labels, IGNORE)
    sparse[:, :12, :] = labels[:, :12, :]  # a labelled strip, 1/4 of each slice
    forest = RandomForestBaseline(n_estimators=10, n_samples=10_000, sigmas=(1.0,), n_jobs=1).fit(image, sparse)
    assert set(forest.forest.classes_.tolist()) == {0, 1}  # IGNORE (255) would be a third class
    assert np.mean(forest.predict(image) == labels) > 0.95
    with pytest.raises(ValueError, match="no labelled pixel"):
        RandomForestBaseline(n_estimators=2, sigmas=(1.0,)).fit(image, np.full_like(labels, IGNORE))


def test_random_forest_probabilities_argmax_to_its_labels_and_keep_unseen_classes():
    labels = blobs((2, 40, 40), 2, seed=7)
    image = (0.2 + 0.6 * labels + np.random.default_rng(8).normal(0, 0.2, labels.shape)).astype(np.float32)
    forest = RandomForestBaseline(n_estimators=9, n_samples=3000, sigmas=(1.0,), n_jobs=1).fit(image, labels)
    probabilities = forest.probabilities(image, n_classes=3)  # class 2 never seen: a zero channel
    assert probabilities.shape == labels.shape + (3,) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-6)
    assert not probabilities[..., 2].any()
    assert 0 < np.mean((probabilities[..., 0] > 0) & (probabilities[..., 1] > 0))  # some pixels are in doubt
    np.testing.assert_array_equal(np.argmax(probabilities, -1), forest.predict(image))
    with pytest.raises(ValueError, match="n_classes=1"):
        forest.probabilities(image, n_classes=1)


def test_unfitted_and_bad_input_raise():
    with pytest.raises(RuntimeError):
        ThresholdBaseline().predict(np.zeros((1, 4, 4)))
    with pytest.raises(RuntimeError):
        RandomForestBaseline().predict(np.zeros((1, 4, 4)))
    with pytest.raises(ValueError):
        ThresholdBaseline().fit(np.zeros((1, 4, 4)), np.zeros((1, 4, 5), np.uint8))
    with pytest.raises(ValueError):
        ThresholdBaseline().fit(np.random.rand(1, 4, 4), np.arange(16).reshape(1, 4, 4) % 4)  # 4 classes
