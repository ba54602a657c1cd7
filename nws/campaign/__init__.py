"""A sampling campaign: Optuna hands out configurations, each net is trained with snapshot capture
and becomes one MLflow run nested under the campaign's run.

- `settings`: `CampaignSettings`, the campaign as the library runs it (built by `nws sample`);
- `storage`: the Optuna storage and the campaign's study;
- `trials`: trial states, heartbeats, retries and the target count, shared by every worker;
- `net_job`: one net: data, training, snapshots and its MLflow run;
- `loop`: the campaign in this process, net after net;
- `orphans`: runs and trials left RUNNING by a process that is gone.
"""
