"""The Keras backend option and packed training (issue 17): JAX trains without TensorFlow, a
packed net starts bit-identical to the same net alone and agrees after one step to 1e-5, a NaN
fails its own net only, and `sample --backend jax --pack 4` makes nets whose first snapshot
matches the same configurations and seeds replayed alone. JAX runs in processes of its own (a
process has one Keras backend; this one runs TensorFlow)."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys

import mlflow
import numpy as np
import pytest

from nws.backend import TAG_BACKEND
from nws.cli import main
from nws.tracking.tags import TAG_CAMPAIGN, TAG_ROLE, TAG_TRIAL, WEIGHTS_ARTIFACT
from tests.conftest import NO_TENSORFLOW, ROOT

REPLAY = "shapes,0.003,32,1,1,2,0,2,5,3,2,8,128"
TINY = ["--subset", "fixed", "--datasets", "shapes", "--max-epochs", "1", "--min-epochs", "1",
        "--max-train-images", "300", "--max-eval-images", "32", "--prints", "2"]  # fmt: skip


def jax_process(code: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=os.getcwd())  # fmt: skip


@pytest.fixture(scope="module")
def jax_checks() -> dict:
    """tests/jax_checks.py's checks, run in one JAX process (JAX starts once)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "jax_checks.py"), "pack", "twice", "agreement", "kept"],
        env={**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pack", "2"], "pack: 2 needs backend jax (got tensorflow)"),
        (["--backend", "torch"], "backend: 'torch' is not one of tensorflow, jax"),
        (["--backend", "jax", "--pack", "0"], "pack: 0 is below 1"),
        (["--backend", "jax", "--pack", "2", "--lr-decay", "0.9"], "pack: 2 needs lr_decay 1.0"),
    ],
)
def test_bad_backend_or_pack_is_one_line_and_exit_2(tracking_uri, capsys, args, message):
    assert main(["sample", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.slow
def test_keras_on_tensorflow_starts_without_jax_and_jax_still_imports_after():
    """TensorFlow's tf.lite and Keras' Orbax callback import JAX at their start whatever the
    backend (0.6 CPU-s per process); on TensorFlow nws spares it, and JAX imports when asked."""
    script = (
        "import sys\n"
        "from nws.backend import select\n"
        "select('tensorflow')\n"
        "import keras\n"
        "from tensorflow.lite.python import util\n"
        "started = 'jax' in sys.modules\n"
        "import jax\n"
        "print(started, util._jit is None, float(jax.numpy.ones(3).sum()), keras.backend.backend())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    done = subprocess.run([sys.executable, "-c", script], env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True", "3.0", "tensorflow"]


@pytest.mark.slow
def test_packed_nets_start_identical_agree_after_a_step_and_fail_alone(jax_checks):
    """Three nets of one pack (other seeds, rates, images; the third with rate 1e12): initial
    weights bit-identical to each net built alone; after one optimizer step, L2-relative
    difference to the same step taken alone by Keras below 1e-5; the diverging net fails in
    epoch 1 and the other two train on to their end. No TensorFlow imported."""
    result = jax_checks["pack"]
    assert result["initial_identical"] == [True, True, True]
    assert max(result["one_step_relative"]) < 1e-5
    assert result["outcomes"] == ["TrainResult", "TrainResult", "TrainingDiverged"]
    assert result["diverged_epoch"] == [1] and result["epochs"] == [2, 2]
    assert result["tensorflow_imported"] is False


@pytest.mark.slow
def test_a_net_on_kept_jax_models_is_bit_identical_to_the_net_built_fresh(jax_checks):
    """tests/kept_models.py on JAX: five nets, trained on models of their own and again on the
    same models kept after another net (every property value among them), equal bit for bit."""
    result = jax_checks["kept"]
    assert result["hits"] == 10 and result["misses"] == 5
    assert result["identical"] == [True] * 5 and result["evaluations"] == 3
    assert result["tensorflow_imported"] is False


@pytest.mark.slow
def test_same_seed_same_backend_gives_identical_snapshots_without_tensorflow(jax_checks):
    assert jax_checks["twice"] == {"identical": True, "tensorflow_imported": False}


@pytest.mark.slow
def test_over_16_nets_packed_and_alone_final_test_accuracies_agree_within_noise(jax_checks):
    """Training nets this small is chaotic: a 1e-7 change of the initial weights grows to about
    1e-2 in 7 steps, in a lone Keras net as in a pack, so a packed net and the same net alone
    part after a few steps (rounding differs) and agree only in distribution. The stated test,
    on the 16 paired final test accuracies (packed minus alone, 3 epochs of digits, the nets
    learn to 25-55 %): no systematic difference (two-sided paired t-test, p >= 0.01) and
    equivalence within 6 accuracy points (the 90 % confidence interval of the mean difference
    inside +-0.06: two one-sided tests at 5 %)."""
    from scipy import stats

    result = jax_checks["agreement"]
    packed, alone = np.array(result["packed"]), np.array(result["alone"])
    assert len(packed) == len(alone) == 16 and result["epochs"] == [[3] * 16, [3] * 16]
    assert packed.mean() > 0.2 and alone.mean() > 0.2  # they learned: chance is 0.1
    difference = packed - alone
    assert stats.ttest_rel(packed, alone).pvalue >= 0.01
    low, high = stats.t.interval(0.90, len(difference) - 1, difference.mean(), stats.sem(difference))
    assert low > -0.06 and high < 0.06, (low, high)


def first_snapshots(campaign: str, tmp_path) -> dict[str, np.ndarray]:
    runs = mlflow.search_runs(
        search_all_experiments=True, output_format="list",
        filter_string=f"tags.`{TAG_ROLE}` = 'net' and tags.`{TAG_CAMPAIGN}` = '{campaign}'",
    )  # fmt: skip
    out = {}
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags[TAG_BACKEND] == "jax"
        assert run.data.params["backend"] == "jax" and "nws.tensorflow" not in run.data.tags
        path = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path=WEIGHTS_ARTIFACT, dst_path=str(tmp_path / run.info.run_id)
        )
        out[run.data.tags[TAG_TRIAL]] = np.load(path)[0]
    return out


@pytest.mark.slow
def test_sample_pack_4_matches_the_nets_replayed_alone(tracking_uri, tmp_path):
    """The issue's "done when": `sample --backend jax --pack 4 --n-nets 4` makes 4 FINISHED nets
    (one pack: the same configuration, seeds 7..10) whose snapshot 1 matches, to 1e-5, the same
    configuration and seeds trained alone (`--pack 1`); neither process imports TensorFlow; the
    campaign refuses a continuation on another backend."""
    storage = str(tmp_path / "optuna.log")
    for campaign, pack in (("packed", "4"), ("alone", "1")):
        argv = ["sample", "--backend", "jax", "--pack", pack, "--n-nets", "4", "--seed", "7",
                "--config", REPLAY, "--campaign", campaign, "--storage", storage, *TINY]  # fmt: skip
        done = jax_process(
            f"import sys; from nws.cli import main; rc = main({argv!r}); "
            "print('tensorflow' in sys.modules); raise SystemExit(rc)"
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip().splitlines()[-1] == "False"
        assert "4 nets finished, 0 failed" in done.stdout
    packed, alone = first_snapshots("packed", tmp_path), first_snapshots("alone", tmp_path)
    assert sorted(packed) == sorted(alone) == ["0", "1", "2", "3"]
    for trial, weights in packed.items():
        np.testing.assert_allclose(weights, alone[trial], rtol=1e-5, atol=1e-7)
    other = main(["sample", "--backend", "tensorflow", "--campaign", "packed", "--storage", storage, *TINY])
    assert other == 2


PACKED_BLOCK = ["--subset", "fixed", "--datasets", "digits", "--prints", "3", "--max-epochs", "6",
                "--min-epochs", "6", "--max-train-images", "256", "--max-eval-images", "64",
                "--threads", "1", "--backend", "jax", "--pack", "4", "--target", "6",
                "--config", REPLAY.replace("shapes", "digits")]  # fmt: skip
"""One pack key (a replayed configuration), nets of six epochs: a block of four trains for a
while after its first epoch is logged."""


@pytest.mark.slow
def test_a_packed_block_stopped_killed_and_resumed_ends_at_the_target_exactly(tmp_path):
    """`sample --backend jax --pack 4 --target 6`, three times on one campaign: SIGINT (Ctrl-C) mid-block
    (exit 130, the block's four runs and the campaign's run KILLED, nothing left RUNNING); SIGKILL
    mid-block (nothing ends); a third call closes the killed process's runs, retries its four
    trials (the stopped block's four were queued again when it stopped) and ends with exactly 6
    FINISHED nets (the last block's two surplus trials pruned)."""

    from tests.interruptions import run_statuses, start_sample, tracking_store
    from tests.test_scale import campaign_trials, mid_net, wait_until

    uri, storage, name = tracking_store(tmp_path), str(tmp_path / "optuna.log"), "packed"
    outcomes = {}
    for number in (signal.SIGINT, signal.SIGKILL):  # Ctrl-C, then a kill nothing can catch
        sample = start_sample(name, uri, storage, tmp_path, nets=PACKED_BLOCK)
        pid = sample.process.pid
        training = functools.partial(mid_net, storage, name, pid, uri)  # a block's nets step together
        wait_until(training, 240, "a block mid-training", sample.process)
        sample.process.send_signal(number)
        outcomes[number] = (pid, *sample.finish(120))
        if number == signal.SIGINT:  # the stopped block's configurations are queued again at once
            stopped = [t for t in campaign_trials(storage, name) if t.state.name == "FAIL"]
            queued = [t.system_attrs.get("retry_history") for t in campaign_trials(storage, name)
                      if t.state.name == "WAITING" and t.system_attrs.get("retry_history")]  # fmt: skip
            assert sorted(queued) == [[t.number] for t in stopped] and len(stopped) == 4, queued
    _, code, output = outcomes[signal.SIGINT]
    assert code == 130 and output.rstrip().endswith("nws sample: interrupted"), output[-3000:]
    killed_pid, code, output = outcomes[signal.SIGKILL]
    assert code == -signal.SIGKILL, output[-3000:]
    after_stop = run_statuses(uri, name)
    assert sorted(after_stop["net"]) == ["KILLED"] * 4 + ["RUNNING"] * 4
    assert sorted(after_stop["campaign"]) == ["KILLED", "RUNNING"]

    last = start_sample(name, uri, storage, tmp_path, nets=PACKED_BLOCK)
    code, output = last.finish(600)
    assert code == 0, output[-3000:]
    trials = campaign_trials(storage, name)
    assert not any(t.state.name == "RUNNING" for t in trials)
    by_state = {s: [t for t in trials if t.state.name == s] for s in ("COMPLETE", "FAIL", "PRUNED")}
    assert len(by_state["COMPLETE"]) == 6, [t.state.name for t in trials]
    killed = [t for t in by_state["FAIL"] if t.user_attrs.get("worker", "").endswith(f":{killed_pid}")]
    assert len(killed) == 4
    queued_again = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    history = [(t.number, t.state.name, t.system_attrs.get("retry_history")) for t in trials]
    assert {t.number for t in by_state["FAIL"]} <= queued_again, history
    assert len(by_state["PRUNED"]) == 2
    statuses = run_statuses(uri, name)
    assert sorted(statuses["net"]) == ["FAILED"] * 4 + ["FINISHED"] * 6 + ["KILLED"] * 4
    assert sorted(statuses["campaign"]) == ["FAILED", "FINISHED", "KILLED"]


def test_a_pack_holds_each_datasets_images_once_and_every_net_finds_its_own():
    """Nets drawn from one dataset share its images on the device (a pack of 128 MNIST nets
    would otherwise hold 128 copies); a net made without a pool brings its own."""
    from dataclasses import replace

    from nws.data import load_images, split_for_net
    from nws.net.pack import _device_images

    digits = load_images("digits")
    data = [split_for_net(digits, seed, 200, 32) for seed in (1, 2)]
    alone = replace(split_for_net(digits, 3, 50, 32), pool=None, train_rows=None)
    images, labels, rows = _device_images([*data, alone])
    assert len(images) == len(labels) == len(digits.y_train) + 50
    for net, own in zip([*data, alone], rows, strict=True):
        np.testing.assert_array_equal(images[own], net.x_train)
        np.testing.assert_array_equal(labels[own], net.y_train)
    assert rows[2].min() == len(digits.y_train)


def test_jax_compilation_cache_is_on_bounded_and_leaves_the_users_settings(monkeypatch, tmp_path):
    from nws.backend import JAX_CACHE_BYTES, compilation_cache

    for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_MAX_SIZE", "NWS_JAX_CACHE",
                 "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):  # fmt: skip
        monkeypatch.setenv(name, "")  # so that monkeypatch restores what compilation_cache sets
        monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    compilation_cache()
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "nws" / "jax")
    assert os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] == str(JAX_CACHE_BYTES)
    assert os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "0"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")
    compilation_cache()
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == "/elsewhere"
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("NWS_JAX_CACHE", "0")
    compilation_cache()
    assert "JAX_COMPILATION_CACHE_DIR" not in os.environ


