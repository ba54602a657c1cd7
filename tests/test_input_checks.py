"""Input checked early, and nothing written outside its place: a run's tag that would lead an export
out of `--out`, the Optuna storage that is MLflow's own database however it is spelled, directories
that cannot be written, and `main`'s parameters checked before the first net is trained. Each case
ends in one line naming what is wrong and exit code 2, before any training."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from nws import cli
from nws.campaign.storage import open_storage
from nws.errors import ParameterError
from nws.net.snapshots import weight_layout
from nws.space import NetConfig
from nws.tracking.tags import TAG_SUBSET
from tests import published as pub
from tests.conftest import ROOT

FIXED = ["mnist", 0.0021, 64, 1, 0, 0, 0, 2, 5, 3, 2, 8, 128]


def run_cli(*args: str) -> tuple[int, str, list[str]]:
    """Exit code, stdout and the lines of stderr of `nws ARGS` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as exit:  # argparse's usage errors
            code = exit.code
    return code, out.getvalue(), err.getvalue().strip().splitlines()


def runs(role: str) -> list:
    return mlflow.search_runs(
        search_all_experiments=True, output_format="list", filter_string=f"tags.`nws.role` = '{role}'"
    )


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


# --- export: a run's subset tag must not lead out of --out --------------------------------------


