"""NWS interoperability: import the published layout (refusals, exact round trips, resume,
training on the published split), export ours in it and in the Small CNN Zoo layout."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from nws import cli
from nws.commands.export_nws import ExportOptions, run_export
from nws.formats.small_cnn_zoo import config_column
from nws.net.cnn import build_model
from nws.net.snapshots import flatten, load_into, weight_layout
from nws.space import PROPERTY_NAMES, NetConfig
from nws.tracking.tags import TAG_SOURCE_PATH, TAG_WEIGHTS_DIGEST, WEIGHTS_ARTIFACT
from tests import published as pub
from tests.conftest import ROOT
from tests.processes import alive, descendants

FIXED = ["mnist", 0.0021, 64, "True", "False", 0, 0, 2, 5, 3, 2, 8, 128]  # the released True/False
MAIN_1 = ["cifar10", 0.0043, 32, 1, 1, 1, 3, 3, 3, 4, 3, 4, 64]
MAIN_2 = ["svhn", 0.0011, 128, 1, 0, 2, 1, 1, 7, 3, 2, 4, 64]


def sizes(values):
    return pub.conv_fc_sizes(*values[8:])


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Three good nets (fixed + two main architectures) and seven broken ones."""
    base = tmp_path_factory.mktemp("published")
    root, outside = base / "root", base / "outside"
    pub.write_net(outside / "net", FIXED, pub.published_weights(sum(sizes(FIXED)), 9))
    good = {"A": FIXED, "B": MAIN_1, "C": MAIN_2}
    weights = {}
    for seed, (name, values) in enumerate(good.items()):
        weights[name] = pub.published_weights(sum(sizes(values)), seed)
        pub.write_net(root / "nets" / name, values, weights[name])
    n = sum(sizes(FIXED))
    pub.write_net(root / "nets" / "F", FIXED, pub.published_weights(n, 5)[:, :-3])  # wrong length
    pub.write_net(root / "nets" / "G", FIXED, pub.published_weights(n, 6))
    (root / "nets" / "G" / "weights" / "007.bin").unlink()  # a missing snapshot
    pub.write_net(root / "nets" / "H", [*FIXED[:5], 7, *FIXED[6:]], pub.published_weights(n, 7))
    nan = pub.published_weights(n, 8)
    nan[12, 100] = np.nan
    pub.write_net(root / "nets" / "I", FIXED, nan)
    os.symlink(outside / "net", root / "nets" / "E")  # a link that leaves the root
    pub.write_net(root / "nets" / "J", FIXED, pub.published_weights(n, 10))
    (root / "nets" / "J" / "meta.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")  # damaged
    fixed_rows = [
        pub.index_row(FIXED, sizes(FIXED), p)
        for p in ("nets/A", "../outside/net", "nets/E", "nets/F", "nets/G", "nets/H", "nets/I", "nets/J")
    ]
    fixed_rows[5]["optimizer"] = 0  # the index says adam, meta.csv holds the unknown code 7
    main_rows = [
        pub.index_row(MAIN_1, sizes(MAIN_1), str(root / "nets" / "B")),  # absolute, inside
        pub.index_row(MAIN_2, sizes(MAIN_2), "nets/C"),
    ]
    return {
        "root": root,
        "fixed": pub.write_index(root / "nws_fixed_train.csv", fixed_rows),
        "main": pub.write_index(root / "nws_main_test.csv", main_rows),
        "weights": weights,
        "configs": {k: NetConfig.from_values(v) for k, v in good.items()},
    }


def run_cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return code, out.getvalue(), err.getvalue()


def imported_runs(status=None):
    query = "tags.`nws.source` = 'nws-import'" + (f" and attributes.status = '{status}'" if status else "")
    return mlflow.search_runs(search_all_experiments=True, filter_string=query, output_format="list")


@pytest.fixture
def imported(tracking_uri, published):
    code, out, err = run_cli(
        "import_nws", "--csv", f"{published['fixed']},{published['main']}", "--root", str(published["root"])
    )
    return code, out, err, {r.data.tags[TAG_SOURCE_PATH].split("/")[-1]: r for r in imported_runs()}


