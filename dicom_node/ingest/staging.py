"""A C-STORE data set written to its staging file while it is still arriving.

The durable write is the longest step of a C-STORE round trip: ``fdatasync`` of a
525 KB CT slice waits ≈ 0.8 ms for the disk on the reference VM, and the sender waits for
the response all that time. But the data set arrives in several P-DATA-TF PDUs over about
a millisecond. :class:`StagedDataSet` takes the place of pynetdicom's in-memory buffer for
the message (it still is that buffer: a ``BytesIO``), and also writes every fragment to
the staging file as it comes, starting the kernel's writeback of it at once
(``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which does not wait). When the handler has
checked the instance, only the file meta header (written into the gap left for it at the
start), what is still unwritten and the journal commit remain for ``fdatasync``: ≈ 0.2–0.3
ms in the same measurement.

Nothing about durability changes: the instance is still acknowledged only after the
staging file is ``fdatasync``'d, renamed into the study tree and the directory
``fsync``'d (:meth:`dicom_node.ingest.store.InstanceStore.accept`). A staging file of an
instance never acknowledged (refused, a duplicate, an aborted association, a crash) is
removed, or moved to quarantine by the next start like any other ``.part`` file. Each
file is created before its data set arrives (:class:`Stager`).

The gap for the meta header is sized from the C-STORE request (its UIDs, the negotiated
transfer syntax, the calling AE title). The header actually written is built from the
data set; when its length differs (a data set whose SOP Class differs from the
request's), the staging file is dropped and the instance written the ordinary way.
"""

from __future__ import annotations

import ctypes
import io
import logging
import os
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_SYNC_FILE_RANGE_WRITE = 2
_FALLBACK = "staging file %s: %s; writing the instance the ordinary way"
# How long an association's end waits for a spare staging file being created (a create takes
# 0.1–0.35 ms; a stalled disk must not hold the end: the start's reconcile removes a leftover)
_MAKER_WAIT_S = 2.0


