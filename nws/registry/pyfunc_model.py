"""The MLflow pyfunc model of a registered meta-classifier, logged as code (MLflow's
"models from code") with the `nws` package beside it.

MLflow runs this file when it loads the model, with the model's `code/` folder first on
`sys.path` (so `nws` modules not yet imported come from there): like any models-from-code model,
it is code, and whoever may write the artifact store can change what runs. Its data
(`meta_classifier`) is read without running code from it: JSON, skops with a trusted-type list,
a checked `.keras` archive in safe mode; a tampered data file is refused with one line
(`nws.errors.DataError`). Nothing is unpickled.

`predict` takes flat weight vectors (the layout contract, one per row; nets of different
architectures in separate calls) and returns the property's readable value per row, or the
learning rate as a number.
"""

from pathlib import Path

import mlflow
import numpy as np


class WeightPropertyModel(mlflow.pyfunc.PythonModel):
    """Predicts one hyper-parameter of a net from its flat weight vector."""

    def load_context(self, context):
        from nws.meta import load

        self.meta = load(Path(context.artifacts["meta_classifier"]))

    def predict(self, context, model_input: np.ndarray, params=None):
        if isinstance(model_input, dict):  # a named tensor input
            model_input = next(iter(model_input.values()))
        if hasattr(model_input, "to_numpy"):
            model_input = model_input.to_numpy()
        rows = [model_input] if np.ndim(model_input) == 1 else list(model_input)
        return np.array([self.meta.label(self.meta.predict_vector(row)) for row in rows])


mlflow.models.set_model(WeightPropertyModel())
