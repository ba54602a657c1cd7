"""One of several processes that build the same zoo store over and over at the same moments (a
barrier before each build), as concurrent `train` calls on one cache do. Kept apart from the test
module so that a spawned process imports the zoo alone, not Keras or MLflow."""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

import numpy as np


def build_repeatedly(rank: int, nets: Any, cache_root: str, builds: int, barrier: Any, results: Any) -> None:
    """Build the store of `nets` (selected from a local artifact store) `builds` times. Even
    builds start from an empty cache, so every process writes the store at once; odd ones find the
    store the even one left, its index damaged by rank 0 just before, so every process finds it
    damaged and it is replaced while the others wait to read it. Puts (rank, failures seen)."""
    failures: list[str] = []
    sys.unraisablehook = lambda hook: failures.append(
        f"unraisable in {hook.object!r}: {type(hook.exc_value).__name__}: {hook.exc_value}"
    )
    try:
        from nws.tracking.tags import WEIGHTS_ARTIFACT
        from nws.zoo.cache import ArtifactCache, _local_path
        from nws.zoo.store import build_zoo

        expected = [np.load(_local_path(uri) / WEIGHTS_ARTIFACT) for uri in nets["artifact_uri"]]
        for build in range(builds):
            cache = ArtifactCache(Path(cache_root) / str(build // 2))
            barrier.wait(timeout=120)  # every process is done with the last build
            if build % 2 and rank == 0:
                for index in (cache.root / "stores").glob("*/nets.csv"):
                    index.write_bytes(b"\xff\xfe garbage\n" * 50)
            barrier.wait(timeout=120)
            try:
                zoo = build_zoo(nets, cache, workers=2)
                for i, weights in enumerate(expected):
                    if not np.array_equal(zoo.snapshot(i, len(weights)), weights[-1]):
                        failures.append(f"build {build}: net {i} reads other values than its artifact")
                del zoo
                gc.collect()
            except Exception as error:
                failures.append(f"build {build}: {type(error).__name__}: {error}")
    except Exception as error:
        failures.append(f"setup: {type(error).__name__}: {error}")
        barrier.abort()  # the others stop waiting for this one
    results.put((rank, failures))