SITE_NO_TENSORFLOW = (
    NO_TENSORFLOW
    + """
import atexit, os
atexit.register(lambda: open(os.environ["NWS_TEST_IMPORTS"], "a").write(
    f"{os.getpid()} {' '.join(sys.argv[1:3])} {'tensorflow' in sys.modules}\\n"))
"""
)
"""Installed in every Python process of the test (as `sitecustomize`): TensorFlow cannot be
imported, and each process writes at exit whether it was."""


@pytest.mark.slow
def test_main_on_jax_samples_trains_and_registers_without_tensorflow(tmp_path):
    """`nws main --backend jax` (issue 25): sampling, the DMC and the statistics models, the
    registry and the table, in processes where TensorFlow cannot be imported; every process
    (main and its sampling workers) ends without it, and the runs say they ran on JAX."""
    from tests.test_newcomer import TINY_MAIN

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE_NO_TENSORFLOW)
    imports = tmp_path / "imports.txt"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_EXPERIMENT")}
    env.update(MLFLOW_TRACKING_URI=uri, NWS_CACHE_DIR=str(tmp_path / "cache"), KERAS_BACKEND="jax",
               PYTHONPATH=f"{site}{os.pathsep}{ROOT}", NWS_TEST_IMPORTS=str(imports))  # fmt: skip
    argv = [*TINY_MAIN, "--backend", "jax", "--workers", "2", "--models", "dmc,stats", "--campaign", "on-jax"]
    done = subprocess.run([sys.executable, "-m", "nws.cli", "main", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    processes = imports.read_text().splitlines()
    assert len(processes) >= 3, processes  # main and its two sampling workers
    assert all(line.endswith(" False") for line in processes), processes
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    roles = {}
    for run in runs:
        roles.setdefault(run.data.tags.get(TAG_ROLE), []).append(run)
    assert len(roles["net"]) == 6 and all(r.info.status == "FINISHED" for r in roles["net"])
    assert {r.data.tags[TAG_BACKEND] for r in runs if TAG_BACKEND in r.data.tags} == {"jax"}
    models = {r.data.params.get("model") for r in runs}
    assert {"dmc", "stats"} <= models, models
    assert "dataset" in done.stdout and "dmc" in done.stdout, done.stdout[-2000:]
