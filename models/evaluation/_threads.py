"""Run small torch computations single-threaded.

On a busy machine with few cores, torch's OpenMP worker threads spin while waiting for a core and
a small convolution can run 10-30x slower than on one thread. The evaluation's torch work
(MS-SSIM windows, sim-encoder forward passes) is small, so it runs on one thread; the caller's
setting is restored afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Temporarily set ``torch.set_num_threads(n)``.

    Parameters
    ----------
    n : int, optional
        Intra-op threads inside the block (1).

    Yields
    ------
    None
        Control inside the block; the previous thread count is restored on exit.
    """
    old = torch.get_num_threads()
    if old == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