@pytest.mark.slow
def test_each_broken_net_is_refused_with_its_reason_and_the_others_are_imported(imported):
    code, out, err, runs = imported
    assert code == 1
    assert "imported 3 nets, skipped 0 already imported, refused 7" in out, err
    assert sorted(runs) == ["A", "B", "C"]
    assert all(r.info.status == "FINISHED" for r in runs.values())
    refusals = [line for line in err.splitlines() if line.startswith("refused ")]
    reasons = "\n".join(refusals)
    assert len(refusals) == 7
    assert reasons.count("leads outside the root") == 2  # ../ and the symlink
    assert "weights/001.bin holds 92865 values, not weightn_conv + weightn_fc = 92868" in reasons
    assert "weights/007.bin is missing" in reasons
    assert "meta.csv: optimizer: '7' is not one of adam, rmsprop, momentum" in reasons
    assert "weights/013.bin holds NaN or infinite weights" in reasons
    assert "meta.csv is not a CSV file" in reasons
    parent = mlflow.get_run(runs["A"].data.tags["mlflow.parentRunId"])
    assert parent.data.metrics == {"imported": 3.0, "skipped": 0.0, "refused": 7.0}
    table = pd.read_csv(
        mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="refusals.csv")
    )
    assert len(table) == 7 and set(table.columns) == {"csv", "path", "reason"}


@pytest.mark.slow
def test_an_imported_net_is_a_run_like_a_sampled_one(imported, published, tmp_path):
    runs = imported[3]
    a = runs["A"]
    assert a.data.params["batch_norm"] == "on" and a.data.params["augmentation"] == "off"
    assert a.data.params["optimizer"] == "adam" and a.data.params["initialization"] == "glorot_uniform"
    assert NetConfig.from_mapping({k: a.data.params[k] for k in PROPERTY_NAMES}) == published["configs"]["A"]
    tags = a.data.tags
    assert (tags["nws.role"], tags["nws.subset"], tags["nws.campaign"]) == ("net", "fixed", "nws-fixed")
    assert tags["nws.split"] == "train" and tags["nws.source_csv"] == "nws_fixed_train.csv"
    assert runs["B"].data.tags["nws.subset"] == "main" and runs["B"].data.tags["nws.split"] == "test"
    (trained_on,) = a.inputs.dataset_inputs
    assert trained_on.dataset.name == a.data.params["dataset"]
    assert {t.key: t.value for t in trained_on.tags}["nws.source_csv"] == "nws_fixed_train.csv"
    assert json.loads(trained_on.dataset.source)["tags"]["nws.source"] == "imported"
    history = MlflowClient().get_metric_history(a.info.run_id, "train_accuracy")
    errors = np.fromfile(published["root"] / "nets" / "A" / "error.bin").reshape(-1, 5)
    assert [m.step for m in history] == list(range(30))
    np.testing.assert_allclose([m.value for m in history], 1 - errors[:, 1] / 100)
    assert a.data.metrics["epochs"] == 29 and a.data.metrics["train_seconds"] == 123.5
    for name in ("A", "B", "C"):
        run = runs[name]
        path = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, dst_path=str(tmp_path / name), artifact_path="snapshots"
        )
        weights = np.load(f"{path}/weights.npy")
        assert weights.dtype == np.float32
        np.testing.assert_array_equal(weights.astype(np.float64), published["weights"][name])
        doc = json.loads(Path(path, "layout.json").read_text())
        assert [s["epoch"] for s in doc["snapshots"]] == np.round(np.linspace(0, 29, 20)).astype(int).tolist()
        assert run.data.metrics["weightn_conv"] == sizes([FIXED, MAIN_1, MAIN_2]["ABC".index(name)])[0]


def test_the_published_vector_round_trips_through_our_keras_model(published):
    for name, config in published["configs"].items():
        layout = weight_layout(config)
        row = published["weights"][name][19].astype(np.float32)
        model = build_model(config)
        load_into(model, row, layout)
        np.testing.assert_array_equal(flatten(model, layout), row)
        kernel = model.get_layer("conv1_1").kernel.numpy()
        k = config.filter_size
        # The first k*k values are output channel 0, input channel 0 of the first conv kernel.
        np.testing.assert_array_equal(row[: k * k], kernel[:, :, 0, 0].ravel())