@pytest.fixture(scope="module")
def net_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A tracking store with one finished net run (a published net imported with the real entry
    point), made once for this module: its URI and the run id."""
    root = tmp_path_factory.mktemp("net-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    sizes = pub.conv_fc_sizes(*FIXED[8:])
    pub.write_net(root / "published" / "net", FIXED, pub.published_weights(sum(sizes), 0, prints=2))
    csv = pub.write_index(root / "published" / "nws_fixed_train.csv", [pub.index_row(FIXED, sizes, "net")])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(root)
        mlflow.set_tracking_uri(uri)
        code, _, err = run_cli("import_nws", "--csv", str(csv), "--prints", "2", "--workers", "1")
        assert code == 0, err
        (net,) = runs("net")
        mlflow.set_tracking_uri(None)
    return uri, net.info.run_id


@pytest.fixture
def one_net(net_store: tuple[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """The module's store for one test; its net's subset tag is `fixed` again afterwards."""
    uri, run_id = net_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    yield run_id
    MlflowClient().set_tag(run_id, TAG_SUBSET, "fixed")
    mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("tag", ["../../escaped", "absolute"])
def test_export_refuses_a_subset_tag_that_leads_out_of_out(one_net, tmp_path, tag):
    escaped = tmp_path / "escaped"
    value = str(escaped) if tag == "absolute" else tag  # out / value / run id lands in `escaped`
    out = tmp_path / "a" / "b"
    MlflowClient().set_tag(one_net, TAG_SUBSET, value)
    before = files_under(tmp_path)
    code, _, err = run_cli("export_nws", "--out", str(out), "--cache-dir", str(tmp_path / "cache"))
    assert code == 2
    assert err == [
        f"nws export_nws: error: run {one_net}: its {TAG_SUBSET} tag {value!r} is not one of "
        "fixed, main; nothing was exported"
    ]
    assert not escaped.exists()
    assert files_under(tmp_path) == before  # nothing written anywhere, out included


def test_export_writes_inside_out_when_the_tags_are_sound(one_net, tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli("export_nws", "--out", str(out), "--cache-dir", str(tmp_path / "cache"))
    assert code == 0, err
    written = files_under(out)
    assert out / "fixed" / one_net / "weights" / "002.bin" in written
    assert all(out.resolve() in p.resolve().parents for p in written)


def test_export_directories_refuse_run_ids_that_are_not_plain_ids(tmp_path):
    import pandas as pd

    from nws.errors import DataError
    from nws.formats.exporter import export_directories

    nets = pd.DataFrame({"run_id": ["0123abcd", "../../x"], "subset": ["fixed", "main"]})
    with pytest.raises(DataError, match=r"^run '\.\./\.\./x': not a plain MLflow run id"):
        export_directories(nets, tmp_path)
    directories = export_directories(nets.head(1), tmp_path)
    assert directories == [(tmp_path / "fixed" / "0123abcd").resolve()]


# --- the Optuna storage must not be MLflow's database -------------------------------------------


def test_optuna_storage_that_is_mlflows_database_is_refused_however_it_is_spelled(tracking_uri, tmp_path):
    db = tmp_path / "mlflow.db"  # the fixture's tracking store; the working directory is tmp_path
    mlflow.search_experiments()  # MLflow creates its database
    (tmp_path / "x").mkdir()
    os.symlink(db, tmp_path / "link.db")
    os.link(db, tmp_path / "hard.db")
    spellings = [
        f"sqlite:///.././{tmp_path.name}/x/../mlflow.db",
        "sqlite:///./mlflow.db",
        f"sqlite:///{tmp_path / 'link.db'}",
        f"sqlite:///{tmp_path / 'hard.db'}",
        str(db),  # a journal file path
        f"journal:{tmp_path / 'link.db'}",
    ]
    for storage in spellings:
        with pytest.raises(ParameterError, match=r"^storage: .* is MLflow's tracking database"):
            open_storage(storage)
    tables = {row[0] for row in sqlite3.connect(db).execute("select name from sqlite_master")}
    assert "studies" not in tables and "experiments" in tables  # Optuna wrote nothing into it
    code, _, err = run_cli("sample", "--storage", "sqlite:///link.db")
    assert code == 2 and len(err) == 1
    assert err[0].startswith("nws sample: error: storage: sqlite:///link.db is MLflow's tracking database")
    assert open_storage(f"sqlite:///{tmp_path / 'optuna.db'}") is not None  # another file is fine


def test_the_default_tracking_store_counts_as_mlflows_database(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(None)
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    for storage in ("sqlite:///mlflow.db", "mlflow.db"):
        with pytest.raises(ParameterError, match="is MLflow's tracking database"):
            open_storage(storage)
    assert not (tmp_path / "mlflow.db").exists()


# --- directories that cannot be written -------------------------------------------------------


def test_a_file_where_a_directory_is_needed_is_one_line_naming_the_parameter(tracking_uri, tmp_path):
    file = tmp_path / "file"
    file.write_text("not a directory")
    cases = [
        (["train", "--cache-dir", str(file)], f"cache_dir: {file} is not a directory"),
        (["train", "--cache-dir", str(file / "cache")], f"cache_dir: {file} is not a directory"),
        (["export_nws", "--out", str(file)], f"out: {file} is not a directory"),
        (["export_nws", "--out", str(file / "out")], f"out: {file} is not a directory"),
        (["export_nws", "--out", str(tmp_path / "o"), "--cache-dir", str(file / "c")],
         f"cache_dir: {file} is not a directory"),
        (["sample", "--storage", str(file / "journal.log")], f"storage: {file} is not a directory"),
        (["sample", "--storage", str(tmp_path)], f"storage: {tmp_path} is a directory, not a journal file"),
    ]  # fmt: skip
    for args, message in cases:
        code, _, err = run_cli(*args)
        assert (code, err) == (2, [f"nws {args[0]}: error: {message}"]), args
    assert file.read_text() == "not a directory"
    assert not (tmp_path / "mlflow.db").exists()  # refused before MLflow was touched


@pytest.mark.slow
def test_read_only_directories_are_one_line_naming_the_parameter(tmp_path):
    """Root ignores permissions, so as root the directory is a read-only bind mount in a private
    mount namespace (it disappears with the process); otherwise it is chmod 0555."""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    calls = [["train", "--cache-dir", f"{read_only}/cache"], ["sample", "--storage", f"{read_only}/j.log"],
             ["export_nws", "--out", f"{read_only}/out"]]  # fmt: skip
    script = (f"from nws.cli import main\nfor args in {calls!r}:\n    try:\n        code = main(args)\n"
              "    except SystemExit as e:\n        code = e.code\n    print(code, flush=True)")  # fmt: skip
    command = [sys.executable, "-c", script]
    if os.geteuid() == 0:
        if not shutil.which("unshare"):
            pytest.skip("running as root without unshare: no way to make a read-only directory")
        remount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
        command = ["unshare", "--mount", "sh", "-c", remount, str(read_only), *command]
    else:
        read_only.chmod(0o555)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    if os.geteuid() == 0 and "mount" in done.stderr and not done.stdout:
        pytest.skip(f"no read-only bind mount here: {done.stderr.strip()}")
    read_only.chmod(0o755)
    assert done.stdout.split() == ["2", "2", "2"], done.stderr
    lines = done.stderr.strip().splitlines()
    expected = [  # the reason follows: Read-only file system, or Permission denied
        f"nws train: error: cache_dir: {read_only} is not writable (",
        f"nws sample: error: storage: {read_only} is not writable (",
        f"nws export_nws: error: out: {read_only} is not writable (",
    ]
    assert len(lines) == 3, lines
    assert all(line.startswith(start) for line, start in zip(lines, expected, strict=True)), lines
    assert list(read_only.iterdir()) == []


# --- main: everything that can be checked is checked before the first net -----------------------

FIXED_CONV = weight_layout(NetConfig.from_values(FIXED)).weightn_conv
BOTH_QUOTES = "x' and tags.`nws.role` = \"net"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--K", "7,9", "--prints", "6"],
            "K: '7,9' is not a range a,b within 1..6 (prints: the snapshots each net keeps)",
        ),
        (
            ["--slice-length", str(FIXED_CONV + 1), "--region", "conv"],
            f"slice_length: {FIXED_CONV + 1} is longer than the conv part of the fixed subset's architecture "
            f"({FIXED_CONV} weights)",
        ),
        (["--props", "dataset,filter_size"], "props: does not vary in this campaign: filter_size (always 5)"),
        (
            ["--props", "lrate,dataset", "--datasets", "digits"],
            "props: does not vary in this campaign: dataset (always digits)",
        ),
        (
            ["--models", "layer_stats", "--subset", "main"],
            "models: layer_stats needs nets of one architecture; the main subset draws it",
        ),
        (  # a filter cannot quote it (with one kind of quote it is quoted with the other)
            ["--campaign", BOTH_QUOTES],
            f"campaign: {BOTH_QUOTES!r} holds both ' and \", which an MLflow search filter cannot quote",
        ),
    ],
    ids=["K", "slice_length", "props", "one-dataset", "layer_stats", "campaign"],
)
def test_main_refuses_bad_input_before_the_first_net(tracking_uri, tmp_path, args, message):
    started = time.monotonic()
    code, _, err = run_cli(
        "main", "--n-nets", "2", "--max-epochs", "0", "--min-epochs", "0", "--max-train-images", "64",
        "--max-eval-images", "32", "--storage", str(tmp_path / "optuna.log"), *args,
    )  # fmt: skip
    assert (code, err) == (2, [f"nws main: error: {message}"])
    assert time.monotonic() - started < 5
    assert not (tmp_path / "mlflow.db").exists()  # refused before MLflow was touched: no run, no net
