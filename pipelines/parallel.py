"""A helper process for the Python-bound part of a job's encoding (issue 20).

Writing a job's outputs is pydicom and highdicom building and saving data sets: Python
code under one GIL, 8–10 s of a 300-slice restoration job on one core while the other
core of a small machine idles. A worker may start one helper process (:func:`start`):
spawned, so a fresh interpreter that inherits none of the worker's threads, locks or
torch state, and gone within half a second of its worker, however the worker ended. The
encode stage then has it write the derived series while the worker writes the maps, the
SEG and the overlay (:func:`pipelines.encode.write_outputs`).

What crosses to the helper is pickled here. A file-backed array — a job's spill file
(:mod:`pipelines.spill`) — crosses as its path, dtype, shape and offset and is mapped
again, read-only, on the other side, so no volume is copied. A call whose pickle is larger
than :data:`MAX_PAYLOAD` (an array held in memory) is not sent: :func:`submit` returns
None and the caller does the work itself.

The helper never decides a job's fate. An exception raised by the work is raised to the
caller as it would have been raised in the worker; a helper that is gone (killed, crashed)
or that cannot take the call makes :func:`result` run the caller's fallback — the same
work, in the worker — and a new helper is started for the next job.
"""

from __future__ import annotations

import io
import logging
import mmap
import multiprocessing
import os
import pickle
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

import numpy as np

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The largest pickled call sent to the helper (headers and file references are far below
#: it; an array held in memory is not: the caller does that work itself).
MAX_PAYLOAD = 32 * 1024 * 1024

#: How often the helper looks whether its worker is still there.
_WATCH_SECONDS = 0.5

_lock = threading.Lock()
_executor: ProcessPoolExecutor | None = None


class _NotRun(Exception):
    """The helper could not take the call (not the work's own error): run it here."""


def _die_with_parent() -> None:
    """In the helper: end when the worker that started it is gone, even by SIGKILL.

    Not ``PR_SET_PDEATHSIG``: Linux sends that signal when the *thread* that started the
    process ends, and the worker starts its helper from its preload thread, which ends
    once the models are loaded. A thread here watches for the worker's pid to go."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_WATCH_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="watch-worker", daemon=True).start()
    # what the derived series' writer needs, imported before the first call
    import pipelines.writers  # noqa: F401


def start() -> bool:
    """Start the helper process, once per process (later calls do nothing). False where
    one cannot be started here (then every :func:`submit` returns None)."""
    global _executor
    with _lock:
        if _executor is not None:
            return True
        try:
            _executor = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_die_with_parent
            )
            # spawn it now, not when the first job's encode needs it
            _executor.submit(int).result(timeout=120)
        except Exception as exc:  # no helper: every caller does its own work, as before
            log.warning("encode helper process not started: %s", exc)
            if _executor is not None:
                _executor.shutdown(wait=False, cancel_futures=True)
            _executor = None
            return False
        return True


def stop(wait: bool = True) -> None:
    """Stop the helper (a later :func:`start` starts a new one); ``wait``: until it has
    ended."""
    global _executor
    with _lock:
        executor, _executor = _executor, None
    if executor is not None:
        executor.shutdown(wait=wait, cancel_futures=True)


def started() -> bool:
    return _executor is not None


def _restart_after_failure() -> None:
    stop(wait=False)
    # a new one for the next job, spawned beside this one (which writes its own meanwhile)
    threading.Thread(target=start, name="encode-helper-start", daemon=True).start()


# -- what crosses --------------------------------------------------------------------------


def _open_mapped(path: str, dtype: str, shape: tuple[int, ...], offset: int) -> np.ndarray:
    return np.memmap(path, dtype=np.dtype(dtype), mode="r", shape=shape, offset=offset)


class _TooLarge(Exception):
    pass


class _Pickler(pickle.Pickler):
    """Pickles a memory-mapped array (the mapping itself, not a view of it) as a reference
    to its file; everything else as ``pickle`` does, except an array in memory larger than
    :data:`MAX_PAYLOAD`, which stops it at once (the call is not sent)."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.memmap) and isinstance(obj.base, mmap.mmap) and obj.filename:
            return _open_mapped, (str(obj.filename), obj.dtype.str, tuple(obj.shape), int(obj.offset))
        if isinstance(obj, np.ndarray) and obj.nbytes > MAX_PAYLOAD:
            raise _TooLarge
        return NotImplemented


def _dumps(value: Any) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return buffer.getvalue()


def _run(payload: bytes) -> Any:
    """In the helper: the call, unpickled and run."""
    try:
        fn, args = pickle.loads(payload)
    except Exception as exc:  # e.g. a spill file that is gone
        raise _NotRun(f"the call could not be read ({type(exc).__name__}: {exc})") from None
    return fn(*args)


def submit(fn: Callable[..., T], *args: Any) -> Future[T] | None:
    """Start ``fn(*args)`` in the helper (``fn`` importable by name); None when there is no
    helper or the call is not worth sending (see :data:`MAX_PAYLOAD`)."""
    executor = _executor
    if executor is None:
        return None
    try:
        payload = _dumps((fn, args))
    except _TooLarge:
        return None
    except Exception as exc:  # something that does not pickle: do it here
        log.debug("not sent to the helper: %s", exc)
        return None
    if len(payload) > MAX_PAYLOAD:
        return None
    try:
        return executor.submit(_run, payload)
    except (BrokenProcessPool, RuntimeError) as exc:  # gone, or shut down meanwhile
        log.warning("encode helper process unavailable (%s); the worker writes this itself", exc)
        _restart_after_failure()
        return None


def result(future: Future[T], fallback: Callable[[], T]) -> T:
    """What ``future`` returns, or raises as the work raised it; ``fallback()`` (the same
    work, here) when the helper died or could not take the call."""
    try:
        return future.result()
    except BrokenProcessPool as exc:
        log.warning("encode helper process died (%s); the worker writes this itself", exc)
        _restart_after_failure()
    except (_NotRun, pickle.PicklingError) as exc:
        log.warning("encode helper process could not take the call (%s); the worker writes this itself", exc)
    return fallback()


def settle(future: Future[Any]) -> None:
    """Wait until ``future`` has ended, however it ends (its outcome is not wanted: the
    caller failed first, and nothing may keep writing into its job)."""
    wait([future])
