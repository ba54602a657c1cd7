"""`region=auto`: the probe sends each property's slice models where the training nets show it,
on zoos whose property is written in one kind of tensor only (real weight files, a real store)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from nws.meta.region_choice import CANDIDATES, choose_region
from nws.net.regions import region_positions
from nws.net.snapshots import weight_layout
from nws.space import NetConfig
from nws.zoo.store import Zoo

FIXED = weight_layout(NetConfig.parse("mnist,0.001,64,1,0,0,0,2,5,3,2,8,128"))
NETS, PRINTS = 24, 2


def written_zoo(tmp_path, where: str) -> tuple[Zoo, np.ndarray]:
    """A store of nets of the fixed architecture whose class (0/1) is written only `where`: in the
    spread of the kernels ("kernels") or in the sign of the biases and batch norm ("nonkernel")."""
    rng = np.random.default_rng(0)
    small = region_positions(FIXED.n_weights, FIXED.weightn_conv, "nonkernel")
    labels = np.arange(NETS) % 2
    rows = []
    for net, label in enumerate(labels):
        weights = rng.normal(0.0, 0.1, (PRINTS, FIXED.n_weights)).astype(np.float32)
        kernel = np.ones(FIXED.n_weights, bool)
        kernel[small] = False
        if where == "kernels":
            weights[:, kernel] *= 1.0 + label
        else:
            weights[:, small] = np.abs(weights[:, small]) * (1 if label else -1)
        path = tmp_path / f"net{net}.npy"
        np.save(path, weights)
        header = path.stat().st_size - weights.nbytes
        rows.append({"run_id": f"{net:032x}", "n_weights": FIXED.n_weights, "prints": PRINTS,
                     "weightn_conv": FIXED.weightn_conv, "data_offset": header, "path": str(path),
                     "test_accuracy": 0.5})  # fmt: skip
    nets = pd.DataFrame(rows)
    nets.insert(1, "offset", np.arange(NETS) * PRINTS * FIXED.n_weights)
    nets.to_csv(tmp_path / "nets.csv", index=False)
    return Zoo(tmp_path), labels


@pytest.mark.parametrize(("where", "region"), [("kernels", "all"), ("nonkernel", "nonkernel")])
def test_auto_reads_each_property_where_the_training_nets_write_it(tmp_path, where, region):
    zoo, labels = written_zoo(tmp_path, where)
    choice = choose_region(zoo, np.arange(NETS), labels, 2, False, 512)
    assert choice.region == region, choice.describe()
    assert set(choice.scores) == set(CANDIDATES)
    assert choice.scores[region] >= 0.9  # plainly written: the probe reads it
    other = next(name for name in CANDIDATES if name != region)
    assert choice.scores[other] < choice.scores[region]


def test_a_region_too_short_for_the_slices_is_no_candidate(tmp_path):
    zoo, labels = written_zoo(tmp_path, "nonkernel")
    choice = choose_region(zoo, np.arange(NETS), labels, 1, False, 1261)  # 1,260 small weights
    assert choice.region == "all" and choice.scores == {}  # a lone candidate, chosen unprobed
    assert "only region" in choice.describe()
