"""Even load over a node's receiving processes (``[node] receivers`` > 1).

Every receiving process listens on the port with SO_REUSEPORT, and the kernel picks the
process for a new connection by a hash of its addresses, blind to load. Four associations
sent at once landed 4:0, 3:1 and 2:2 on two processes in three runs (measured, issue 19);
with 4:0 one process serves everything under its one GIL while the other idles.

So a process that accepts a connection while a sibling has fewer connections hands it to
that sibling, before a byte of it is read: the socket goes over a Unix datagram socket
(SCM_RIGHTS) and the sibling serves it as if it had accepted it (TLS wrapped there, the
connection guard's admission and limits applied there). A connection moves at most once.

**The board.** The processes publish their open connections (pending + associations, the
connection guard's count) in a small shared file of the run folder (``mmap``), one row
per process: its pid, its count, and per other row how many connections it handed there
and how many it took from there. A connection handed but not yet taken counts for the
row it goes to, so a burst of connections accepted by one process is spread, not all
handed to the same sibling. Every cell has one writer (the row's process); a torn or
stale read only makes one choice less even.

**When a sibling cannot take it** — dead (its pid is gone or its socket is unbound), its
queue full — the process that accepted the connection serves it. A connection queued for
a sibling that dies before taking it is closed by the kernel, as one in a dead process's
accept queue would be; nothing acknowledged is at stake before the association.
"""

from __future__ import annotations

import array
import fcntl
import logging
import mmap
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from dicom_node.paths import pid_alive

log = logging.getLogger(__name__)

#: Rows in the board: ``[node] receivers`` is at most 32.
ROWS = 32
_CELL = struct.Struct("<q")
_HEADER = 2  # pid, connections
_ROW_CELLS = _HEADER + 2 * ROWS  # + handed[ROWS] + taken[ROWS]
_ROW_BYTES = _ROW_CELLS * _CELL.size
_MESSAGE = struct.Struct("<HH")  # the listening port the connection came in on, the sender's row


class HandedOff(OSError):
    """``get_request`` gave the connection to a sibling: ``socketserver`` skips it."""


class LoadBoard:
    """The shared file: one row per receiving process (see the module doc)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < ROWS * _ROW_BYTES:
                os.ftruncate(fd, ROWS * _ROW_BYTES)
            self._map = mmap.mmap(fd, ROWS * _ROW_BYTES)
            #: Names this board's sockets (:func:`_address`): another node's board is another file.
            self.inode = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        self.row = -1

    @classmethod
    def reset(cls, path: Path) -> None:
        """A new board (the node starts): every row free."""
        path.unlink(missing_ok=True)
        cls(path).close()

    def close(self) -> None:
        self._map.close()

    def _get(self, row: int, cell: int) -> int:
        value: int = _CELL.unpack_from(self._map, (row * _ROW_CELLS + cell) * _CELL.size)[0]
        return value

    def _set(self, row: int, cell: int, value: int) -> None:
        _CELL.pack_into(self._map, (row * _ROW_CELLS + cell) * _CELL.size, value)

    def pid(self, row: int) -> int:
        return self._get(row, 0)

    def connections(self, row: int) -> int:
        return self._get(row, 1)

    def _handed(self, row: int, to: int) -> int:
        return self._get(row, _HEADER + to)

    def _taken(self, row: int, source: int) -> int:
        return self._get(row, _HEADER + ROWS + source)

    def join(self, pid: int | None = None) -> int:
        """Take a free row (never used, or its process is gone) for this process."""
        pid = os.getpid() if pid is None else pid
        with self.path.open("rb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for row in range(ROWS):
                if not pid_alive(self.pid(row)):
                    # What others handed to the row's last process is not in flight to us,
                    # and what it handed is not owed by them: start level with everyone.
                    for other in range(ROWS):
                        self._set(row, _HEADER + ROWS + other, self._handed(other, row))
                        self._set(row, _HEADER + other, self._taken(other, row))
                    self._set(row, 1, 0)
                    self._set(row, 0, pid)
                    self.row = row
                    return row
        raise RuntimeError(f"{self.path}: all {ROWS} rows are taken by running processes")

    def leave(self) -> None:
        if self.row >= 0:
            self._set(self.row, 1, 0)
            self._set(self.row, 0, 0)
            self.row = -1

    def publish(self, connections: int) -> None:
        if self.row >= 0:
            try:
                self._set(self.row, 1, connections)
            except ValueError:  # closed under a connection that ended as we stopped
                pass

    def _rows_in_use(self) -> int:
        """Rows are taken lowest first: those past the last one with a process are unused."""
        return next((row + 1 for row in range(ROWS - 1, -1, -1) if self.pid(row) > 0), 0)

    def load(self, row: int, rows: int = ROWS) -> int:
        """Its open connections and those handed to it and not yet taken."""
        in_flight = sum(max(self._handed(s, row) - self._taken(row, s), 0) for s in range(rows) if s != row)
        return self.connections(row) + in_flight

    def lighter_than(self, mine: int) -> list[tuple[int, int]]:
        """(row, pid) of live siblings with fewer than ``mine`` connections, least first."""
        rows = max(self._rows_in_use(), self.row + 1)
        found = []
        for row in range(rows):
            pid = self.pid(row)
            if row == self.row or pid <= 0:
                continue
            load = self.load(row, rows)
            if load < mine and pid_alive(pid):
                found.append((load, row, pid))
        return [(row, pid) for _, row, pid in sorted(found)]

    def rows(self) -> list[tuple[int, int, int]]:
        """(row, pid, open connections) of every row whose process runs."""
        found = []
        for row in range(self._rows_in_use()):
            pid = self.pid(row)
            if pid_alive(pid):
                found.append((row, pid, self.connections(row)))
        return found

    def handed(self, to: int) -> None:
        self._set(self.row, _HEADER + to, self._handed(self.row, to) + 1)

    def taken(self, source: int) -> None:
        self._set(self.row, _HEADER + ROWS + source, self._taken(self.row, source) + 1)


def _address(board: LoadBoard, row: int, pid: int) -> str:
    """The abstract Unix socket of one row's process (no file; gone with the process)."""
    return f"\0dicom-node-balance:{board.inode}:{row}:{pid}"


