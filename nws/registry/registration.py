"""The Model Registry: log a trained meta-classifier as an MLflow pyfunc model, register it under
a name that says what it predicts (`nws-meta-<property>`), and move the alias `champion` to a new
version only when its held-out score beats the current champion's.

The model itself is `nws/registry/pyfunc_model.py`, logged as code ("models from code") with the `nws`
package beside it (`code_paths`): its `predict` takes flat weight vectors and returns the
property's readable value per row.

Trust: MLflow runs the logged code files when it loads the model, as for any models-from-code
pyfunc model, so whoever may write the artifact store or the registry can run code on the machines
that load a model. The data files (`artifacts/meta/`) are loaded without running code from them
(`nws.meta.load`), and a tampered one is refused with one line: `load_champion` raises a
DataError. The MLmodel names its code file and artifacts by their paths inside the model, not by
paths of the machine that logged it (`_PortablePyfunc`).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from nws.meta.base import MetaSettings
    from nws.zoo.splits import Split

CHAMPION = "champion"
TAG_SCORE = "nws.score"
TAG_SCORE_METRIC = "nws.score_metric"
TAG_PREVIOUS = "nws.previous_champion"
TAG_COMPARISON = "nws.champion_comparison"


def registered_name(prop: str) -> str:
    return f"nws-meta-{prop.replace('_', '-')}"


def version_tags(selection: str, k_range: tuple[int, int], n_nets: int, split: Split, name: str,
                 settings: MetaSettings, chance: Any, run_id: str) -> dict[str, str]:  # fmt: skip
    """What a registered version is: model type, property, chance, how its nets were chosen, and
    the Keras backend it was trained on."""
    from nws.backend import TAG_BACKEND, active
    from nws.meta import KINDS

    chance_text = f"{chance:.4f}" if chance is not None and np.isfinite(chance) else "n/a (regression)"
    return {
        "nws.model": name,
        "nws.property": split.prop,
        "nws.chance": chance_text,
        "nws.selection": selection,
        "nws.k": f"{k_range[0]},{k_range[1]}",
        "nws.slice_length": str(settings.slice_length)
        if KINDS[name].uses_slices
        else "n/a (whole snapshots)",
        "nws.region": settings.region,
        "nws.nets": f"{n_nets} selected, {len(split.train)} train, {len(split.valid)} valid, "
        f"{len(split.test)} test",
        "nws.source_run": run_id,
        TAG_BACKEND: active(),
    }


def version_description(about: dict[str, str], metric: str, value: float) -> str:
    """The version page's text: the same facts as the tags, in one paragraph."""
    return (
        f"{about['nws.model']} meta-classifier predicting {about['nws.property']} from a net's weights. "
        f"Held-out {metric} {value:.4f} (chance {about['nws.chance']}). Nets: {about['nws.nets']}, "
        f"selected by {about['nws.selection']}; snapshots K={about['nws.k']}, slice length "
        f"{about['nws.slice_length']}, region {about['nws.region']}. "
        f"Trained in run {about['nws.source_run']}."
    )


def _signature(regression: bool) -> Any:
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    output = ColSpec("double" if regression else "string", "prediction")
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),
        outputs=Schema([output]),
    )


def _requirements() -> list[str]:
    """The packages the model needs to load, at this process's versions: Keras on the backend
    it was trained on (a `.keras` archive loads on either)."""
    from importlib.metadata import version

    from nws.backend import current

    names = ("mlflow", *current().packages, "keras", "scikit-learn", "skops", "numpy", "pandas")
    return [f"{name}=={version(name)}" for name in names]


class _PortablePyfunc:
    """`mlflow.pyfunc` as the flavor of `mlflow.models.Model.log`, with an MLmodel that names no
    path of the logging machine. MLflow records the absolute path of the code file
    (`model_code_path`; at load only its file name is used, inside the model) and the local source
    of each artifact (`uri`; never read at load): both become paths inside the model."""

    @staticmethod
    def save_model(path: str, mlflow_model: Any, **kwargs: Any) -> None:
        import mlflow
        from mlflow.models.model import MLMODEL_FILE_NAME

        mlflow.pyfunc.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
        flavor = mlflow_model.flavors[mlflow.pyfunc.FLAVOR_NAME]
        flavor["model_code_path"] = Path(flavor["model_code_path"]).name
        for artifact in flavor.get("artifacts", {}).values():
            artifact["uri"] = artifact["path"]
        mlflow_model.save(str(Path(path) / MLMODEL_FILE_NAME))


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    model_uri: str
    champion: bool
    comparison: str


