"""The zoo: run query, split by net with balanced classes, K and region slicing, the verified
snapshot cache and the consolidated store, against SQLite and an `mlflow server`."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import multiprocessing
import os
import re

import mlflow
import numpy as np
import pandas as pd
import pytest

from nws.commands.options import Selection
from nws.commands.sample import SampleOptions, run_campaign
from nws.commands.train import check_slice_lengths, parse_k
from nws.errors import DataError, ParameterError
from nws.meta import create
from nws.meta.base import MetaSettings, Task
from nws.meta.samples import Samples
from nws.net.regions import region_positions
from nws.tracking.tags import TAG_ROLE, WEIGHTS_ARTIFACT
from nws.zoo.cache import ArtifactCache
from nws.zoo.splits import UnsplittableError, split_nets
from nws.zoo.store import Zoo, build_zoo
from tests import zoo_race
from tests.conftest import META_ZOO

FIXED_CONV, FIXED_TOTAL, FIXED_NONKERNEL = 16880, 92868, 1260  # hand-computed in test_layout.py


def artifact_weights(run_id: str, tmp_path) -> np.ndarray:
    path = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=WEIGHTS_ARTIFACT, dst_path=str(tmp_path / run_id)
    )
    return np.load(path)


def test_query_selects_finished_complete_nets_and_applies_the_filter(in_meta_zoo):
    nets = Selection().query()
    assert len(nets) == 30
    assert set(nets["subset"]) == {"fixed"} and set(nets["prints"]) == {3}
    assert set(nets["n_weights"]) == {FIXED_TOTAL} and set(nets["weightn_conv"]) == {FIXED_CONV}
    shapes = Selection(filter="params.dataset = 'shapes'").query()
    assert set(shapes["dataset"]) == {"shapes"} and 0 < len(shapes) < 30
    with pytest.raises(ParameterError, match=r"^filter: no finished net run"):
        Selection(filter="params.dataset = 'cifar10'").query()
    with pytest.raises(ParameterError, match=r"^filter: "):
        Selection(filter="params.dataset === 'x'").query()
    with pytest.raises(ParameterError, match=r"^experiment: no MLflow experiment named 'nope'"):
        Selection(experiment="nope").query()


def test_a_running_or_incomplete_net_is_never_selected(in_meta_zoo):
    with mlflow.start_run(tags={TAG_ROLE: "net"}) as half_written:
        pass  # FINISHED, but without the completion tag
    nets = Selection().query()
    assert half_written.info.run_id not in set(nets["run_id"])


def test_split_is_by_net_balanced_and_deterministic(in_meta_zoo):
    nets = Selection().query()
    for prop in ("dataset", "optimizer", "initialization", "batch_size"):
        split = split_nets(nets, prop, test_fraction=0.3, seed=5)
        train, valid, test = set(split.train), set(split.valid), set(split.test)
        assert not train & test and not valid & test and not train & valid
        counts_test = np.bincount(split.labels[split.test], minlength=len(split.classes))
        counts_train = np.bincount(
            split.labels[np.r_[split.train, split.valid]], minlength=len(split.classes)
        )
        assert len(set(counts_test)) == 1 and len(set(counts_train)) == 1  # equal nets per class
        assert split.chance == pytest.approx(1 / len(split.classes))
        again = split_nets(nets, prop, test_fraction=0.3, seed=5)
        np.testing.assert_array_equal(again.test, split.test)
    lrate = split_nets(nets, "lrate", 0.2, 0)
    assert lrate.is_regression and len(lrate.test) == 6
    with pytest.raises(UnsplittableError, match=r"^depth_conv has a single class"):
        split_nets(nets, "depth_conv", 0.2, 0)


def test_k_ranges():
    assert parse_k("", 20) == (1, 20)
    assert parse_k("11,20", 20) == (11, 20)
    assert parse_k("20", 20) == (20, 20)
    for bad in ("0,3", "3,2", "1,21", "a,b"):
        with pytest.raises(ParameterError, match=r"^K: "):
            parse_k(bad, 20)


def test_slices_come_from_the_hand_computed_offsets(in_meta_zoo, tmp_path):
    nets = Selection().query()
    zoo = build_zoo(nets, ArtifactCache())
    first = artifact_weights(nets["run_id"][0], tmp_path)
    np.testing.assert_array_equal(zoo.snapshot(0, 2), first[1])
    labels = np.zeros(len(nets))
    length = 100
    fc = Samples.of(zoo, np.array([0, 1]), labels, (2, 3), "fc", length)
    assert fc.k.tolist() == [2, 3, 2, 3]
    assert fc.low.tolist() == [FIXED_CONV] * 4
    assert fc.high.tolist() == [FIXED_TOTAL - length] * 4
    # Row (net 1, k 3) starts after net 0's 3 rows and net 1's first 2.
    assert fc.row_starts()[3] == 3 * FIXED_TOTAL + 2 * FIXED_TOTAL
    conv = Samples.of(zoo, np.array([0]), labels, (1, 1), "conv", length)
    assert (conv.low[0], conv.high[0]) == (0, FIXED_CONV - length)
    starts = conv.even_starts(5)[0]
    assert starts.tolist() == np.round(np.linspace(0, FIXED_CONV - length, 5)).astype(int).tolist()
    np.testing.assert_array_equal(conv.even_slices(0, starts)[4], first[0][starts[4] : starts[4] + length])
    rng = np.random.default_rng(0)
    drawn = fc.random_slices(np.arange(4).repeat(50), rng)
    assert drawn.shape == (200, length)
    with pytest.raises(ParameterError, match=r"^slice_length: 20000 is longer than the conv part"):
        check_slice_lengths(nets, np.arange(len(nets)), "conv", [("slice_length", 20000)], None)


def test_nonkernel_slices_are_cut_from_the_biases_and_batch_norm_laid_end_to_end(in_meta_zoo, tmp_path):
    nets = Selection().query()
    zoo = build_zoo(nets, ArtifactCache())
    first = artifact_weights(nets["run_id"][0], tmp_path)
    second = artifact_weights(nets["run_id"][1], tmp_path)
    positions = region_positions(FIXED_TOTAL, FIXED_CONV, "nonkernel")
    assert len(positions) == FIXED_NONKERNEL
    length = 300
    samples = Samples.of(zoo, np.array([0, 1]), np.zeros(len(nets)), (2, 3), "nonkernel", length)
    assert samples.low.tolist() == [0] * 4 and samples.high.tolist() == [FIXED_NONKERNEL - length] * 4
    assert samples.row_starts().tolist() == [0, FIXED_NONKERNEL, 2 * FIXED_NONKERNEL, 3 * FIXED_NONKERNEL]
    starts = samples.even_starts(4)
    assert starts[3].tolist() == [0, 320, 640, 960]
    for sample, vector in ((0, first[1]), (3, second[2])):
        slices = samples.even_slices(sample, starts[sample])
        np.testing.assert_array_equal(slices[1], vector[positions][320 : 320 + length])
        np.testing.assert_array_equal(slices[3], vector[positions][960:])
    drawn = samples.random_slices(np.arange(4).repeat(20), np.random.default_rng(0))
    region = np.concatenate([v[positions] for v in (first[1], first[2], second[1], second[2])])
    assert drawn.shape == (80, length) and np.isin(drawn, region).all()
    # A whole vector is predicted from evenly spaced slices of the same region (a registered model).
    labels = np.arange(len(nets)) % 2
    train = Samples.of(zoo, np.arange(10), labels, (1, 3), "nonkernel", length)
    model = create("stats", Task("initialization", ("constant", "normal")), MetaSettings(length, "nonkernel"))
    model.fit(train, train)
    window = np.stack([first[1][positions][s : s + length] for s in (0, 320, 640, 960)])
    np.testing.assert_allclose(
        model.predict_vector(first[1], slices=4), model.predict_slices(window).mean(axis=0)
    )
    with pytest.raises(
        ParameterError, match=r"^slice_lengths: 1261 is longer than the nonkernel part .* \(1260 "
    ):
        check_slice_lengths(nets, np.arange(len(nets)), "nonkernel", [("slice_lengths", 1261)], None)


def test_every_build_verifies_every_artifact_and_reuses_an_intact_store(in_meta_zoo):
    nets = Selection().query()
    first = ArtifactCache()
    zoo = build_zoo(nets, first)
    assert first.stats.verified == 30 and first.stats.downloaded == 0  # local store: read in place
    assert not first.stats.store_reused
    assert zoo.size_bytes == 30 * 3 * FIXED_TOTAL * 4
    stored = sum(p.stat().st_size for p in first.root.rglob("*") if p.is_file())
    assert stored < 1_000_000  # an index and a lock: no second copy of the weights
    second = ArtifactCache()
    again = build_zoo(nets, second)
    assert second.stats.store_reused and second.stats.verified == 30  # hashed again, nothing rebuilt
    expected = zoo.snapshot(7, 3)
    np.testing.assert_array_equal(again.snapshot(7, 3), expected)
    os.utime(tracking_path(nets.iloc[7]))  # touched, not changed: its bytes are what counts
    third = ArtifactCache()
    touched = build_zoo(nets, third)
    assert third.stats.store_reused and third.stats.verified == 30 and third.stats.repaired == 0
    np.testing.assert_array_equal(touched.snapshot(7, 3), expected)


def test_a_corrupted_artifact_is_reported_with_its_run(in_meta_zoo, tmp_path):
    nets = Selection(filter="params.dataset = 'shapes'").query()
    victim = nets.iloc[0]
    path = tracking_path(victim)
    original = path.read_bytes()
    try:
        data = bytearray(original)
        data[-8:] = b"\x01" * 8  # same size, different weights (the output biases are 0)
        path.write_bytes(bytes(data))
        with pytest.raises(DataError, match=f"^run {victim.run_id}: snapshot artifact is corrupted"):
            build_zoo(nets, ArtifactCache(tmp_path / "fresh"))
    finally:
        path.write_bytes(original)


def tracking_path(net):
    from nws.zoo.cache import _local_path

    return _local_path(net.artifact_uri) / WEIGHTS_ARTIFACT


def test_the_zoo_works_the_same_against_an_mlflow_server(mlflow_server, monkeypatch, tmp_path, capfd):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(mlflow_server.url)
    try:
        options = dataclasses.replace(
            SampleOptions(**META_ZOO), n_nets=3, campaign="served", storage=str(tmp_path / "optuna.log")
        )
        run_campaign(options)
        nets = Selection(filter="tags.`nws.campaign` = 'served'").query()
        assert len(nets) == 3 and all(u.startswith("mlflow-artifacts:") for u in nets["artifact_uri"])
        cache = ArtifactCache(tmp_path / "cache")
        zoo = build_zoo(nets, cache)
        assert cache.stats.downloaded == 3 and cache.stats.verified == 3
        for i, run_id in enumerate(nets["run_id"]):
            np.testing.assert_array_equal(zoo.snapshot(i, 3), artifact_weights(run_id, tmp_path)[2])
        # A second training on the same nets downloads nothing.
        again = ArtifactCache(tmp_path / "cache")
        build_zoo(nets, again)
        assert again.stats.downloaded == 0 and again.stats.store_reused
        # A truncated cached artifact is detected and fetched again.
        cached = tmp_path / "cache" / "runs" / nets["run_id"][1] / WEIGHTS_ARTIFACT
        cached.write_bytes(cached.read_bytes()[:-100])
        third = ArtifactCache(tmp_path / "cache")
        build_zoo(nets, third)
        assert third.stats.downloaded == 1 and third.stats.reused == 2
        # An empty copy, and one overwritten in place behind its old size and times, are each
        # reported in one line with the run id and fetched again.
        capfd.readouterr()
        stat = cached.stat()
        for damage in (b"", b"\x93NUMPY" + bytes(stat.st_size - 6)):
            cached.write_bytes(damage)
            os.utime(cached, ns=(stat.st_atime_ns, stat.st_mtime_ns))
            fourth = ArtifactCache(tmp_path / "cache")
            zoo = build_zoo(nets, fourth)
            assert fourth.stats.downloaded == 1 and fourth.stats.reused == 2
            np.testing.assert_array_equal(
                zoo.snapshot(1, 3), artifact_weights(nets["run_id"][1], tmp_path)[2]
            )
            lines = [line for line in capfd.readouterr().err.splitlines() if "zoo cache" in line]
            assert len(lines) == 1 and lines[0].startswith(
                f"zoo cache: run {nets['run_id'][1]}: the cached copy of its snapshots is damaged ("
            ), lines
    finally:
        mlflow.set_tracking_uri(None)


@contextlib.contextmanager
def restored(path):
    """The artifact's bytes and times are put back however the test ends."""
    original, stat = path.read_bytes(), path.stat()
    try:
        yield original
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


