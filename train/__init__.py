"""fashion-serve training pipeline: data, models, fit, tracking, registry, export (torch, MLflow)."""
