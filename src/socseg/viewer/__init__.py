"""The napari plugin (``pip install 'socseg[napari]'``): open socseg stores, label TIFFs and volume
folders as layers, segment an image layer with a registered model, see where the model is unsure,
paint corrections, fine-tune a challenger and save labels, all from the viewer.

``napari.yaml`` is the npe2 manifest napari finds through the ``napari.manifest`` entry point.
:mod:`socseg.viewer.layers` (readers, writers) and :mod:`socseg.viewer.session` (the steps) do
not import Qt; :mod:`socseg.viewer.widget` is the dock widget that runs them.
"""
