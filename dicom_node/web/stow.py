"""STOW-RS (DICOM PS3.18 10.5): ``POST /dicomweb/studies`` and ``/dicomweb/studies/{study}``.

A sender (an API token of a user with the ``sender`` role) posts ``multipart/related;
type="application/dicom"``, one DICOM Part 10 file per part. The body is parsed to the
end (python-multipart; the parts go to one temporary file of the request beyond a few MB)
before anything is stored: a malformed body, a part of another media type, a body over
``[web] stow_max_mb``, a sender that disconnects before the body ends or a body the node
cannot spool (disk full) is refused as a whole (400, 415, 413, 507/503, with the reason,
audited) and nothing of it is kept. Then each data set takes the C-STORE path
(:meth:`Receiver.take`): the disk floor, the same checks, quarantine, dedup and
versioning, durable before the answer, indexed, audited and routed like any instance. Its
calling AE title is the sender's user name.

The answer is the PS3.18 store response in DICOM JSON: Referenced SOP Sequence for what
is stored (a duplicate of a stored instance counts as stored), Failed SOP Sequence with
the Failure Reason (the C-STORE status) and the reason in words (Error Comment) for the
rest; 200 when all are stored, 202 when some failed, 409 when none was stored. An
instance whose study is not the one in the URL fails with 0xA900.
"""

# No ``from __future__ import annotations``: FastAPI reads the route's annotations.

import errno
import io
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import pydicom
from fastapi import FastAPI, Request, Security
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import ExplicitVRLittleEndian
from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from audit import AuditEvent, Outcome
from dicom_node.ingest.instance import Rejection, StoreStatus
from dicom_node.web.callers import ApiProblem, Authenticator, Caller
from dicom_node.web.users import Role, UserStore

if TYPE_CHECKING:
    from dicom_node.ingest.receiver import Receiver
    from dicom_node.web.app import WebContext, _LoginThrottle

DICOMWEB_PREFIX = "/dicomweb"
DICOM_JSON = "application/dicom+json"
#: A part stays in memory up to this size, then goes to the request's temporary file.
_SPOOL_BYTES = 8 * 1024 * 1024
#: Parts that begin after this many bytes of the body are written to disk at once (a
#: 4 GB body of small parts must not sit in memory).
_MEMORY_BUDGET = 64 * 1024 * 1024
#: Parts one request may hold.
MAX_PARTS = 20_000


class StowRefused(Exception):
    """The request as a whole is refused (nothing stored): the HTTP status and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    #: The part's bytes while it is held in memory; None: they lie in the request's spool
    #: file at ``offset``.
    memory: bytearray | None = None
    offset: int = 0
    length: int = 0


class _Slice(io.RawIOBase):
    """Bytes ``offset`` to ``offset + length`` of a file, as a read-only file of their own
    (closing it leaves the file open)."""

    def __init__(self, file: Any, offset: int, length: int) -> None:
        super().__init__()
        self._file = file
        self._offset = offset
        self._length = length
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        if base + pos < 0:
            raise ValueError("negative seek position")
        self._pos = base + pos
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        left = max(self._length - self._pos, 0)
        count = left if size is None or size < 0 else min(size, left)
        if count == 0:
            return b""
        self._file.seek(self._offset + self._pos)
        data: bytes = self._file.read(count)  # one allocation: a large part is not copied twice
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read()

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _Body:
    """The parts of a multipart body, collected as it streams in (python-multipart).

    The first parts stay in memory (each up to a few MB, while the body is within the memory
    budget); every other part goes to ONE temporary file of the request, where it is an
    offset and a length: however many parts a body holds, it costs one file descriptor.
    """

    def __init__(self, boundary: bytes, max_bytes: int, spool_dir: str) -> None:
        self.parts: list[_Part] = []
        self.ended = False
        self.received = 0
        self.max_bytes = max_bytes
        self._field = b""
        self._value = b""
        self._dir = spool_dir
        self._spool: Any = None  # the temporary file, opened at the first byte it takes
        self._spooled = 0  # bytes written to it (parts are written in turn, never interleaved)
        try:
            self.parser = MultipartParser(
                boundary,
                {
                    "on_part_begin": self._begin,
                    "on_part_data": self._data,
                    "on_header_field": self._header_field,
                    "on_header_value": self._header_value,
                    "on_header_end": self._header_end,
                    "on_end": self._end,
                },
            )
        except FormParserError as exc:  # e.g. a boundary over python-multipart's 256 bytes
            raise StowRefused(400, f"unusable multipart boundary: {exc}") from None

    def _begin(self) -> None:
        if len(self.parts) >= MAX_PARTS:
            raise StowRefused(413, f"more than {MAX_PARTS} parts in one request: send the study in several")
        # The first parts may stay in memory; once the body has passed the memory budget,
        # every further part goes straight to the spool file.
        held = bytearray() if self.received <= _MEMORY_BUDGET else None
        self.parts.append(_Part(memory=held, offset=self._spooled))

    def _spool_write(self, data: bytes | bytearray | memoryview) -> None:
        if self._spool is None:
            self._spool = tempfile.TemporaryFile(dir=self._dir)  # noqa: SIM115 (closed in close())
        self._spool.write(data)
        self._spooled += len(data)

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self.parts[-1]
        chunk = memoryview(data)[start:end]
        part.length += len(chunk)
        if part.memory is None:
            self._spool_write(chunk)
            return
        part.memory += chunk
        if len(part.memory) > _SPOOL_BYTES:  # too large to hold: the part goes on on disk
            part.offset = self._spooled
            self._spool_write(part.memory)
            part.memory = None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self.parts[-1].headers[name] = self._value.decode("latin-1").strip()
        self._field = self._value = b""

    def _end(self) -> None:
        self.ended = True

    def feed(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.max_bytes:
            raise StowRefused(
                413, f"the body is larger than [web] stow_max_mb ({self.max_bytes // 2**20} MB)"
            )
        try:
            self.parser.write(chunk)
        except MultipartParseError as exc:
            raise StowRefused(400, f"malformed multipart body: {exc}") from None
        except OSError as exc:  # the spool file: disk full, quota, no descriptor left
            raise _cannot_spool(exc) from None

    def finish(self) -> None:
        """The body has ended: the parser's end, and the spool file's last buffer on disk."""
        self.parser.finalize()
        if self._spool is not None:
            try:
                self._spool.flush()
            except OSError as exc:
                raise _cannot_spool(exc) from None

    def open(self, part: _Part) -> Any:
        """The part's bytes as a (read-only, seekable) file."""
        if part.memory is not None:
            return io.BytesIO(part.memory)
        return _Slice(self._spool, part.offset, part.length)

    def read(self, part: _Part) -> bytes:
        with self.open(part) as fp:
            data: bytes = fp.read()
        return data

    def close(self) -> None:
        self.parts.clear()
        if self._spool is not None:
            self._spool.close()
            self._spool = None