def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):  # not Linux: the ordinary fdatasync does it all
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint)
    call.restype = ctypes.c_int

    def start_writeback(fd: int, offset: int, length: int) -> None:
        call(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # a failure only loses the head start

    return start_writeback


_start_writeback = _load_sync_file_range()


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


class StagedDataSet(io.BytesIO):
    """The data set of one C-STORE request, in memory and in its staging file.

    Created in the DUL thread when the request's command set is complete; fragments are
    written as pynetdicom appends them. ``gap``: bytes left free at the start of the file
    for the Part 10 header. Any failure to write marks it unusable (the instance is then
    written the ordinary way); it never raises into pynetdicom.
    """

    def __init__(
        self,
        path: Path,
        gap: int,
        *,
        durable: bool,
        on_done: Callable[[StagedDataSet], None],
        fd: int | None = None,
    ) -> None:
        """``fd``: ``path`` already created (empty) and open for writing; else it is created."""
        super().__init__()
        self.path = path
        self.gap = gap
        self.durable = durable
        self._on_done = on_done
        self._lock = threading.Lock()
        self._size = 0
        self._fd: int | None = fd
        self._usable = True
        if fd is None:
            try:
                self._fd = _create(path)
            except OSError as exc:
                log.warning(_FALLBACK, path.name, exc)
                self._usable = False

    def write(self, data: Any) -> int:  # bytes-like, as BytesIO.write
        written = super().write(data)
        with self._lock:
            if self._usable and self._fd is not None:
                offset = self.gap + self._size
                try:
                    view = memoryview(data).cast("B")
                    while view:
                        view = view[os.pwrite(self._fd, view, offset + (written - len(view))) :]
                    self._size += written
                    if self.durable and _start_writeback is not None:
                        _start_writeback(self._fd, offset, written)
                except OSError as exc:
                    log.warning(_FALLBACK, self.path.name, exc)
                    self._usable = False
        return written

    def finish(self, meta: bytes, size: int) -> Path | None:
        """Write ``meta`` into the gap and flush the file to disk; its path, or None when the
        staging file cannot be used (then it is removed: write the instance otherwise).

        ``size``: the length of the data set the caller stores (a check that it is this one).
        """
        with self._lock:
            fd, self._fd = self._fd, None
            usable = self._usable and fd is not None and len(meta) == self.gap and size == self._size
            self._usable = False
        try:
            if usable:
                assert fd is not None
                os.pwrite(fd, meta, 0)
                if self.durable:
                    os.fdatasync(fd)
                return self.path
        except OSError as exc:
            log.warning(_FALLBACK, self.path.name, exc)
        finally:
            _close(fd)
            self._on_done(self)
        self.path.unlink(missing_ok=True)
        return None

    def discard(self) -> None:
        """Drop the staging file unless :meth:`finish` took it (idempotent)."""
        with self._lock:
            fd, self._fd = self._fd, None
            self._usable = False
        if fd is not None:
            _close(fd)
            self.path.unlink(missing_ok=True)
        self._on_done(self)


class Stager:
    """Staging files for one association's data sets (see the module doc).

    Each data set's file is created ahead of it: when one is taken, the next is created on
    a helper thread while the data set arrives, so creating a file (an inode and a directory
    entry: 0.1–0.35 ms on the reference VM) is off the path the sender waits on. A spare never
    used is empty; ``discard_all`` at the end of the association removes it and whatever an
    abort left half-written. An empty staging file left by a crash holds no byte of any data
    set and is simply removed at the next start
    (:meth:`~dicom_node.ingest.store.InstanceStore.reconcile`).
    """

    def __init__(self, directory: Path, *, durable: bool) -> None:
        self.directory = directory
        self.durable = durable
        self._open: set[StagedDataSet] = set()
        self._lock = threading.Lock()
        self._maker_idle = threading.Condition(self._lock)
        self._making = False  # the helper thread is creating a spare at this moment
        self._spare: tuple[Path, int] | None = None
        self._closed = False
        self._refill()

    def start(self, gap: int) -> StagedDataSet:
        with self._lock:
            spare, self._spare = self._spare, None
        path, fd = spare if spare is not None else (self._new_path(), None)
        staged = StagedDataSet(path, gap, durable=self.durable, on_done=self._done, fd=fd)
        with self._lock:
            self._open.add(staged)
        self._refill()
        return staged

    def _new_path(self) -> Path:
        return self.directory / f"{uuid.uuid4().hex}.part"

    def _refill(self) -> None:
        try:
            _spares().submit(self._make_spare)
        except RuntimeError:  # the interpreter is shutting down: files are created as needed
            pass

    def _make_spare(self) -> None:
        with self._lock:
            if self._closed or self._spare is not None or self._making:
                return
            self._making = True
        path = self._new_path()
        try:
            fd: int | None = _create(path)
        except OSError:
            fd = None  # start() creates it itself, and says why if it fails there too
        with self._lock:
            try:
                if fd is not None and not self._closed and self._spare is None:
                    self._spare = (path, fd)
                elif fd is not None:  # the association ended meanwhile: leave nothing behind
                    _close(fd)
                    path.unlink(missing_ok=True)
            finally:
                self._making = False
                self._maker_idle.notify_all()

    def _done(self, staged: StagedDataSet) -> None:
        with self._lock:
            self._open.discard(staged)

    def discard_all(self) -> None:
        """At the association's end: remove every staging file it still has, including a
        spare the helper thread is creating at this moment (waited for, briefly)."""
        with self._lock:
            self._closed = True
            self._maker_idle.wait_for(lambda: not self._making, timeout=_MAKER_WAIT_S)
            left = list(self._open)
            spare, self._spare = self._spare, None
        for staged in left:
            staged.discard()
        if spare is not None:
            _close(spare[1])
            spare[0].unlink(missing_ok=True)


def _create(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)


_spare_maker: ThreadPoolExecutor | None = None
_spare_maker_lock = threading.Lock()


def _spares() -> ThreadPoolExecutor:
    """The one helper thread (per process) that creates the next staging files."""
    global _spare_maker
    with _spare_maker_lock:
        if _spare_maker is None:
            _spare_maker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="staging-files")
        return _spare_maker
