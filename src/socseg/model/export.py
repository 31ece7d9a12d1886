"""The network users get: raw grey slices in, class probabilities out.

Training fits the U-Net on normalised grey values; the exported model puts the training slab's
normalisation (:class:`~socseg.data.normalise.Normaliser`) in front of it as a layer, so whoever
holds the model needs nothing else to feed it uint8, uint16 or float32 slices.
"""

from __future__ import annotations

import keras

from socseg.data.normalise import Normaliser


@keras.saving.register_keras_serializable(package="socseg")
class IntensityNormalisation(keras.layers.Layer):
    """The :class:`~socseg.data.normalise.Normaliser` mapping as the first layer of an exported model (raw grey in)."""

    def __init__(self, low: float, high: float, **kwargs):
        super().__init__(**kwargs)
        self.low = float(low)
        self.high = float(high)

    def call(self, inputs):
        x = keras.ops.cast(inputs, "float32")
        x = (x - self.low) / (self.high - self.low)
        return keras.ops.cast(keras.ops.clip(x, 0.0, 1.0), self.compute_dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "low": self.low, "high": self.high}


def export_model(model: keras.Model, normaliser: Normaliser) -> keras.Model:
    """``model`` behind an :class:`IntensityNormalisation` layer: (B, H, W, 2k + 1) raw grey in.

    ``normaliser``: the training slabs' grey range (normalise.mode fixed), or 0..1 (per_volume:
    :attr:`socseg.data.prepare.PreparedData.normaliser`; the predictor maps each volume's own
    grey range onto 0..1 before the network, see :meth:`socseg.inference.predictor.Predictor.map_grey`).

    The layers are shared, not copied: the exported model follows the weights as training goes on.
    """
    inputs = keras.Input(shape=(None, None, model.input_shape[-1]), dtype="float32", name="grey")
    normalised = IntensityNormalisation(normaliser.low, normaliser.high, name="normalise")(inputs)
    return keras.Model(inputs, model(normalised), name=f"socseg_{model.name}")
