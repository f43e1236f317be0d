"""Simulating training cases in parallel processes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

S = TypeVar("S")
T = TypeVar("T")


def simulate_in_processes(
    simulate: Callable[[S], T],
    specs: Sequence[S],
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
    chunksize: int = 1,
) -> list[T]:
    """``[simulate(s) for s in specs]`` in ``workers`` processes, in order (each case has
    its own seed, so the result does not depend on the schedule)."""
    results: list[T] = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for i, result in enumerate(pool.map(simulate, specs, chunksize=chunksize)):
            results.append(result)
            if progress:
                progress(i + 1, len(specs))
    return results
