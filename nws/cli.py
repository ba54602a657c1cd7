"""The `nws` command: one sub-command per MLflow entry point, parameters built from the options
dataclasses. Bad input ends in one line on stderr and exit code 2; nothing heavy (TensorFlow,
MLflow) is imported before the parameters are parsed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NoReturn

from nws import backend, diskspace, interrupts, logs
from nws.checks import Check
from nws.commands.options import check_of, parse_bool
from nws.errors import NWSError, ParameterError

logs.quiet_environment()  # before anything imports TensorFlow, Keras or MLflow


DESCRIPTION = (
    "nws: zoos of small CNNs with Optuna-drawn hyper-parameters, tracked with MLflow, and "
    "meta-classifiers that tell from a net's weights which hyper-parameters made it. One sub-command "
    "per MLflow entry point, with the same parameters (mlflow run . -e NAME -P key=value)."
)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    options: type
    run: Callable[[Any], int]
    example: str
    tensorflow: bool = True  # started (quietly, `nws.logs`) once the parameters are parsed


def _sample(options: Any) -> int:
    from nws.commands.sample import run_campaign

    print(run_campaign(options).line())
    return 0


def _train(options: Any) -> int:
    from nws.commands.train import format_table, run_training

    print(format_table(run_training(options)))
    return 0


def _predict(options: Any) -> int:
    from nws.commands.predict import run_predict

    run_predict(options)
    return 0


def _import_nws(options: Any) -> int:
    from nws.commands.import_nws import print_refusals, run_import

    summary = run_import(options)
    print_refusals(summary)
    print(summary.line())
    return 1 if summary.refused and not options.allow_refused else 0


def _import_cnn_zoo(options: Any) -> int:
    from nws.commands.import_cnn_zoo import run_import_zoo

    summary = run_import_zoo(options)
    for refusal in summary.refused:
        print(f"refused net {refusal['path']}: {refusal['reason']}", file=sys.stderr)
    print(summary.line())
    return 1 if summary.refused and not options.allow_refused else 0


def _export_nws(options: Any) -> int:
    from nws.commands.export_nws import run_export

    run_export(options)
    return 0


def _cleanup(options: Any) -> int:
    from nws.commands.cleanup import run_cleanup

    run_cleanup(options)
    return 0


def _main(options: Any) -> int:
    from nws.commands.main import run_main

    run_main(options)
    return 0


def _commands() -> dict[str, Command]:
    from nws.commands.cleanup import CleanupOptions
    from nws.commands.export_nws import ExportOptions
    from nws.commands.import_cnn_zoo import ImportZooOptions
    from nws.commands.import_nws import ImportOptions
    from nws.commands.main import MainOptions
    from nws.commands.predict import PredictOptions
    from nws.commands.sample import SampleOptions
    from nws.commands.train import TrainOptions

    commands = [
        Command("main", "the whole study on the offline datasets: sample, train, register", MainOptions,
                _main,
                example='nws main --n-nets 48 --max-epochs 10'),
        Command("sample", "train a zoo of nets with Optuna-drawn hyper-parameters", SampleOptions,
                _sample,
                example='nws sample --n-nets 8 --subset fixed --datasets digits,shapes --campaign zoo1'),
        Command("train", "train meta-classifiers on nets selected by an MLflow query", TrainOptions,
                _train,
                example='nws train --filter "tags.`nws.campaign` = \'zoo1\'" --K 4,6 --models dmc,stats'),
        Command("predict", "predict a net's hyper-parameters with the registered champions",
                PredictOptions, _predict,
                example="nws predict --run-id <a net's run id>"),
        Command("import_nws", "import the published NWS dataset as MLflow net runs", ImportOptions,
                _import_nws, tensorflow=False,
                example='nws import_nws --csv nws_fixed_train.csv,nws_fixed_test.csv --root /data/nws'),
        Command("import_cnn_zoo", "import a Small CNN Zoo directory as MLflow net runs", ImportZooOptions,
                _import_cnn_zoo,
                example="nws import_cnn_zoo --dir /data/small-cnn-zoo/cifar10 --campaign cifar10-gs"),
        Command("export_nws", "export net runs in the published NWS or the Small CNN Zoo layout",
                ExportOptions, _export_nws, tensorflow=False,
                example='nws export_nws --filter "tags.`nws.campaign` = \'main\'" --out nws-export'),
        Command("cleanup", "list a campaign's RUNNING runs and trials, close those whose process is gone",
                CleanupOptions, _cleanup, tensorflow=False,
                example='nws cleanup --campaign zoo1 --dry-run true'),
    ]  # fmt: skip
    return {c.name: c for c in commands}


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _checked_type(name: str, convert: Callable[[str], Any], check: Check) -> Callable[[str], Any]:
    """argparse's `type` for an option: the text converted (argparse's own line when it is not
    a number), then its declared check, whose `ParameterError` leaves argparse and becomes the
    same one line as any other (`main`), before anything is made."""

    def parse(text: str) -> Any:
        return check(name, convert(text))

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse: "invalid int value: 'x'"
    return parse


def _help_text(text: str, default: Any) -> str:
    """An option's help with its default said once, as the README writes it: true/false for a
    boolean, `empty` for an empty string; a help text that explains its default keeps its own."""
    if "(default" in text:
        return text
    if isinstance(default, bool):
        shown = "true" if default else "false"
    else:
        shown = str(default) if default != "" else "empty"
    return f"{text} (default: {shown})"


def build_parser(commands: dict[str, Command]) -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="nws", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    for command in commands.values():
        p = sub.add_parser(
            command.name, help=command.help, description=command.help,
            epilog=f"example:\n  {command.example}", formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        for f in dataclasses.fields(command.options):
            is_bool = str(f.type) == "bool"
            convert = {"int": int, "float": float, "bool": partial(parse_bool, f.name)}.get(str(f.type), str)
            kind = _checked_type(f.name, convert, check_of(f))
            flags = dict.fromkeys([f"--{f.name.replace('_', '-')}", f"--{f.name}"])
            p.add_argument(
                *flags,
                dest=f.name,
                type=kind,
                default=f.default,
                metavar="{true,false}" if is_bool else None,
                help=_help_text(f.metadata.get("help", ""), f.default),
            )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    commands = _commands()
    try:
        args = build_parser(commands).parse_args(argv)
    except ParameterError as e:  # a value its option's declared check refused
        given = list(sys.argv[1:] if argv is None else argv)
        name = next((a for a in given if a in commands), "")
        print(f"nws {name}: error: {e}" if name else f"nws: error: {e}", file=sys.stderr)
        return 2
    command = commands[args.command]
    prog = f"nws {command.name}"
    values = {k: v for k, v in vars(args).items() if k != "command"}
    restore_signals = interrupts.install()
    try:
        if command.tensorflow and backend.named(values.get("backend", backend.DEFAULT_BACKEND)).tensorflow:
            logs.start_tensorflow()  # a JAX run must not import TensorFlow (`nws.backend`)
        return command.run(command.options(**values))
    except NWSError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        interrupts.forget_unhandled()
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # unexpected: keep the traceback, but end on one clear line
        if diskspace.is_disk_full(e):
            print(f"{prog}: error: {diskspace.message(prog, e, _paths_given(values))}", file=sys.stderr)
            return 1
        traceback.print_exc()
        print(f"{prog}: error: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return 1
    finally:
        restore_signals()


def _paths_given(values: dict[str, Any]) -> list[str]:
    """The files and folders a command was given or writes by default (its option values that
    name paths, MLflow's tracking database, the working directory): where a full disk may be."""
    texts = [str(v) for v in values.values() if isinstance(v, str | os.PathLike) and str(v).strip()]
    if "mlflow" in sys.modules:
        texts.append(sys.modules["mlflow"].get_tracking_uri())
    paths = []
    for text in texts:
        for part in text.split(","):
            part = part.strip().removeprefix("journal:").removeprefix("file://")
            if part.startswith("sqlite:///"):
                part = part.removeprefix("sqlite:///")
                part = part if part.startswith("/") else os.path.join(os.getcwd(), part)
            if "://" not in part and ("/" in part or os.path.exists(part)):
                paths.append(os.path.abspath(os.path.expanduser(part)))
    return [*paths, os.getcwd()]


def mlproject_text() -> str:
    """The MLproject file, rendered from the options dataclasses (tests check the file equals it).

    Regenerate: python -c "from nws.cli import mlproject_text as t; print(t(), end='')" > MLproject
    """

    def default(value: Any) -> str:
        if isinstance(value, bool):
            return '"true"' if value else '"false"'
        return f'"{value}"' if isinstance(value, str) else repr(value)

    lines = [
        "# Generated from the entry points' options by nws.cli.mlproject_text(); do not edit by hand.",
        "name: nws",
        "",
        "conda_env: conda.yaml",
        "",
        "entry_points:",
    ]
    for name, command in _commands().items():
        lines += [f"  {name}:", "    parameters:"]
        flags = []
        for f in dataclasses.fields(command.options):
            kind = {"int": "int", "float": "float"}.get(str(f.type), "string")
            lines.append(f"      {f.name}: {{type: {kind}, default: {default(f.default)}}}")
            flags.append(f"--{f.name.replace('_', '-')} {{{f.name}}}")
        lines.append("    command: >-")
        line = f"      python -m entrypoints.{name}"
        for flag in flags:
            if len(line) + len(flag) + 1 > 100:
                lines.append(line)
                line = "      " + flag
            else:
                line += " " + flag
        lines += [line, ""]
    return "\n".join(lines)


def reference_text() -> str:
    """The docs site's entry-point reference, rendered from the options dataclasses as MLproject
    is (a test checks docs/reference.md equals it), so the reference cannot drift from the code.

    Regenerate: python -c "from nws.cli import reference_text as t; print(t(), end='')" > docs/reference.md
    """

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "<!-- Generated from the entry points' options by nws.cli.reference_text(); do not edit by hand. -->",
        "# Entry-point reference",
        "",
        "Every entry point runs three ways with the same parameters: `mlflow run . -e NAME "
        "--env-manager local -P key=value`, `nws NAME --key value` (or `--key-value`), and "
        "`python -m entrypoints.NAME --key value`. A value its parameter does not accept ends in one "
        "line naming the parameter and exit code 2, before anything is made. The narrative "
        "behind each entry point is in [Entry points](entry-points.md).",
        "",
    ]
    for name, command in _commands().items():
        lines += [f"## `{name}`", "", command.help[0].upper() + command.help[1:] + ".", "",
                  "```bash", command.example, "```", "",
                  "| parameter | default | accepts | meaning |", "|---|---|---|---|"]  # fmt: skip
        for f in dataclasses.fields(command.options):
            if str(f.type) == "bool":
                default, accepts = ("true" if f.default else "false"), "true/false"
            else:
                default, accepts = (str(f.default) if f.default != "" else "empty"), check_of(f).describe()
            help_text = cell(f.metadata.get("help", ""))
            lines.append(f"| `{f.name}` | `{cell(default)}` | {accepts} | {help_text} |")
        lines.append("")
    return "\n".join(lines)


def run_entry_point(name: str) -> NoReturn:
    """What the scripts in entrypoints/ call: `nws <name> <argv...>`."""
    raise SystemExit(main([name, *sys.argv[1:]]))


if __name__ == "__main__":
    raise SystemExit(main())
