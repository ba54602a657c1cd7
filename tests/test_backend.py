"""The Keras backend option and packed training (issue 17): JAX trains without TensorFlow, a
packed net starts bit-identical to the same net alone and agrees after one step to 1e-5, a NaN
fails its own net only, and `sample --backend jax --pack 4` makes nets whose first snapshot
matches the same configurations and seeds replayed alone. JAX runs in processes of its own (a
process has one Keras backend; this one runs TensorFlow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest

from nws.backend import TAG_BACKEND
from nws.cli import main
from nws.tracking.tags import TAG_CAMPAIGN, TAG_ROLE, TAG_TRIAL, WEIGHTS_ARTIFACT
from tests.conftest import ROOT

REPLAY = "shapes,0.003,32,1,1,2,0,2,5,3,2,8,128"
TINY = ["--subset", "fixed", "--datasets", "shapes", "--max-epochs", "1", "--min-epochs", "1",
        "--max-train-images", "300", "--max-eval-images", "32", "--prints", "2"]  # fmt: skip


def jax_process(code: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=os.getcwd())  # fmt: skip


def jax_check(name: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "jax_checks.py"), name],
        env={**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=900,
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
def test_packed_nets_start_identical_agree_after_a_step_and_fail_alone():
    """Three nets of one pack (other seeds, rates, images; the third with rate 1e12): initial
    weights bit-identical to each net built alone; after one optimizer step, L2-relative
    difference to the same step taken alone by Keras below 1e-5; the diverging net fails in
    epoch 1 and the other two train on to their end. No TensorFlow imported."""
    result = jax_check("pack")
    assert result["initial_identical"] == [True, True, True]
    assert max(result["one_step_relative"]) < 1e-5
    assert result["outcomes"] == ["TrainResult", "TrainResult", "TrainingDiverged"]
    assert result["diverged_epoch"] == [1] and result["epochs"] == [2, 2]
    assert result["tensorflow_imported"] is False


@pytest.mark.slow
def test_same_seed_same_backend_gives_identical_snapshots_without_tensorflow():
    result = jax_check("twice")
    assert result == {"identical": True, "tensorflow_imported": False}


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