def log_meta_classifier(
    model: Any,
    register: bool,
    value: float,
    metric: str,
    higher_is_better: bool,
    about: Mapping[str, str] | None = None,
    description: str = "",
    metrics: Mapping[str, float] | None = None,
    dataset: Any = None,
) -> Registration | None:
    """Log `model` into the active run as a pyfunc model; register and maybe promote it. The
    version gets `description` and the tags `about` (what it is, how its nets were selected).
    `metrics` (its held-out scores) are logged to the run and to the logged model, measured on
    `dataset` (the zoo), so the experiment's Models tab compares models by them."""
    import mlflow

    import nws

    with tempfile.TemporaryDirectory(prefix="nws-model-") as tmp, warnings.catch_warnings():
        # The signature is explicit, and an input example would be a whole weight vector.
        warnings.filterwarnings("ignore", message=".*input_example.*")
        directory = Path(tmp) / "meta"
        model.save(directory)
        info = mlflow.models.Model.log(
            artifact_path=None,
            name=f"{model.task.prop}-{model.name}",  # the Models tab's name: what it predicts, how
            flavor=_PortablePyfunc,
            flavor_name="pyfunc.ModelFromCode",  # as mlflow.pyfunc.log_model names a model from code
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={"meta_classifier": str(directory)},
            code_paths=[str(Path(nws.__file__).parent)],
            signature=_signature(model.task.is_regression),
            pip_requirements=_requirements(),
        )
    if metrics:  # its score first, then the evidence: the Models tab shows them in this order
        first = [key for key in (metric, "pvalue", "chance") if key in metrics]
        ordered = {key: metrics[key] for key in [*first, *metrics]}
        mlflow.log_metrics(ordered, model_id=info.model_id, dataset=dataset)
    if not register:
        return None
    name = registered_name(model.task.prop)
    version = _create_version(name, info, dict(about or {}), description)
    champion, comparison = promote_if_better(name, version.version, value, metric, higher_is_better)
    return Registration(name, version.version, info.model_uri, champion, comparison)


def _create_version(name: str, info: Any, tags: dict[str, str], description: str) -> Any:
    """A new version of `name` from the logged model, linked to the run that logged it (a version
    registered from a `models:/` URI by `mlflow.register_model` names no run). The client's calls
    print nothing, where `register_model` prints two lines per version."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    client = MlflowClient()
    try:
        client.create_registered_model(
            name, description=f"nws meta-classifiers of {name.removeprefix('nws-meta-')}"
        )
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    version = client.create_model_version(
        name, source=info.model_uri, run_id=info.run_id, tags=tags, description=description,
        model_id=info.model_id,
    )  # fmt: skip
    # What `mlflow.register_model` adds: the logged model names its version (the Models tab's
    # "Registered models" column), a new logged model has no other.
    versions = [{"name": name, "version": version.version}]
    client.set_logged_model_tags(info.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(versions)})
    return version


def promote_if_better(
    name: str, version: str, value: float, metric: str, higher_is_better: bool
) -> tuple[bool, str]:
    """Move `champion` to this version if its held-out metric beats the champion's; record both
    figures and the comparison on the version."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    previous = float(current.tags.get(TAG_SCORE, "nan")) if current else None
    if previous is None or not np.isfinite(previous):
        better, comparison = True, f"{metric} {value:.4f}; no champion before"
    else:
        better = value > previous if higher_is_better else value < previous
        sign = (">" if better else "<=") if higher_is_better else ("<" if better else ">=")
        comparison = f"{metric} {value:.4f} {sign} champion v{current.version} {previous:.4f}"
    for key, text in {
        TAG_SCORE: repr(float(value)),
        TAG_SCORE_METRIC: metric,
        TAG_PREVIOUS: f"v{current.version} ({metric} {previous})" if current else "none",
        TAG_COMPARISON: comparison,
    }.items():
        client.set_model_version_tag(name, version, key, text)
    if better:
        client.set_registered_model_alias(name, CHAMPION, version)
    return better, comparison


def load_champion(prop: str, alias: str = CHAMPION) -> Any | None:
    """The pyfunc model behind `models:/nws-meta-<prop>@<alias>`, or None if there is none."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from nws.errors import DataError, one_line

    uri = f"models:/{registered_name(prop)}@{alias}"
    try:
        MlflowClient().get_model_version_by_alias(registered_name(prop), alias)
    except MlflowException:
        return None
    try:
        return mlflow.pyfunc.load_model(uri)
    except DataError as e:  # a data file that is not what nws saved
        raise DataError(f"cannot load {uri}: {e}") from None
    except Exception as e:  # a model logged by another version of nws, a missing artifact, ...
        raise DataError(f"cannot load {uri}: {one_line(e)}") from None
