"""The `export_nws` entry point: selected net runs in the published NWS layout or the Small CNN
Zoo layout. Its parameters, checked here; the export itself runs in `nws.formats.exporter`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nws.checks import SEED, Directory, Real, writable_directory
from nws.commands.options import Selection, check_declared, param
from nws.errors import ParameterError
from nws.formats.exporter import LAYOUTS
from nws.zoo.cache import default_cache_dir


@dataclass(frozen=True)
class ExportOptions(Selection):
    """The parameters of the `export_nws` entry point: the selection (as `train`), then where."""

    out: str = param("nws-export", "output directory", Directory())
    format: str = param("nws", "nws (the published layout) or cnn_zoo (Small CNN Zoo, one architecture)")
    test_fraction: float = param(
        0.2,
        "share of nets written to the test CSV when a net has no nws.split tag",
        Real(0.0, 1.0, high_open=True),
    )
    seed: int = param(0, "seed of that train/test assignment", SEED)
    absolute_paths: bool = param(False, "write absolute paths into the index CSVs")
    kernels_only: bool = param(False, "cnn_zoo: write kernels and biases only, no batch-norm variables")
    cache_dir: str = param("", "snapshot cache (default $NWS_CACHE_DIR or ~/.cache/nws/zoo)", Directory())

    def validate(self) -> Path:
        if self.format not in LAYOUTS:
            raise ParameterError("format", f"{self.format!r} is not one of {', '.join(LAYOUTS)}")
        if self.kernels_only and self.format != "cnn_zoo":
            raise ParameterError("kernels_only", "applies to format cnn_zoo only")
        check_declared(self)  # test_fraction, seed; out and cache_dir tried for real
        out = Path(self.out).expanduser()
        if out.exists() and any(out.iterdir()):
            raise ParameterError("out", f"{out} exists and is not empty")
        writable_directory("cache_dir", self.cache_dir or default_cache_dir())
        return out


def run_export(options: ExportOptions) -> Path:
    """Select the nets, then write them (`nws.formats.exporter.export_nets`)."""
    from nws.formats.exporter import export_nets
    from nws.zoo.cache import ArtifactCache

    out = options.validate()
    nets = options.query()
    if options.format == "cnn_zoo" and nets["n_weights"].nunique() != 1:
        raise ParameterError(
            "format", "cnn_zoo needs nets of one architecture (select e.g. the fixed subset)"
        )
    cache = ArtifactCache(Path(options.cache_dir).expanduser() if options.cache_dir else None)
    export_nets(nets, out, options.format, cache, options.test_fraction, options.seed, options.absolute_paths,
                options.kernels_only)  # fmt: skip
    print(f"exported {len(nets)} nets to {out} ({options.format} layout)")
    return out
