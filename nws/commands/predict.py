"""The `predict` entry point: ask the registered champions which hyper-parameters produced a net.

The input is a net's MLflow run (its snapshot artifact, row `k`) or a snapshot file (`.npy`: one
flat vector, or a [prints, n_weights] array of which row `k` is used). Each property's champion
(`models:/nws-meta-<property>@champion`) predicts it; the true value is printed beside it when the
net's run is known. The predictions are logged as a run with `nws.role = prediction`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from nws.checks import Count, RunId
from nws.commands.options import check_declared, param
from nws.errors import DataError, ParameterError
from nws.space import PROPERTY_NAMES, get_property
from nws.tracking.tags import SNAPSHOTS_COMPLETE, TAG_ROLE, TAG_SNAPSHOTS, TAG_SOURCE, TAG_WEIGHTS_DIGEST


@dataclass(frozen=True)
class PredictOptions:
    """The parameters of the `predict` entry point."""

    run_id: str = param("", "the MLflow run of the net to look at", RunId())
    snapshot: str = param("", "or a snapshot file (.npy): one flat vector or [prints, n_weights]")
    k: int = param(0, "which snapshot (1-based) of the run or file; 0 = the last", Count(0))
    props: str = param("all", "comma list of properties, or all")
    alias: str = param("champion", "the registered models' alias to use")
    experiment: str = param(
        "",
        "MLflow experiment of the runs (default $MLFLOW_EXPERIMENT_NAME or $MLFLOW_EXPERIMENT_ID, else nws)",
    )

    def validate(self) -> list[str]:
        if bool(self.run_id.strip()) == bool(self.snapshot.strip()):
            raise ParameterError("run_id", "give either run_id or snapshot")
        check_declared(self)
        if self.props.strip() in ("", "all"):
            return list(PROPERTY_NAMES)
        names = [p.strip() for p in self.props.split(",") if p.strip()]
        for name in names:
            get_property(name)
        return names


def _pick(array: np.ndarray, k: int, name: str, where: str) -> np.ndarray:
    """Row `k` of the snapshots (the last for 0) as float32, refused (naming the parameter
    `name`) unless it is a finite weight vector of an architecture of the space: anything else
    would give confident predictions from weights no net has, or a traceback."""
    from nws.net.snapshots import conv_size_for_length

    array = np.asarray(array)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ParameterError(name, f"{where} holds {array.dtype} values, not numbers")
    if array.ndim == 1:
        if k > 1:
            raise ParameterError("k", f"{where} holds one snapshot")
        vector, which = array, where
    elif array.ndim == 2:
        if len(array) == 0:
            raise ParameterError(name, f"{where} holds no snapshot")
        if k > len(array):
            raise ParameterError("k", f"{k} is beyond the {len(array)} snapshots of {where}")
        vector, which = array[(k or len(array)) - 1], f"{where}: snapshot {k or len(array)}"
    else:
        raise ParameterError(
            name, f"{where}: expected a vector or a [prints, n_weights] array, got {array.shape}"
        )
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf, refused below
        vector = vector.astype(np.float32)
    try:
        conv_size_for_length(len(vector))
    except ValueError:
        raise ParameterError(
            name, f"{where}: {len(vector)} weights fit no architecture of the NWS space"
        ) from None
    if not np.isfinite(vector).all():
        raise ParameterError(name, f"{which} holds NaN or infinite weights")
    return vector


def load_vector(options: PredictOptions) -> tuple[np.ndarray, dict[str, str], str]:
    """The snapshot to predict from, the true properties (if known) and a description."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if options.snapshot.strip():
        path = Path(options.snapshot).expanduser()
        try:
            array = np.load(path)
        except (OSError, ValueError) as e:
            raise DataError(f"snapshot: cannot read {path} as .npy ({e})") from None
        return _pick(array, options.k, "snapshot", str(path)), {}, str(path)
    try:
        run = mlflow.get_run(options.run_id.strip())
    except MlflowException:
        raise ParameterError("run_id", f"no MLflow run {options.run_id!r}") from None
    if run.data.tags.get(TAG_SNAPSHOTS) != SNAPSHOTS_COMPLETE:
        raise ParameterError("run_id", f"run {run.info.run_id} is not a net with complete snapshots")
    from nws.zoo.cache import ArtifactCache

    path = ArtifactCache().fetch(run.info.run_id, run.info.artifact_uri, run.data.tags[TAG_WEIGHTS_DIGEST])
    truth = {name: run.data.params.get(name, "") for name in PROPERTY_NAMES}
    vector = _pick(np.load(path, mmap_mode="r"), options.k, "run_id", f"run {run.info.run_id}")
    return vector, truth, run.info.run_id


def run_predict(options: PredictOptions) -> pd.DataFrame:
    import mlflow

    from nws.registry.registration import load_champion, registered_name
    from nws.tracking.runs import parent_run

    props = options.validate()
    vector, truth, source = load_vector(options)
    rows = []
    for prop in props:
        model = load_champion(prop, options.alias)
        if model is None:
            print(f"{prop}: no models:/{registered_name(prop)}@{options.alias}, skipped")
            continue
        predicted = model.predict(vector[None])[0]
        rows.append({"property": prop, "predicted": predicted, "true": truth.get(prop, ""),
                     "model": f"{registered_name(prop)}@{options.alias}"})  # fmt: skip
    if not rows:
        raise ParameterError("props", f"no registered model has the alias {options.alias!r}")
    table = pd.DataFrame(rows)
    for row in table.itertuples():
        value = f"{row.predicted:.6f}" if isinstance(row.predicted, float) else str(row.predicted)
        truth_text = f"  (true: {row.true})" if row.true != "" else ""
        print(f"{row.property:<15} {value:<16}{truth_text}")
    tags = {TAG_ROLE: "prediction", TAG_SOURCE: source}
    name = f"predict-{Path(source).name[:12]}"
    with parent_run(
        tags, run_name=name, nested=mlflow.active_run() is not None, experiment=options.experiment
    ):
        mlflow.log_params({k: v for k, v in asdict(options).items() if v not in ("", 0)})
        mlflow.log_params({f"predicted_{r.property}": r.predicted for r in table.itertuples()})
        mlflow.log_text(table.to_csv(index=False), "predictions.csv")
        known = [r for r in table.itertuples() if r.true != "" and r.property != "lrate"]
        if known:
            mlflow.log_metric("correct_properties", sum(str(r.predicted) == r.true for r in known))
    return table
