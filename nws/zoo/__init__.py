"""The zoo: the meta-dataset of many nets' snapshots, selected by an MLflow run query.

- `query`: which nets (finished net runs with complete snapshots, AND the caller's filter);
- `cache`: their snapshot artifacts, hashed against each run's digest whenever they are used;
- `store`: one flat address space over all selected snapshots, read in place, never in RAM;
- `splits`: which nets train, validate and test a property (by net, classes balanced).
"""
