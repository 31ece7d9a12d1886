"""Where models logged before socseg was laid out by stage look for their served class.

MLflow pickles the pyfunc by reference (``socseg.pyfunc.Segmenter``). A server started for such a
model loads the socseg code stored inside it, but a process that has already imported this socseg
(``socseg evaluate``, the registry gate, a notebook) resolves the name here.

Deprecated, removed in 0.2.0 (CHANGELOG.md, "Deprecated"): ``socseg relog MODEL_URI`` re-logs such
a model, whose new pickle names :class:`socseg.inference.pyfunc.Segmenter`.
"""

from socseg.inference.pyfunc import Segmenter

__all__ = ["Segmenter"]
