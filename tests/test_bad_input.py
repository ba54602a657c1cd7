"""Bad input, by class: every option of every entry point declares what it accepts (a checked
kind, `nws.checks`), the CLI applies it when it parses the value, and generated bad values
(Hypothesis) end in exit 2 and one line naming the option, with no traceback and nothing made:
no run, experiment, trial, file or folder. References that need the tracking store (a run id, an
experiment, a journal file) are refused the same way where they are looked up."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nws import cli
from nws.checks import TEXT, Check, Count, Directory, Real, RunId
from nws.commands.options import FALSE_WORDS, TRUE_WORDS, check_of

COMMANDS = cli._commands()
OPTIONS = [(name, f) for name, c in COMMANDS.items() for f in dataclasses.fields(c.options)]
WRITTEN_FOLDERS = ("cache_dir", "out")
"""Folders an entry point writes into: tried for real when parsed. `data_dir` may be a read-only
copy of the datasets; whether it holds them is checked where they are loaded."""


def bad_values(option: dataclasses.Field) -> st.SearchStrategy[str]:
    """Text an option must refuse, from its type and its declared check."""
    check = check_of(option)
    nul = st.text(max_size=8).map(lambda t: t + "\0" + t)
    if str(option.type) == "bool":
        words = TRUE_WORDS | FALSE_WORDS
        return st.text(max_size=12).filter(lambda t: t.strip().lower() not in words)
    if str(option.type) == "int":
        not_whole = st.sampled_from(["1.5", "x", "", "1e3", "nan", "0x10"])
        outside = [st.integers(max_value=check.low - 1).map(str)]
        if check.high is not None:
            outside.append(st.integers(min_value=check.high + 1).map(str))
        return st.one_of(not_whole, *outside)
    if str(option.type) == "float":
        strategies = [st.sampled_from(["nan", "inf", "-inf", "NaN", "x", ""])]
        if check.low is not None:
            below = st.floats(max_value=check.low, exclude_max=not check.low_open, allow_nan=False,
                              allow_infinity=False)  # fmt: skip
            strategies.append(below.map(repr))
        if check.high is not None:
            above = st.floats(min_value=check.high, exclude_min=not check.high_open, allow_nan=False,
                              allow_infinity=False)  # fmt: skip
            strategies.append(above.map(repr))
        return st.one_of(*strategies)
    if isinstance(check, Directory):
        name = st.text(alphabet="abcdefghij", min_size=1, max_size=8)
        return st.one_of(name.map(lambda n: f"/proc/{n}/out"), name.map(lambda n: f"/proc/self/{n}"),
                         name.map(lambda n: f"{sys.executable}/{n}"), nul)  # fmt: skip
    if isinstance(check, RunId):
        return st.one_of(st.text(alphabet="0123456789abcdefxyz-", min_size=1, max_size=40).filter(
            lambda t: len(t.strip()) != 32 or not all(c in "0123456789abcdef" for c in t.strip())
        ).filter(lambda t: t.strip() != ""), nul)  # fmt: skip
    return nul


def run_cli(args: list[str]) -> tuple[object, list[str]]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = cli.main(args)
        except SystemExit as exit:
            code = exit.code
    return code, err.getvalue().strip().splitlines()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One empty working directory and tracking URI for every generated call: it must stay empty."""
    import mlflow

    root = tmp_path_factory.mktemp("bad-input")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        yield root
    mlflow.set_tracking_uri(None)


def test_every_number_and_path_option_declares_what_it_accepts():
    """A new option cannot skip its check: numbers say their range, written folders and run ids
    their kind."""
    for command, option in OPTIONS:
        check = check_of(option)
        assert isinstance(check, Check), (command, option.name)
        if str(option.type) == "int":
            assert isinstance(check, Count), (command, option.name)
        if str(option.type) == "float":
            assert isinstance(check, Real), (command, option.name)
        if option.name in WRITTEN_FOLDERS:
            assert isinstance(check, Directory), (command, option.name)
        if option.name.endswith("run_id"):
            assert isinstance(check, RunId), (command, option.name)
        if str(option.type) == "str" and not isinstance(check, Directory | RunId):
            assert check is TEXT, (command, option.name)
        default = str(option.default).lower() if isinstance(option.default, bool) else str(option.default)
        if not isinstance(check, Directory):  # a default folder may not exist yet
            parsed = cli._checked_type(
                option.name, {"int": int, "float": float}.get(str(option.type), str), check
            )
            if str(option.type) != "bool":
                parsed(default)  # the default itself is accepted


@pytest.mark.parametrize("command,option", OPTIONS, ids=[f"{c}-{o.name}" for c, o in OPTIONS])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_bad_value_is_one_line_naming_the_option_exit_2_and_nothing_made(workdir, command, option, data):
    value = data.draw(bad_values(option), label="value")
    flag = f"--{option.name.replace('_', '-')}"
    code, lines = run_cli([command, f"{flag}={value}"])
    assert code == 2, (value, lines)
    named = flag in lines[0] or f"error: {option.name}: " in lines[0]  # argparse's line, or a check's
    assert len(lines) == 1 and named and "Traceback" not in lines[0], (value, lines)
    assert not any(workdir.iterdir()), sorted(p.name for p in workdir.iterdir())


def nws(*args: str, cwd: Path, uri: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "nws.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def one_error_line(result: subprocess.CompletedProcess, option: str) -> str:
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and option in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def test_references_that_do_not_exist_are_one_line_and_make_nothing(tmp_path):
    """An unknown parent run, an unknown experiment to clean up, a storage that is not a journal."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    journal = tmp_path / "journal.log"
    unknown = "0123456789abcdef0123456789abcdef"
    result = nws("sample", "--parent-run-id", unknown, "--storage", str(journal), "--campaign", "orphan",
                 cwd=tmp_path, uri=uri)  # fmt: skip
    assert unknown in one_error_line(result, "parent_run_id")
    assert not journal.exists()  # no study, no trial

    result = nws("cleanup", "--experiment", "nowhere", "--storage", str(journal), cwd=tmp_path, uri=uri)
    one_error_line(result, "experiment")
    assert MlflowClient(uri).get_experiment_by_name("nowhere") is None

    noise = bytes(range(256)) * 40
    journal.write_bytes(noise)
    for command in ("sample", "cleanup"):
        result = nws(command, "--storage", str(journal), "--campaign", "noise", cwd=tmp_path, uri=uri)
        assert "not an Optuna journal" in one_error_line(result, "storage"), command
        assert journal.read_bytes() == noise  # left as it was