SHAPES = Selection(filter="params.dataset = 'shapes'")


def test_an_artifact_changed_in_place_behind_its_old_size_and_mtime_is_caught(in_meta_zoo):
    nets = SHAPES.query()
    victim = nets.iloc[1]
    cache = ArtifactCache()
    build_zoo(nets, cache)
    path = tracking_path(victim)
    with restored(path) as original:
        stat = path.stat()
        with open(path, "r+b") as f:
            f.seek(len(original) - 8)
            f.write(b"\x01" * 8)  # same size, different weights (the output biases are 0)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        with pytest.raises(
            DataError, match=f"^run {victim.run_id}: snapshot artifact is corrupted in the artifact store"
        ):
            build_zoo(nets, ArtifactCache(cache.root))


def test_a_damaged_artifact_in_the_artifact_store_is_a_data_error_naming_its_run(in_meta_zoo, tmp_path):
    nets = SHAPES.query()
    victim = nets.iloc[0]
    path = tracking_path(victim)
    with restored(path) as original:
        for damage in (b"", original[:60], original[:-100], b"\x93NUMPY garbage" * 20):
            path.write_bytes(damage)
            with pytest.raises(
                DataError, match=f"^run {victim.run_id}: snapshot artifact unreadable in the artifact store"
            ):
                build_zoo(nets, ArtifactCache(tmp_path / "cache"))