class Balancer:
    """One receiving process's side: hands connections off, and serves those handed to it.

    ``serve(port, sock)`` is called for a connection taken from a sibling (the receiver
    gives it to the server listening on ``port``); ``connections()`` is this process's
    count of open connections.
    """

    def __init__(
        self,
        board_path: Path,
        connections: Callable[[], int],
        serve: Callable[[int, socket.socket], None],
    ) -> None:
        self.board = LoadBoard(board_path)
        self.connections = connections
        self._serve = serve
        self._intake = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._outlet = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._outlet.setblocking(False)
        self._thread: threading.Thread | None = None
        self._stopping = False
        #: Connections handed to a sibling, taken from one, and hand-offs a sibling refused.
        self.handed_off = 0
        self.taken_in = 0
        self.refused = 0

    def start(self) -> None:
        self.board.join()
        self._intake.bind(_address(self.board, self.board.row, os.getpid()))
        self._thread = threading.Thread(target=self._take, name="balance-intake", daemon=True)
        self._thread.start()

    def hand_off(self, port: int, sock: socket.socket) -> bool:
        """Give ``sock`` (just accepted on ``port``, nothing read) to a lighter sibling.

        True: it went (close your copy, do not serve it). False: serve it here.
        """
        if self._stopping:
            return False
        for row, pid in self.board.lighter_than(self.connections()):
            try:
                # (socket.send_fds drops its address argument: sendmsg it is)
                self._outlet.sendmsg(
                    [_MESSAGE.pack(port, self.board.row)],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [sock.fileno()]))],
                    0,
                    _address(self.board, row, pid),
                )
            except OSError:  # gone, or its queue is full: the next
                self.refused += 1
                continue
            self.board.handed(row)
            self.handed_off += 1
            return True
        return False

    def _take(self) -> None:
        try:
            self._take_until_stopped()
        finally:
            if not self._stopping:
                # Never leave a bound socket nobody reads: siblings would queue connections
                # there. Closed, the name is gone, their hand-offs fail and they serve.
                log.error("taking connections from sibling processes stopped")
                self._intake.close()

    def _take_until_stopped(self) -> None:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self._intake, _MESSAGE.size, 1)
            except OSError:
                return  # closed: we stop
            if self._stopping and not fds:
                return
            if not fds:
                continue
            sock = socket.socket(fileno=fds[0])
            if len(data) != _MESSAGE.size:
                sock.close()
                continue
            port, source = _MESSAGE.unpack(data)
            self.taken_in += 1
            try:
                self._serve(port, sock)
            except Exception:
                log.exception("serving a connection handed over by a sibling failed")
                sock.close()
            finally:
                if 0 <= source < ROWS:
                    self.board.taken(source)

    def stop(self) -> None:
        self._stopping = True
        try:
            # wake the intake thread: an empty datagram to ourselves
            self._outlet.sendto(b"", _address(self.board, self.board.row, os.getpid()))
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(5)
        self._intake.close()
        self._outlet.close()
        self.board.leave()
        self.board.close()
