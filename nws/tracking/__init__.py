"""Everything that talks to MLflow about runs (the Model Registry aside, `nws.registry`):

- `tags`: the names runs carry (tags, artifact paths, per-epoch metrics), the tag sets of a net's
  and a campaign's run, and quoting a value in a search filter;
- `runs`: how runs begin and end (`parent_run`, one rule for every entry point), a net's run;
- `artifacts`: what a finished net's run holds (snapshots, history, curve, digest, completion);
- `sql`: a net's run created and finished in one transaction each on a database store.
"""
