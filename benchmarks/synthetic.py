"""A zoo store as `nws.zoo.store.build_zoo` indexes it, over snapshot files of random weights of the
fixed architecture, for benchmarks that need gigabytes of snapshots without training nets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

N_WEIGHTS, CONV, PRINTS = 92868, 16880, 20  # the fixed architecture (see tests/test_layout.py)


def synthetic_store(directory: Path, nets: int) -> Path:
    from nws.space import PROPERTY_NAMES
    from nws.zoo.store import STORE_FORMAT

    (directory / "files").mkdir(parents=True)
    rng = np.random.default_rng(0)
    block = rng.standard_normal((PRINTS, N_WEIGHTS), dtype=np.float32)
    rows = []
    for i in range(nets):
        path = directory / "files" / f"net{i}.npy"
        np.save(path, block if i % 2 else rng.standard_normal((PRINTS, N_WEIGHTS), dtype=np.float32))
        rows.append({"run_id": f"run{i}", "prints": PRINTS, "n_weights": N_WEIGHTS, "weightn_conv": CONV,
                     "weightn_fc": N_WEIGHTS - CONV, "test_accuracy": 0.5, "offset": i * PRINTS * N_WEIGHTS,
                     "path": str(path), "data_offset": 128})  # fmt: skip
    table = pd.DataFrame(rows)
    for name in PROPERTY_NAMES:
        table[name] = "x"
    table.to_csv(directory / "nets.csv", index=False)
    (directory / "complete").write_text(json.dumps({"format": STORE_FORMAT, "nets": nets}))
    return directory


def store_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in (directory / "files").iterdir())
