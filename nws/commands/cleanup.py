"""The `cleanup` entry point: list a campaign's RUNNING runs and trials with their workers, and
close those whose process is gone (`nws.campaign.orphans`), as a resumed campaign does; and mark
FAILED the net runs that ended FINISHED without complete snapshots (left by earlier versions)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from nws.campaign.orphans import Entry
from nws.campaign.storage import DEFAULT_STORAGE
from nws.commands.options import check_campaign, param


@dataclass(frozen=True)
class CleanupOptions:
    """The parameters of the `cleanup` entry point."""

    campaign: str = param("default", "the campaign whose runs and trials to check")
    experiment: str = param(
        "",
        "MLflow experiment of its runs (default $MLFLOW_EXPERIMENT_NAME or $MLFLOW_EXPERIMENT_ID, else nws)",
    )
    storage: str = param(
        "", f"its Optuna storage: an RDB URL or a journal file (default ./{DEFAULT_STORAGE})"
    )
    dry_run: bool = param(False, "only list the RUNNING runs and trials, close nothing")
    all_hosts: bool = param(
        False, "also close those of other hosts and of no known worker (their processes cannot be checked)"
    )


def run_cleanup(options: CleanupOptions) -> list[Entry]:
    """List a campaign's RUNNING runs and trials, close those whose process is gone."""
    from nws.campaign.orphans import EMPTY, close_empty_net_runs, close_orphans
    from nws.campaign.storage import load_study
    from nws.tracking.experiments import existing_experiment
    from nws.tracking.runs import check_tracking_server

    check_campaign(options.campaign)
    check_tracking_server()
    study = load_study(options.campaign, options.storage)
    if study is None:
        where = options.storage.strip() or DEFAULT_STORAGE
        print(
            f"no Optuna study {options.campaign!r} in {where}: only MLflow runs are checked", file=sys.stderr
        )
    experiment_id = existing_experiment(options.experiment)
    entries = close_orphans(
        study, options.campaign, options.all_hosts, options.dry_run, experiment_ids=[experiment_id]
    )
    empty = close_empty_net_runs(options.campaign, options.dry_run, experiment_ids=[experiment_id])
    for entry in [*entries, *empty]:
        print(entry.line(options.dry_run))
    closed = sum(e.closed for e in entries)
    verb = "would be closed" if options.dry_run else "closed"
    left = len(entries) - closed
    line = f"campaign {options.campaign}: {len(entries)} running, {closed} {verb}, {left} left running"
    if empty:
        line += f", {len(empty)} {EMPTY} {'would be marked' if options.dry_run else 'marked'} FAILED"
    print(line)
    return [*entries, *empty]
