"""Using a trained model: the predictor (sliding window, blend, TTA, 2.5D context) that serves and
scores, the MLflow pyfunc around it, whole-volume segmentation and evaluation."""