def rewrite_offsets(store) -> None:
    table = pd.read_csv(store / "nets.csv", keep_default_na=False)
    table["data_offset"] += 4  # one value later: every slice would be shifted
    table.to_csv(store / "nets.csv", index=False)


def test_a_damaged_store_is_reported_in_one_line_and_rebuilt(in_meta_zoo, capfd):
    nets = SHAPES.query()
    cache = ArtifactCache()
    zoo = build_zoo(nets, cache)
    expected = [zoo.snapshot(i, 3) for i in range(len(nets))]
    store = zoo.directory
    damages = {
        "garbage index": lambda: (store / "nets.csv").write_bytes(bytes(range(256)) * 16),
        "shifted data_offset": lambda: rewrite_offsets(store),
        "half an index": lambda: (store / "nets.csv").write_text((store / "nets.csv").read_text()[:3000]),
        "index missing": lambda: (store / "nets.csv").unlink(),
        "garbage marker": lambda: (store / "complete").write_bytes(b"\xff\x00{"),
        "marker of another store": lambda: (store / "complete").write_text('{"format": 2, "nets": 99}'),
    }
    capfd.readouterr()
    (store / "nets.csv").write_bytes(b"\xff" * 100)
    with pytest.raises(DataError, match=f"^{re.escape(str(store))}: not a zoo store \\(UnicodeDecodeError"):
        Zoo(store)  # opened directly (as the benchmarks do): refused in one line, nothing left to fail later
    gc.collect()
    for name, damage in damages.items():
        damage()
        again = ArtifactCache(cache.root)
        rebuilt = build_zoo(nets, again)
        assert not again.stats.store_reused, name
        for i, values in enumerate(expected):
            np.testing.assert_array_equal(rebuilt.snapshot(i, 3), values, err_msg=name)
        lines = capfd.readouterr().err.splitlines()
        assert len(lines) == 1 and re.match(
            f"^zoo cache: store {store} is damaged \\(.+\\); rebuilt$", lines[0]
        ), (
            name,
            lines,
        )
        third = ArtifactCache(cache.root)
        build_zoo(nets, third)
        assert third.stats.store_reused, name  # the repaired store is whole again
    assert capfd.readouterr().err == ""


