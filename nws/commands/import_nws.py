"""The `import_nws` entry point: the published NWS dataset's nets as MLflow net runs. Its
parameters and the nets its index CSVs list, checked here; the import itself runs in
`nws.formats.importer`."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from nws.checks import Count
from nws.commands.options import check_declared, param
from nws.errors import DataError, ParameterError
from nws.formats import nws as nws_format
from nws.formats.importer import ImportJob, ImportSummary


@dataclass(frozen=True)
class ImportOptions:
    """The parameters of the `import_nws` entry point."""

    csv: str = param("", "index CSVs of the published data, comma list (e.g. nws_fixed_train.csv)")
    root: str = param("", "directory the CSVs' path column is relative to (default: each CSV's)")
    subset: str = param("", "fixed or main (default: from the CSV name, else main)")
    campaign: str = param("", "the nws.campaign tag of the imported nets (default: nws-<subset>)")
    prints: int = param(nws_format.PUBLISHED_PRINTS, "snapshots per net (weights/001.bin ...)", Count(1))
    workers: int = param(2, "worker processes importing nets in parallel (1: in this process)", Count(1))
    allow_refused: bool = param(False, "exit 0 even when some nets were refused")
    experiment: str = param(
        "",
        "MLflow experiment of the runs (default $MLFLOW_EXPERIMENT_NAME or $MLFLOW_EXPERIMENT_ID, else nws)",
    )

    def csv_paths(self) -> list[Path]:
        paths = [Path(p.strip()).expanduser() for p in self.csv.split(",") if p.strip()]
        if not paths:
            raise ParameterError("csv", "no index CSV given")
        for path in paths:
            if not path.is_file():
                raise ParameterError("csv", f"{path} does not exist")
        check_declared(self)
        if self.subset and self.subset not in ("fixed", "main"):
            raise ParameterError("subset", f"{self.subset!r} is not one of fixed, main")
        if self.root and not Path(self.root).expanduser().is_dir():
            raise ParameterError("root", f"{self.root} is not a directory")
        return paths

    def jobs(self) -> list[ImportJob]:
        """Every net the index CSVs list, with where it is and how its run is tagged."""
        jobs = []
        for csv in self.csv_paths():
            try:
                frame = nws_format.read_published_index(csv)
            except DataError as e:
                raise ParameterError("csv", str(e)) from None
            root = Path(self.root).expanduser() if self.root else csv.parent
            subset = self.subset or nws_format.subset_of(csv) or "main"
            campaign = self.campaign or f"nws-{subset}"
            split = nws_format.split_of(csv)
            jobs += [ImportJob(csv, row, root, subset, split, campaign) for row in frame.to_dict("records")]
        return jobs


def run_import(options: ImportOptions) -> ImportSummary:
    """Import the listed nets (`nws.formats.importer.import_nets`)."""
    from nws.formats.importer import import_nets

    return import_nets(options.jobs(), options.prints, options.workers, asdict(options), options.experiment)


def print_refusals(summary: ImportSummary) -> None:
    for refusal in summary.refused:
        print(
            f"refused {refusal['path']} ({Path(refusal['csv']).name}): {refusal['reason']}", file=sys.stderr
        )