def test_read_ahead_keeps_the_order_and_loads_the_next_nets_files(published):
    from nws.formats import nws as nws_format
    from nws.formats.importer import ImportJob, NetTask, _read_ahead

    job = ImportJob(published["fixed"], {}, published["root"], "fixed", "train", "c")
    tasks = [(job, NetTask(job, published["root"] / "nets" / n, ())) for n in "ABGX"]  # G, X: files missing
    tasks.insert(2, (job, ("refused", "outside the root")))
    taken = []

    def source():
        for task in tasks:
            taken.append(task)
            yield task

    ahead = _read_ahead(source(), prints=20, depth=2)
    assert next(ahead) is tasks[0] and taken == tasks[:3]  # two more taken, their files loading
    assert [*ahead] == tasks[1:] and taken == tasks
    files = nws_format.net_files(published["root"] / "nets" / "A")
    assert len(files) == 23 and files[1].name == "001.bin" and files[20].name == "020.bin"
    assert all(f.is_file() for f in files)


@pytest.mark.slow
def test_a_second_import_skips_what_is_there(imported, published):
    code, out, _ = run_cli(
        "import_nws",
        "--csv",
        f"{published['fixed']},{published['main']}",
        "--root",
        str(published["root"]),
        "--allow-refused",
        "true",
    )
    assert code == 0
    assert "imported 0 nets, skipped 3 already imported, refused 7" in out
    assert len(imported_runs()) == 3


def test_an_import_into_an_mlflow_server_matches_one_into_a_database(
    imported, published, mlflow_server, monkeypatch, tmp_path
):
    """A database store gets each net in one transaction (nws.tracking.sql); a server gets it
    through MLflow's client: the runs read back the same."""
    local, local_client = imported[3], MlflowClient()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "served-import")
    mlflow.set_tracking_uri(mlflow_server.url)
    csvs = f"{published['fixed']},{published['main']}"
    root = str(published["root"])
    code, out, err = run_cli(
        "import_nws", "--csv", csvs, "--root", root, "--allow-refused", "true", "--workers", "1"
    )
    assert code == 0, err
    assert "imported 3 nets, skipped 0 already imported, refused 7" in out
    served = {r.data.tags[TAG_SOURCE_PATH].split("/")[-1]: r for r in imported_runs()}
    assert sorted(served) == ["A", "B", "C"]
    curves = []
    for name, run in served.items():
        twin = local[name]
        assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
        assert run.data.params == twin.data.params and run.data.metrics == twin.data.metrics
        ids = {"mlflow.parentRunId"}
        assert {k: v for k, v in run.data.tags.items() if k not in ids} == {
            k: v for k, v in twin.data.tags.items() if k not in ids
        }
        for client, run_id in ((MlflowClient(), run.info.run_id), (local_client, twin.info.run_id)):
            curves.append([(m.step, m.value) for m in client.get_metric_history(run_id, "test_accuracy")])
        assert curves[-1] == curves[-2] and len(curves[-1]) == 30
        path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / name),
                                                   artifact_path=WEIGHTS_ARTIFACT)  # fmt: skip
        np.testing.assert_array_equal(np.load(path), published["weights"][name].astype(np.float32))


@pytest.fixture(scope="module")
def two_inits(tmp_path_factory):
    """Ten fixed-architecture nets, constant vs normal initialisation, six train and four test."""
    root = tmp_path_factory.mktemp("two-inits")
    n = sum(sizes(FIXED))
    rows = {"train": [], "test": []}
    for i in range(10):
        init = i % 2  # 0 constant, 1 normal
        values = [*FIXED[:7], init, *FIXED[8:]]
        weights = np.full((20, n), 0.1) if init == 0 else pub.published_weights(n, 100 + i)
        weights[:, :3] += i * 1e-3  # distinct content per net
        pub.write_net(root / "nets" / f"n{i}", values, weights)
        rows["test" if i >= 6 else "train"].append(pub.index_row(values, sizes(FIXED), f"nets/n{i}"))
    return {part: pub.write_index(root / f"nws_fixed_{part}.csv", r) for part, r in rows.items()}


