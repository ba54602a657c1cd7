"""The `import_cnn_zoo` entry point: a Small CNN Zoo directory (Unterthiner et al., 2020) as MLflow
net runs that `train` uses like sampled ones. Its parameters, checked here; the import itself runs
in `nws.formats.cnn_zoo_import`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from nws.checks import Count
from nws.commands.options import check_campaign, check_declared, param
from nws.errors import DataError, ParameterError
from nws.formats.importer import ImportSummary


@dataclass(frozen=True)
class ImportZooOptions:
    """The parameters of the `import_cnn_zoo` entry point."""

    dir: str = param("", "the zoo's directory: weights.npy, metrics.csv.gz, layout.csv")
    campaign: str = param("cnn-zoo", "the nws.campaign tag of the imported nets")
    checkpoints: int = param(0, "checkpoints every net must have (0: the number most nets have)", Count(0))
    allow_refused: bool = param(False, "exit 0 even when some nets were refused")

    def directory(self) -> Path:
        if not self.dir.strip():
            raise ParameterError("dir", "no directory given")
        path = Path(self.dir).expanduser()
        if not path.is_dir():
            raise ParameterError("dir", f"{path} is not a directory")
        check_campaign(self.campaign)
        check_declared(self)
        return path


def run_import_zoo(options: ImportZooOptions) -> ImportSummary:
    """Import the zoo's nets (`nws.formats.cnn_zoo_import.import_zoo`); a directory that is not
    a readable zoo is one line naming `dir`, before any run is made."""
    from nws.formats.cnn_zoo_import import import_zoo
    from nws.formats.cnn_zoo_reader import CnnZoo

    directory = options.directory()
    try:
        CnnZoo(directory)
    except DataError as e:
        raise ParameterError("dir", str(e)) from None
    return import_zoo(directory, options.campaign, options.checkpoints, asdict(options))
