"""nws: Neural Weight Space zoos and meta-classifiers, tracked with MLflow, sampled with Optuna."""

__version__ = "0.1.0"