def finished_count(db) -> int:
    try:
        with sqlite3.connect(db) as con:
            return con.execute(
                "select count(*) from runs r join tags t on r.run_uuid = t.run_uuid "
                "where r.status = 'FINISHED' and t.key = 'nws.snapshots'"
            ).fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_an_interrupted_import_resumes_and_finishes(tracking_uri, two_inits, tmp_path):
    """Killed (SIGKILL) mid-import, worker processes included; the next call finishes the job."""
    csvs = f"{two_inits['train']},{two_inits['test']}"
    db = tmp_path / "mlflow.db"
    mlflow.search_experiments()  # the store is made here: its artifact root is tmp_path, not the project
    importer = subprocess.Popen(
        [sys.executable, "-m", "entrypoints.import_nws", "--csv", csvs, "--workers", "2"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while finished_count(db) < 2 and time.monotonic() < deadline and importer.poll() is None:
        time.sleep(0.05)
    workers = descendants(importer.pid)
    assert len(workers) >= 3, "a fork server and two worker processes"
    importer.send_signal(signal.SIGKILL)
    importer.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in workers), "worker processes outlived the killed import"
    done_before = finished_count(db)
    assert 2 <= done_before < 10, "the kill should land mid-import"
    code, out, _ = run_cli("import_nws", "--csv", csvs)
    assert code == 0
    assert f"imported {10 - done_before} nets, skipped {done_before} already imported, refused 0" in out
    finished = imported_runs("FINISHED")
    assert len(finished) == 10
    assert len({r.data.tags[TAG_SOURCE_PATH] for r in finished}) == 10
    assert not imported_runs("RUNNING")  # an interrupted attempt is marked, never left running


@pytest.mark.slow
def test_train_works_on_imported_nets_with_the_published_split(tracking_uri, two_inits):
    from nws.commands.train import TrainOptions, run_training

    code, _, _ = run_cli("import_nws", "--csv", f"{two_inits['train']},{two_inits['test']}")
    assert code == 0
    table = run_training(
        TrainOptions(
            props="initialization",
            K="11,20",
            models="stats,layer_stats",
            split="published",
            slice_length=1000,
            register=False,
        )
    )
    assert (table["n_test_nets"] == 4).all() and (table["n_train_nets"] == 6).all()
    assert (table["net_accuracy"] == 1.0).all()
    parent = mlflow.search_runs(
        search_all_experiments=True, output_format="list", filter_string="tags.`nws.role` = 'meta'"
    )[0]
    selection = pd.read_csv(
        mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="selection.csv")
    )
    runs = {r.info.run_id: r for r in imported_runs()}
    for row in selection.itertuples():
        if row.split_initialization == "test":
            assert runs[row.run_id].data.tags["nws.split"] == "test"


def export(tmp_path, **options):
    return run_export(ExportOptions(out=str(tmp_path / "out"), **options))


def test_export_writes_the_published_layout_that_reads_back_by_its_documented_meaning(in_meta_zoo, tmp_path):
    out = export(tmp_path)
    csvs = sorted(p.name for p in out.glob("*.csv"))
    assert csvs == ["nws_fixed_test.csv", "nws_fixed_train.csv"]
    index = pd.concat([pd.read_csv(out / name) for name in csvs])
    assert len(index) == 30 and list(index.columns[:16]) == [
        *PROPERTY_NAMES,
        "weightn_conv",
        "weightn_fc",
        "path",
    ]
    assert len(pd.read_csv(out / "nws_fixed_test.csv")) == 6  # test_fraction 0.2
    client = MlflowClient()
    for row in index.head(4).itertuples():
        net = out / row.path  # relative to the export root
        meta = pd.read_csv(net / "meta.csv")
        assert list(meta.columns) == list(PROPERTY_NAMES)
        assert meta["optimizer"][0] in (0, 1, 2) and meta["batch_norm"][0] == 1
        assert meta["dataset"][0] == row.dataset
        stat = np.fromfile(net / "stat.bin")
        error = np.fromfile(net / "error.bin").reshape(-1, 5)
        assert len(stat) == 4 and len(error) == int(stat[0]) == 1  # max_epochs=0: one evaluation
        original = np.load(
            mlflow.artifacts.download_artifacts(
                run_id=row.run_id,
                artifact_path=WEIGHTS_ARTIFACT,
                dst_path=str(tmp_path / row.run_id),
            )
        )
        for k in range(1, 4):
            x = np.fromfile(net / "weights" / f"{k:03d}.bin", dtype=np.float64)
            assert len(x) == row.weightn_conv + row.weightn_fc  # the published reader's assertion
            np.testing.assert_array_equal(x, original[k - 1].astype(np.float64))
        run = client.get_run(row.run_id)
        assert 100 * (1 - run.data.metrics["test_accuracy"]) == pytest.approx(error[-1, 3])