def _cannot_spool(exc: OSError) -> StowRefused:
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return StowRefused(
        507 if full else 503,
        f"the node cannot spool the body to disk ({exc.strerror or exc}): nothing of it is kept, "
        "send it again later",
    )


def _media_type(content_type: str) -> tuple[bytes, bytes]:
    """The boundary and the root type of a STOW-RS request, or :class:`StowRefused`."""
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/related":
        raise StowRefused(
            415, f'Content-Type {content_type[:80]!r}: send multipart/related; type="application/dicom"'
        )
    root = options.get(b"type", b"application/dicom").lower()
    if root != b"application/dicom":
        raise StowRefused(
            415,
            f"type={root.decode('latin-1')!r}: only application/dicom parts (DICOM Part 10 files) are taken",
        )
    boundary = options.get(b"boundary", b"")
    if not boundary:
        raise StowRefused(400, "the Content-Type names no boundary")
    return boundary, root


def _check_parts(body: _Body) -> None:
    if not body.ended:
        raise StowRefused(400, "malformed multipart body: it ends before its closing boundary (truncated?)")
    if not body.parts:
        raise StowRefused(400, "the multipart body holds no part")
    for number, part in enumerate(body.parts, 1):
        kind, _ = parse_options_header(part.headers.get("content-type", "application/dicom"))
        if kind != b"application/dicom":
            raise StowRefused(
                415, f"part {number} is {kind.decode('latin-1')!r}: every part must be application/dicom"
            )


@dataclass
class _Outcome:
    stored: list[tuple[str, str]] = field(default_factory=list)
    duplicates: int = 0
    failed: list[tuple[str, str, int, str]] = field(default_factory=list)

    def response(self) -> tuple[int, dict[str, Any]]:
        ds = Dataset()
        if self.stored:
            ds.ReferencedSOPSequence = [_item(cls, uid) for cls, uid in self.stored]
        if self.failed:
            items = []
            for cls, uid, status, reason in self.failed:
                item = _item(cls, uid)
                item.FailureReason = status
                item.ErrorComment = reason[:64]
                items.append(item)
            ds.FailedSOPSequence = items
        status = 200 if not self.failed else 202 if self.stored else 409
        return status, ds.to_json_dict()


def _item(sop_class: str, sop_uid: str) -> Dataset:
    item = Dataset()
    if sop_class:
        item.ReferencedSOPClassUID = sop_class
    if sop_uid:
        item.ReferencedSOPInstanceUID = sop_uid
    return item


