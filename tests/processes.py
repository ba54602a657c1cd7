"""Processes on this machine from Linux /proc: what the tests and benchmarks check of a process
tree (workers gone after a kill, memory of an import with its workers)."""

from __future__ import annotations

from pathlib import Path


def process_state(pid: int) -> tuple[str, int]:
    """A process's state letter and parent pid (Linux /proc); ("", 0) when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return "", 0
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    return process_state(pid)[0] not in ("", "Z")


def descendants(pid: int) -> set[int]:
    """Every process below pid (children, their children, ...)."""
    parents = {int(p.name): process_state(int(p.name))[1] for p in Path("/proc").glob("[0-9]*")}
    found: set[int] = set()
    while grown := {child for child, parent in parents.items() if parent in found | {pid}} - found:
        found |= grown
    return found
