"""The names MLflow runs carry in nws: tags a query selects on, artifact paths, per-epoch metric
names, the tag sets of a net's run and of a campaign's run, and how a search filter quotes a
value. Everything that writes or reads these names takes them from here.
"""

from __future__ import annotations

from nws.processes import worker_name

# Tags a query can select on.
TAG_ROLE = "nws.role"  # net, campaign, meta, meta-classifier, study, import, prediction
TAG_SUBSET = "nws.subset"
TAG_CAMPAIGN = "nws.campaign"
TAG_STUDY = "optuna.study"
TAG_TRIAL = "optuna.trial_number"
TAG_SEED = "nws.seed"
TAG_WORKER = "nws.worker"
"""host:pid of the process that made the run (the Optuna trial's `worker` attribute too)."""
TAG_SNAPSHOTS = "nws.snapshots"  # "complete" once the artifacts are all there
TAG_WEIGHTS_DIGEST = "nws.weights_xxh3"  # xxh3-128 of the weights.npy array data
TAG_WEIGHTS_SHAPE = "nws.weights_shape"
TAG_FAILURE = "nws.failure"
TAG_STOP_REASON = "nws.stop_reason"
TAG_SPLIT = "nws.split"  # "train" or "test" when a net comes with a published split
SNAPSHOTS_COMPLETE = "complete"
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
"""MLflow's own experiment tag that its UI reads: without it MLflow 3 opens an experiment in its
GenAI layout (traces, prompts)."""
EXPERIMENT_KIND = "custom_model_development"

# Where a run's data came from: an imported net's source, or what a prediction looked at.
TAG_SOURCE = "nws.source"  # "nws-import" on imported nets; a prediction's run id or file
TAG_SOURCE_PATH = "nws.source_path"
TAG_SOURCE_CHECKSUM = "nws.source_checksum"  # xxh3-128 of the net's published files
TAG_SOURCE_CSV = "nws.source_csv"
IMPORT_SOURCE = "nws-import"

WEIGHTS_ARTIFACT = "snapshots/weights.npy"
LAYOUT_ARTIFACT = "snapshots/layout.json"
HISTORY_ARTIFACT = "history.csv"
CURVE_ARTIFACT = "training_curve.png"

EPOCH_METRICS = (
    "train_accuracy",
    "valid_accuracy",
    "test_accuracy",
    "loss",
    "valid_loss",
    "test_loss",
    "valid_accuracy_smoothed",
)


def net_tags(subset: str, campaign: str, trial: int | None = None, seed: int | None = None) -> dict[str, str]:
    """The tags of a net's run: its role, subset and campaign. A sampled net (`trial` given) also
    names its Optuna study and trial, its seed and the process that trains it; an imported net
    has none of these."""
    tags = {TAG_ROLE: "net", TAG_SUBSET: subset, TAG_CAMPAIGN: campaign}
    if trial is not None:
        tags.update({TAG_STUDY: campaign, TAG_TRIAL: str(trial), TAG_SEED: str(seed),
                     TAG_WORKER: worker_name()})  # fmt: skip
    return tags


def campaign_tags(subset: str, campaign: str) -> dict[str, str]:
    """The tags of a campaign's run (the parent of its nets' runs)."""
    return {TAG_ROLE: "campaign", TAG_CAMPAIGN: campaign, TAG_SUBSET: subset, TAG_STUDY: campaign}


def quote(value: str) -> str:
    """`value` as a string literal of an MLflow search filter: in single quotes, or in double
    quotes when it holds a single quote (MLflow's filter accepts both and has no escapes). A
    value holding both kinds cannot be written: ValueError."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r} holds both ' and \", which an MLflow search filter cannot quote")


def tag_equals(tag: str, value: str) -> str:
    """The filter condition `tags.<tag> = <value>`, the value quoted."""
    return f"tags.`{tag}` = {quote(value)}"
