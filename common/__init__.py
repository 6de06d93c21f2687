"""What training and serving share, torch-free: settings loading, preprocessing, drift features.

Nothing here imports torch, BentoML or MLflow, so the serving image carries it as it is.
"""
