"""The entry points, one module each: its parameters (an options dataclass, from which the CLI,
the MLproject file and the MLflow params follow), the checks of user input (one line naming the
parameter: `ParameterError`), and the wiring of the library modules that do the work.

`options` holds what several share (`param`, `Selection`); `workers` is the supervisor of
`sample --workers`; `train_runs`, the runs `train` logs.
"""
