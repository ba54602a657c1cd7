"""The data a run learned from, as MLflow dataset inputs.

Why: the MLflow UI's runs table has a Dataset column, and a run's dataset inputs are what it
shows and what its filter and `mlflow.search_runs` can click on: "the nets trained on mnist" or
"the models trained on this zoo" without a filter on params. A net's input is its image dataset,
one dataset entity per dataset and image content (its digest), shared by every net trained on
it; what the net drew from it (its seed and images per part) goes into the input's tags. A meta
run's input is its zoo: the selected nets, named by their run query, with a digest of their run
ids and weight hashes, so two runs on the same nets show the same zoo and any change shows as
another one. Only metadata is logged (MLflow's `MetaDataset`): the images and snapshots stay
where they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

TRAINING = "training"
"""MLflow's context tag of the input a run trained on (`mlflow.data.context`)."""


def _dataset(name: str, digest: str, source_tags: Mapping[str, str]) -> Any:
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    return MetaDataset(CodeDatasetSource(dict(source_tags)), name=name, digest=digest[:36])


def log_input(
    dataset: Any, tags: Mapping[str, str] | None = None, run_id: str = "", client: Any = None
) -> None:
    """`dataset` as the training input of the active run (or of `run_id`, a run active in
    another thread or made without MLflow's run stack, through `client` when given), with
    `tags` for what the run took from it. One request either way."""
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    tags = {MLFLOW_DATASET_CONTEXT: TRAINING, **{key: str(value) for key, value in (tags or {}).items()}}
    if not run_id:
        import mlflow

        run_id = mlflow.active_run().info.run_id
    entry = DatasetInput(dataset._to_mlflow_entity(), [InputTag(key, value) for key, value in tags.items()])
    for attempt in range(RACE_RETRIES + 1):
        try:
            (client or MlflowClient()).log_inputs(run_id, datasets=[entry])
            return
        except Exception as error:  # MLflow's store, or its server's answer
            if attempt == RACE_RETRIES or not _lost_the_race(error):
                raise


RACE_RETRIES = 3
"""MLflow's store looks a dataset up, then inserts it: two runs that log the same new dataset at
once (the nets of a pack, two workers starting together) collide on its unique key, and the
loser finds it in place when it tries again."""


UNIQUE_KEY_ERRORS = ("UNIQUE constraint", "duplicate key", "already exists", "Duplicate entry")
"""How SQLite, PostgreSQL, MLflow's server and MySQL say a unique key is taken."""


def _lost_the_race(error: Exception) -> bool:
    return any(mark in str(error) for mark in UNIQUE_KEY_ERRORS)


def image_dataset(name: str, digest: str, source_tags: Mapping[str, str]) -> Any:
    """The image dataset `name` (its digest and origin: `nws.data.dataset_identity`)."""
    return _dataset(name, digest, source_tags)


def foreign_dataset(name: str, origin: str) -> Any:
    """The dataset an imported net trained on, as its source names it: the images are not here,
    so the digest stands for the name and the source (`origin`), the same for every net of it."""
    import xxhash

    digest = xxhash.xxh3_64(f"{name}|{origin}".encode()).hexdigest()
    return _dataset(name, digest, {"nws.dataset": name, "nws.source": "imported", "nws.origin": origin})


def net_input_tags(seed: int, sizes: Mapping[str, int]) -> dict[str, str]:
    """What one net drew from its dataset: the seed of its split and its images per part."""
    return {"nws.split_seed": str(seed), **{f"nws.{key}": str(value) for key, value in sizes.items()}}


def zoo_dataset(campaigns: Iterable[str], selection: str, nets: Iterable[tuple[str, str]]) -> Any:
    """The zoo a meta run learned from, named by its nets' `campaigns`: the run query that
    selected it (`selection`) and `nets` as (run id, weights digest) in the zoo's order."""
    import xxhash

    named = sorted({str(c) for c in campaigns if str(c)}) or ["nets"]
    name = "zoo " + ",".join(named) if len(named) <= 3 else f"zoo of {len(named)} campaigns"
    digest = xxhash.xxh3_128()
    count = 0
    for run_id, weights in nets:
        digest.update(f"{run_id}:{weights};".encode())
        count += 1
    return _dataset(name, digest.hexdigest(), {"nws.selection": selection, "nws.nets": str(count)})