def test_a_run_id_that_is_not_a_plain_mlflow_id_never_becomes_a_cache_path(in_meta_zoo, tmp_path):
    net = SHAPES.query().iloc[0]
    cache = ArtifactCache(tmp_path / "a" / "b" / "cache")
    for bad in ("../../../x", "..", "a/b", "", "-x", "x\n", "x y"):
        with pytest.raises(DataError, match=f"^run {re.escape(repr(bad))}: not a plain MLflow run id"):
            cache.fetch(bad, net.artifact_uri, net.digest)
    assert [p.name for p in tmp_path.rglob("*")] in ([], ["a", "b", "cache"], ["a", "b"], ["a"])
    cache.fetch(net.run_id, net.artifact_uri, net.digest)  # a real id is fine


def test_concurrent_builds_of_one_store_never_fail(in_meta_zoo, tmp_path, capfd):
    processes, builds = 4, 10
    nets = SHAPES.query()
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no Keras, no forked locks
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(
            target=zoo_race.build_repeatedly,
            args=(rank, nets, str(tmp_path / "cache"), builds, barrier, results),
        )
        for rank in range(processes)
    ]
    for worker in workers:
        worker.start()
    reports = dict(results.get(timeout=300) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
    assert sorted(reports) == list(range(processes))
    assert [failure for rank in sorted(reports) for failure in reports[rank]] == []
    assert [worker.exitcode for worker in workers] == [0] * processes
    # Each damaged index was found by exactly one process, which rebuilt it under the lock.
    repairs = [line for line in capfd.readouterr().err.splitlines() if line.startswith("zoo cache: store")]
    assert len(repairs) == builds // 2, repairs