def _store_parts(receiver: "Receiver", body: _Body, caller: Caller, study_uid: str | None) -> _Outcome:
    """Each part through the receiver's path, in order (blocking: run in a thread)."""
    done = _Outcome()
    sender = caller.user.username
    for part in body.parts:
        try:
            with body.open(part) as fp:
                meta, data = _split_part10(fp)
            transfer_syntax = str(meta.TransferSyntaxUID)
            sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
            sop_uid = str(meta.get("MediaStorageSOPInstanceUID", ""))
        except Exception as exc:  # not a Part 10 file (pydicom's errors vary): kept in quarantine
            why = f"not a DICOM Part 10 file: {exc}"
            taken = receiver.take(
                lambda part=part: body.read(part),  # type: ignore[misc]
                ExplicitVRLittleEndian,
                claimed_uid="",
                calling_ae=sender,
                peer_host=caller.address,
                rejection=Rejection(StoreStatus.CANNOT_UNDERSTAND, why),
            )
            done.failed.append(("", "", int(taken.status), taken.reason or why))
            continue
        if study_uid is not None:
            with body.open(part) as fp:
                found = _study_of(fp)
            if found != study_uid:
                why = "its Study Instance UID is not the URL's"
                done.failed.append((sop_class, sop_uid, StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, why))
                continue
        taken = receiver.take(
            lambda data=data: data,  # type: ignore[misc]
            transfer_syntax,
            claimed_uid=sop_uid,
            calling_ae=sender,
            peer_host=caller.address,
        )
        if taken.status == StoreStatus.SUCCESS:
            done.stored.append((sop_class, sop_uid))
            done.duplicates += taken.counted == "duplicate"
        else:
            done.failed.append((sop_class, sop_uid, int(taken.status), taken.reason or "refused"))
    return done


def _split_part10(fp: Any) -> tuple[FileMetaDataset, bytes]:
    """:func:`dicom_node.ingest.part10.split_part10` of a file: the file meta and the data
    set bytes, read once (a part of hundreds of MB is not held twice)."""
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    data: bytes = fp.read()
    return meta, data


def _study_of(fp: Any) -> str | None:
    """The Study Instance UID of a Part 10 file (None: it has none, or cannot be read)."""
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        value = ds.get("StudyInstanceUID")
    except Exception:  # an unreadable data set: the store's checks say why
        return None
    return str(value) if value else None


def create_stow(ctx: "WebContext", users: UserStore, throttle: "_LoginThrottle") -> FastAPI:
    app = FastAPI(title="dicom-node STOW-RS", docs_url=None, redoc_url=None, openapi_url=None)
    bearer = HTTPBearer(auto_error=False)
    callers = Authenticator(ctx, users, throttle)

    @app.exception_handler(ApiProblem)
    async def problem(_request: Request, exc: ApiProblem) -> Response:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(_request: Request, exc: RequestValidationError) -> Response:
        where = [".".join(str(p) for p in e.get("loc", ()) if p != "path") for e in exc.errors()[:1]]
        return JSONResponse(
            {"detail": f"{where[0] if where else 'request'}: not a DICOM UID"}, status_code=400
        )

    async def stow(
        request: Request, credentials: HTTPAuthorizationCredentials | None, study_uid: str | None
    ) -> Response:
        who = callers.caller(request, credentials, None, sessions=False)
        caller = callers.require(request, who, Role.SENDER)
        receiver = ctx.receiver
        if receiver is None:
            return JSONResponse({"detail": "this process does not receive instances"}, status_code=503)
        max_bytes = ctx.config.web.stow_max_mb * 2**20
        body: _Body | None = None
        try:
            boundary, _ = _media_type(request.headers.get("content-type", ""))
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise StowRefused(413, f"the body is larger than [web] stow_max_mb ({max_bytes // 2**20} MB)")
            body = _Body(boundary, max_bytes, str(receiver.store.paths.tmp))
            try:
                async for chunk in request.stream():
                    await run_in_threadpool(body.feed, chunk)
            except ClientDisconnect:
                raise StowRefused(400, "the client disconnected before the body ended") from None
            body.finish()
            _check_parts(body)
            done = await run_in_threadpool(_store_parts, receiver, body, caller, study_uid)
        except StowRefused as exc:
            ctx.audit.record(
                AuditEvent.STOW_RECEIVED,
                Outcome.MINOR_FAILURE,
                actor=caller.actor,
                calling_ae=caller.user.username,
                peer_host=caller.address,
                study_uid=study_uid,
                result="refused",
                http_status=exc.status,
                reason=exc.reason,
                bytes=body.received if body else 0,
                **caller.facts(),
            )
            return JSONResponse({"detail": exc.reason}, status_code=exc.status)
        finally:
            if body is not None:
                body.close()
        status, answer = done.response()
        ctx.audit.record(
            AuditEvent.STOW_RECEIVED,
            Outcome.SUCCESS if status == 200 else Outcome.MINOR_FAILURE,
            actor=caller.actor,
            calling_ae=caller.user.username,
            peer_host=caller.address,
            study_uid=study_uid,
            result={200: "stored", 202: "partly stored", 409: "none stored"}[status],
            http_status=status,
            stored=len(done.stored),
            duplicates=done.duplicates,
            failed=len(done.failed),
            bytes=body.received,
            **caller.facts(),
        )
        return JSONResponse(answer, status_code=status, media_type=DICOM_JSON)

    @app.post("/studies")
    async def stow_any(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
    ) -> Response:
        return await stow(request, credentials, None)

    @app.post("/studies/{study_uid}")
    async def stow_study(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
        study_uid: Annotated[str, PathParam(max_length=64, pattern=r"^[0-9.]+$")],
    ) -> Response:
        return await stow(request, credentials, study_uid)

    return app