def test_export_then_import_gives_back_the_same_weights_and_properties(in_meta_zoo, tmp_path, monkeypatch):
    out = export(tmp_path, filter="params.dataset = 'shapes'")
    originals = {
        r.info.run_id: r
        for r in mlflow.search_runs(
            search_all_experiments=True,
            output_format="list",
            filter_string="tags.`nws.role` = 'net' and params.dataset = 'shapes'",
        )
    }
    other = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    mlflow.set_tracking_uri(other)
    code, out_text, _ = run_cli(
        "import_nws", "--csv", f"{out / 'nws_fixed_train.csv'},{out / 'nws_fixed_test.csv'}", "--prints", "3"
    )
    assert code == 0 and f"imported {len(originals)} nets" in out_text
    for run in imported_runs():
        source_id = run.data.tags[TAG_SOURCE_PATH].rstrip("/").split("/")[-1]
        original = originals[source_id]
        for name in PROPERTY_NAMES:
            assert run.data.params[name] == original.data.params[name], name
        again = np.load(
            mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, dst_path=str(tmp_path / "a"), artifact_path=WEIGHTS_ARTIFACT
            )
        )
        assert run.data.tags[TAG_WEIGHTS_DIGEST] == original.data.tags[TAG_WEIGHTS_DIGEST]
        assert again.shape == (3, 92868)


def test_small_cnn_zoo_layout_reads_back_with_numpy_and_pandas(in_meta_zoo, tmp_path):
    out = export(tmp_path, format="cnn_zoo")
    weights = np.load(out / "weights.npy")
    metrics = pd.read_csv(out / "metrics.csv.gz")
    layout = pd.read_csv(out / "layout.csv")
    assert weights.shape == (90, 92868) and weights.dtype == np.float32
    assert len(metrics) == 90 and {
        "step",
        "train_accuracy",
        "test_accuracy",
        "train_loss",
        "test_loss",
        "config.dataset",
        "config.learning_rate",
        "config.optimizer",
    } <= set(metrics.columns)
    assert list(layout.columns) == ["varname", "start_idx", "end_idx", "shape"]
    assert layout["end_idx"].iloc[-1] == 92868 and layout["varname"][0] == "conv1_1/kernel:0"
    row = 4  # net 1, snapshot 2
    run_id = metrics["run_id"][row]
    ours = np.load(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, dst_path=str(tmp_path / "w"), artifact_path=WEIGHTS_ARTIFACT
        )
    )[1]
    config = NetConfig.from_mapping({n: metrics[config_column(n)][row] for n in PROPERTY_NAMES})
    model = build_model(config)
    load_into(model, ours, weight_layout(config))
    for entry in layout.itertuples():
        shape = tuple(int(x) for x in entry.shape.strip("()").split(",") if x.strip())
        layer, variable = entry.varname.removesuffix(":0").split("/")
        expected = getattr(model.get_layer(layer), variable).numpy()
        np.testing.assert_array_equal(weights[row, entry.start_idx : entry.end_idx].reshape(shape), expected)


def test_export_bad_input(in_meta_zoo, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    code, _, err = run_cli("export_nws", "--out", str(tmp_path / "full"))
    assert code == 2 and err.strip().endswith("is not empty")
    code, _, err = run_cli("export_nws", "--out", str(tmp_path / "o"), "--format", "parquet")
    assert code == 2 and "format: 'parquet' is not one of nws, cnn_zoo" in err
    code, _, err = run_cli("import_nws", "--csv", str(tmp_path / "missing.csv"))
    assert code == 2 and err.strip().splitlines()[-1].endswith("missing.csv does not exist")
