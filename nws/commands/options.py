"""Entry-point parameters declared once, as dataclass fields with help text; the CLI, the
MLproject file (checked by a test) and the MLflow params all follow these declarations. Also
what several entry points share: the selection of nets by a run query (`Selection`, for `train`
and `export_nws`) and the check of a campaign name."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from nws.checks import TEXT, Check, Real
from nws.errors import ParameterError

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}


def param(default: Any, help: str, check: Check = TEXT) -> Any:
    """A dataclass field whose help text the CLI shows and whose values `check` accepts (applied
    when the CLI parses the value; a number must say which, `tests/test_bad_input.py`)."""
    return field(default=default, metadata={"help": help, "check": check})


def check_of(option: Any) -> Check:
    """The check declared with an option (a dataclass field)."""
    return option.metadata.get("check", TEXT)


def check_declared(options: Any) -> None:
    """Apply every option's declared check to its value: what the CLI does when it parses them,
    for options made in code (`main`'s parts, a library caller)."""
    for option in dataclasses.fields(options):
        check_of(option)(option.name, getattr(options, option.name))


def default_of(settings: type, name: str) -> Any:
    """The default a library's settings dataclass declares for `name`: an option that sets it
    takes its default from there, so the value is declared once."""
    return next(f.default for f in dataclasses.fields(settings) if f.name == name)


def parse_bool(name: str, text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    word = str(text).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ParameterError(name, f"{text!r} is not a boolean (true/false)")


def names_list(text: str) -> list[str]:
    """A comma list's names, stripped, without blanks or repeats, in order."""
    return list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))


def check_campaign(name: str) -> None:
    """A campaign name must not be empty, and must fit in a search filter's quotes (a name with
    both a single and a double quote cannot be quoted there)."""
    from nws.tracking.tags import quote

    if not name.strip():
        raise ParameterError("campaign", "must not be empty")
    try:
        quote(name)
    except ValueError as e:
        raise ParameterError("campaign", str(e)) from None


@dataclass(frozen=True)
class Selection:
    """Which net runs form the zoo: the built-in condition AND the user's filter. The
    parameters of every entry point that selects nets (`train`, `export_nws`) start with these."""

    experiment: str = param(
        "",
        "MLflow experiments to select nets from, comma list, or * for all (default: the one runs go to: "
        "$MLFLOW_EXPERIMENT_NAME or $MLFLOW_EXPERIMENT_ID, else nws)",
    )
    filter: str = param("", "MLflow search filter, AND-ed with: finished net runs with complete snapshots")
    min_test_accuracy: float = param(0.0, "leave out nets below this test accuracy", Real(0.0, 1.0))

    def query(self) -> Any:
        """The selected nets (`nws.zoo.query.query_nets`), or one line naming the parameter that
        selects none: an unknown experiment, a filter MLflow refuses or one that matches nothing."""
        from mlflow.exceptions import MlflowException

        from nws.tracking.experiments import ALL_EXPERIMENTS, experiment_name, working_experiment
        from nws.zoo.query import UnknownExperiment, filter_string, query_nets

        experiments: list[str] | None = names_list(self.experiment)
        if ALL_EXPERIMENTS in experiments:
            experiments = None
        elif not experiments:
            experiments = [experiment_name(working_experiment())]
        try:
            nets = query_nets(experiments, self.filter, self.min_test_accuracy)
        except UnknownExperiment as e:
            raise ParameterError("experiment", str(e)) from None
        except MlflowException as e:
            raise ParameterError("filter", str(e.message).splitlines()[0]) from None
        if nets.empty:
            raise ParameterError(
                "filter",
                "no finished net run with complete snapshots matches "
                f"{filter_string(self.filter, self.min_test_accuracy)!r}",
            )
        return nets
