"""Dropping the page cache, for the benchmarks' cold ("straight from disk") figures."""

from __future__ import annotations

import os


def drop_page_cache() -> bool:
    """Write back and drop the page cache (root only); False where that is not allowed."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False
