"""The Model Registry: `registration` logs a trained meta-classifier as an MLflow pyfunc model,
registers it as `nws-meta-<property>` and moves the alias `champion`; `pyfunc_model` is the model
as MLflow loads it (logged as code, with the `nws` package beside it)."""
