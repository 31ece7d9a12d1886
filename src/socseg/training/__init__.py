"""Turning labelled volumes into a registered model: one tracked training run, the Optuna search,
the DVC pipeline stages, the registry gate, MLflow tracking and the runtime (precision, seeds)."""
