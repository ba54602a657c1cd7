"""A consolidated zoo store as `nws.zoo.build_zoo` writes it, filled with random weights of the
fixed architecture, for benchmarks that need gigabytes of snapshots without training nets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

N_WEIGHTS, CONV, PRINTS = 92868, 16880, 20  # the fixed architecture (see tests/test_layout.py)


def synthetic_store(directory: Path, nets: int) -> Path:
    from nws.space import PROPERTY_NAMES

    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    size = PRINTS * N_WEIGHTS
    block = rng.standard_normal(size, dtype=np.float32).tobytes()
    with open(directory / "weights.f32", "wb") as f:
        for i in range(nets):
            f.write(block if i % 2 else rng.standard_normal(size, dtype=np.float32).tobytes())
    table = pd.DataFrame({
        "run_id": [f"run{i}" for i in range(nets)], "prints": PRINTS, "n_weights": N_WEIGHTS,
        "weightn_conv": CONV, "weightn_fc": N_WEIGHTS - CONV, "test_accuracy": 0.5,
        "offset": np.arange(nets, dtype=np.int64) * size,
    })  # fmt: skip
    for name in PROPERTY_NAMES:
        table[name] = "x"
    table.to_csv(directory / "nets.csv", index=False)
    (directory / "complete").write_text(json.dumps({"format": 1, "nets": nets}))
    return directory
