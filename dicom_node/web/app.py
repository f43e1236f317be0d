"""The node's web pages (FastAPI, served from the ``serve`` process; loopback by default).

Login required for everything but the login page. Roles: ``auditor`` reads the audit log
(search, per-study report, chain status); ``operator`` sees studies and jobs and works the
review queue (previews of held outputs with their maps; approve or reject, audited). Every
read of the audit log is itself audited, with the user's name. Pages are server-rendered
(Jinja2, autoescaped); no script, no external asset, and a strict Content-Security-Policy.

Every POST passes :mod:`dicom_node.web.guard` (its origin, and the form token tied to the
session); a refusal is a 403 with a plain message, audited as a security alert. Every
query and path parameter is checked: a bad one is a 400 that says which and why. Failed
logins are throttled per user name and per source address.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import Depends, FastAPI, Form, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from audit import AuditEvent, AuditTrail, Outcome
from audit.report import build_study_report
from dicom_node.config import NodeConfig
from dicom_node.db import queries
from dicom_node.db.engine import Database
from dicom_node.delivery.ledger import DeliveryState
from dicom_node.delivery.outbox import Outbox
from dicom_node.delivery.profiles import DestinationProfiles
from dicom_node.ingest.receiver import Receiver
from dicom_node.jobs.previews import PreviewCache
from dicom_node.jobs.rerun import NotRerunnable, rerun_job
from dicom_node.jobs.review import ReviewError, approve, held_jobs, job_detail, job_overview, reject
from dicom_node.jobs.state import JobState
from dicom_node.web.api import API_PREFIX, create_api
from dicom_node.web.guard import (
    PRESESSION_COOKIE,
    SAFE_METHODS,
    SESSION_COOKIE,
    TOKEN_FIELD,
    allowed_origins,
    form_token,
    new_presession,
    origin_problem,
    token_matches,
    token_secret,
)
from dicom_node.web.health import Check, Readiness, audit_check, database_check, report
from dicom_node.web.metrics import CONTENT_TYPE_LATEST, NodeCollector, render
from dicom_node.web.params import BadParameter, search_instant, validation_problems
from dicom_node.web.stow import DICOMWEB_PREFIX, create_stow
from dicom_node.web.users import Role, User, UserStore

COOKIE = SESSION_COOKIE
_HERE = Path(__file__).parent
_FAILURE_WINDOW = 300.0
#: Failed logins in the window before a user name, or a source address, must wait. An
#: address gets more: several people may share one (a ward PC, a proxy).
_NAME_LIMIT, _ADDRESS_LIMIT = 5, 20
#: Row ids are SQLite integers.
_MAX_ID = 2**63 - 1
_TEXT_MAX = 256

JobId = Annotated[int, PathParam(ge=1, le=_MAX_ID)]
PageCursor = Annotated[int | None, Query(ge=0, le=_MAX_ID)]
#: The review viewer's slice (0: the first; absent: where the hallucination map peaks).
SliceIndex = Annotated[int | None, Query(alias="slice", ge=0, le=100_000)]
#: Rows per page of the studies, jobs and outbox pages.
PAGE = 50
SearchText = Annotated[str, Query(max_length=_TEXT_MAX)]


class CrossSiteRefused(Exception):
    """A POST that failed the origin or the form-token check: a 403."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


@dataclass
class WebContext:
    config: NodeConfig
    db: Database
    audit: AuditTrail
    checkpoint_file: Path
    #: Served over HTTPS ([web] cert_file): cookies are Secure.
    https: bool = False
    #: What ``/readyz`` checks (``serve`` adds storage, the DICOM listener and the
    #: workers); None: the database and the audit log.
    readiness: Readiness | None = None
    #: The store's data directory (``/metrics``: free space); None: not reported.
    data_dir: Path | None = None
    #: Model pins from the environment (``DICOM_NODE_<PIPELINE>_MODEL``): the API's model list names them.
    environment_pins: dict[str, str] = field(default_factory=dict)
    #: The DICOM receiver, whose path STOW-RS instances take; None: STOW-RS answers 503.
    receiver: Receiver | None = None


class _LoginThrottle:
    """At most 5 failed logins per user name, and 20 per source address, in 5 minutes
    (then: wait). A success clears its user name's count, never its address's: one valid
    account must not reset the count of a guesser going through many names."""

    def __init__(self) -> None:
        self._by_name: dict[str, deque[float]] = defaultdict(deque)
        self._by_address: dict[str, deque[float]] = defaultdict(deque)

    @staticmethod
    def _count(failures: dict[str, deque[float]], key: str) -> int:
        recent = failures.get(key)
        if recent is None:
            return 0
        while recent and recent[0] < time.time() - _FAILURE_WINDOW:
            recent.popleft()
        if not recent:
            del failures[key]
        return len(recent)

    def blocked(self, username: str, address: str) -> str | None:
        """Why this login must wait ("name" or "address"), or None."""
        if self._count(self._by_address, address) >= _ADDRESS_LIMIT:
            return "address"
        if self._count(self._by_name, username) >= _NAME_LIMIT:
            return "name"
        return None

    @staticmethod
    def _add(failures: dict[str, deque[float]], key: str) -> None:
        now = time.time()
        if len(failures) > 10_000:  # a flood of names: forget the ones whose window has passed
            for old in [k for k, v in failures.items() if not v or v[-1] < now - _FAILURE_WINDOW]:
                del failures[old]
        failures[key].append(now)

    def failed(self, username: str, address: str) -> None:
        self._add(self._by_name, username)
        self._add(self._by_address, address)

    def succeeded(self, username: str) -> None:
        self._by_name.pop(username, None)

    def address_blocked(self, address: str) -> bool:
        """Credentials that name no user (API tokens): counted per source address only."""
        return self._count(self._by_address, address) >= _ADDRESS_LIMIT

    def failed_address(self, address: str) -> None:
        self._add(self._by_address, address)


#: /readyz runs its checks at most this often; askers in between get the last answer.
READINESS_EVERY_SECONDS = 1.0


def _metrics_allowed(request: Request, token_sha256: str) -> bool:
    """A loopback client, or a bearer token whose sha256 is the configured one."""
    host = request.client.host if request.client else ""
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        pass  # not an address (a test client): treated as remote
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if not token_sha256 or scheme.lower() != "bearer" or not token:
        return False
    return hmac.compare_digest(hashlib.sha256(token.strip().encode()).hexdigest(), token_sha256)


def create_app(ctx: WebContext) -> FastAPI:
    web = ctx.config.web
    secure = ctx.https or web.secure_cookies
    templates = Jinja2Templates(directory=_HERE / "templates")
    users = UserStore(ctx.db)
    throttle = _LoginThrottle()

    def session_user(request: Request) -> User | None:
        return users.session_user(request.cookies.get(COOKIE))

    async def same_site_post(request: Request) -> None:
        """Every route's dependency: a POST must come from this site's own page."""
        if request.method in SAFE_METHODS:
            return
        allowed = allowed_origins(request.url.scheme, request.headers.get("host"), web.trusted_origins)
        problem = origin_problem(request.headers, allowed)
        if problem is None:
            form = await request.form()
            if not token_matches(request.cookies, form.get(TOKEN_FIELD)):
                problem = "the form's security token is missing or out of date"
        if problem is None:
            return
        user = session_user(request)
        ctx.audit.record(
            AuditEvent.SECURITY_ALERT,
            Outcome.MINOR_FAILURE,
            actor=f"web:{user.username}" if user else None,
            peer_host=request.client.host if request.client else None,
            alert="restricted-function",
            reason=f"cross-site request refused: {problem}",
            method=request.method,
            path=request.url.path,
        )
        raise CrossSiteRefused(f"Refused: {problem}. Reload the page on this site and submit the form again.")

    app = FastAPI(
        title="dicom-node",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(same_site_post)],
    )
    app.mount("/static", StaticFiles(directory=_HERE / "static"), name="static")
    app.mount(API_PREFIX, create_api(ctx, users, throttle))
    app.mount(DICOMWEB_PREFIX, create_stow(ctx, users, throttle))

    @app.exception_handler(CrossSiteRefused)
    async def cross_site_refused(_request: Request, exc: CrossSiteRefused) -> Response:
        return PlainTextResponse(exc.message, status_code=403)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(request: Request, exc: RequestValidationError) -> Response:
        return message_page(request, "Bad request", validation_problems(exc))

    def message_page(request: Request, title: str, message: str, status: int = 400) -> Response:
        return page(
            request,
            "message.html",
            status,
            user=session_user(request),
            title=title,
            kind="error",
            message=message,
        )

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; form-action 'self'; frame-ancestors 'none'"
        )
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        # Not no-referrer: a browser then sends "Origin: null" on our own forms' POSTs.
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["Cache-Control"] = "no-store"
        return response

    def set_cookie(response: Response, name: str, value: str, max_age: int | None = None) -> None:
        response.set_cookie(name, value, httponly=True, samesite="strict", secure=secure, max_age=max_age)

    def page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        """Render a page; its forms carry the token of the browser's session (a browser
        with no session yet is given a pre-session cookie to tie the token to)."""
        secret = token_secret(request.cookies)
        presession = None
        if secret is None:
            secret = presession = new_presession()
        response = templates.TemplateResponse(
            request, name, {**context, "csrf_token": form_token(secret)}, status_code=status
        )
        if presession is not None:
            set_cookie(response, PRESESSION_COOKIE, presession)
        return response

    def gate(request: Request, role: Role) -> User | Response:
        """The user, or the response that turns them away (login page or 403)."""
        user = session_user(request)
        if user is None:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(target)}", status_code=303)
        if user.role != role:
            return page(
                request,
                "message.html",
                403,
                user=user,
                title="Not allowed",
                kind="error",
                message=f"This page needs the {role.value} role; you are signed in as {user.role.value}.",
            )
        return user

    def log_used(user: User, what: str, **facts: Any) -> None:
        ctx.audit.record(AuditEvent.AUDIT_LOG_USED, actor=f"web:{user.username}", what=what, **facts)

    # -- health: no login (they say nothing about patients); for monitors and load balancers

    def default_readiness() -> list[Check]:
        return [
            database_check(ctx.db),
            audit_check(ctx.audit, ctx.checkpoint_file, ctx.config.audit.checkpoint_every),
        ]

    checks_now = ctx.readiness or default_readiness
    last: dict[str, Any] = {"at": 0.0, "checks": []}
    checking = threading.Lock()

    def readiness() -> list[Check]:
        """The checks, run at most once a second however often /readyz is asked (each
        writes and syncs a file and opens a connection; the port may be reachable)."""
        with checking:
            if time.monotonic() - last["at"] >= READINESS_EVERY_SECONDS:
                last["checks"], last["at"] = checks_now(), time.monotonic()
            found: list[Check] = last["checks"]
            return found

    collector = NodeCollector(
        ctx.db,
        ctx.audit,
        ctx.data_dir or Path("/nonexistent"),
        ctx.checkpoint_file,
        open_associations=ctx.receiver.open_associations if ctx.receiver is not None else None,
        connections_by_process=ctx.receiver.connections_by_process if ctx.receiver is not None else None,
        workers=ctx.config.workers,
    )

    @app.get("/metrics")
    def metrics(request: Request) -> Response:
        """Prometheus text format: loopback freely, elsewhere with the configured bearer token."""
        if not _metrics_allowed(request, ctx.config.web.metrics_token_sha256):
            return PlainTextResponse(
                "metrics: beyond loopback, send Authorization: Bearer <token> ([web] metrics_token_sha256)",
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return Response(render(collector), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        """Alive: the process answers HTTP."""
        return JSONResponse({"alive": True})

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """Ready to take studies: 200 when every check passes, else 503 naming what is wrong."""
        ready, body = report(readiness())
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: Annotated[str, Query(max_length=2048)] = "/") -> Response:
        return page(request, "login.html", user=None, title="Sign in", next=next)

    @app.post("/login", response_class=HTMLResponse)
    def login(
        request: Request,
        username: Annotated[str, Form(max_length=_TEXT_MAX)],
        password: Annotated[str, Form(max_length=1024)],
        next: Annotated[str, Form(max_length=2048)] = "/",
    ) -> Response:
        client = request.client.host if request.client else None
        blocked = throttle.blocked(username, client or "")
        if blocked is not None:
            ctx.audit.record(
                AuditEvent.USER_LOGIN,
                Outcome.MINOR_FAILURE,
                actor=f"web:{username}",
                peer_host=client,
                result="throttled",
                throttled_by=blocked,
            )
            why = "this user name" if blocked == "name" else "this address"
            return page(
                request,
                "login.html",
                429,
                user=None,
                title="Sign in",
                username=username,
                next=next,
                error=f"Too many failed attempts for {why}; wait five minutes.",
            )
        user = users.authenticate(username, password)
        if user is None:
            throttle.failed(username, client or "")
            ctx.audit.record(
                AuditEvent.USER_LOGIN,
                Outcome.MINOR_FAILURE,
                actor=f"web:{username}",
                peer_host=client,
                result="refused",
            )
            return page(
                request,
                "login.html",
                401,
                user=None,
                title="Sign in",
                username=username,
                next=next,
                error="Wrong user name or password.",
            )
        throttle.succeeded(username)
        token = users.open_session(user, ctx.config.web.session_hours)
        ctx.audit.record(
            AuditEvent.USER_LOGIN,
            actor=f"web:{username}",
            peer_host=client,
            result="signed in",
            role=user.role.value,
        )
        response = RedirectResponse(_local_target(next), status_code=303)
        set_cookie(response, COOKIE, token, max_age=int(web.session_hours * 3600))
        response.delete_cookie(PRESESSION_COOKIE, httponly=True, samesite="strict", secure=secure)
        return response

    @app.post("/logout")
    def logout(request: Request) -> Response:
        users.close_session(request.cookies.get(COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, httponly=True, samesite="strict", secure=secure)
        return response

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request) -> Response:
        user = session_user(request)
        if user is None:
            return RedirectResponse("/login", status_code=303)
        if user.role != Role.OPERATOR:
            return page(request, "home.html", user=user, title="Home")
        midnight = dt.datetime.combine(dt.date.today(), dt.time()).timestamp()
        counts = queries.dashboard_counts(ctx.db, midnight)
        return page(
            request,
            "dashboard.html",
            user=user,
            title="Today",
            c=counts,
            day=dt.date.today().isoformat(),
            held=counts["jobs"].get("held", 0),
            dead=counts["deliveries"].get("dead", 0),
            megabytes=f"{counts['today']['bytes'] / 1e6:.1f}",
        )

    @app.get("/audit", response_class=HTMLResponse)
    def audit_search(
        request: Request,
        patient: SearchText = "",
        study: SearchText = "",
        since: SearchText = "",
        until: SearchText = "",
        event: SearchText = "",
        ae: SearchText = "",
    ) -> Response:
        user = gate(request, Role.AUDITOR)
        if not isinstance(user, User):
            return user
        q = {"patient": patient, "study": study, "since": since, "until": until, "event": event, "ae": ae}
        searched = any(q.values()) or "search" in request.query_params
        records: list[Any] = []
        error, status = None, 200
        limit = 500
        events = sorted(e.value for e in AuditEvent)
        bounds: tuple[float | None, float | None] = (None, None)
        try:
            bounds = (search_instant("since", since), search_instant("until", until, end=True))
            if event and event not in events:
                raise BadParameter(f"event: {event[:40]!r} is not an audit event (choose one from the list)")
        except BadParameter as exc:
            error, status, searched = f"Cannot search: {exc.message}", 400, False
        if searched:
            found = ctx.audit.search(
                patient_id=patient or None,
                study_uid=study.strip() or None,
                since=bounds[0],
                until=bounds[1],
                events=[event] if event else None,
                ae=ae or None,
                limit=limit,
            )
            log_used(user, "search", filters={k: v for k, v in q.items() if v}, results=len(found))
            records = [
                {
                    **r.__dict__,
                    "when": _when(r.at),
                    "outcome_name": Outcome(r.outcome).name.lower(),
                    "facts_text": json.dumps(r.facts, default=str)[:300],
                }
                for r in found
            ]
        return page(
            request,
            "audit_search.html",
            status,
            user=user,
            title="Audit search",
            q=q,
            searched=searched,
            records=records,
            limit=limit,
            error=error,
            events=events,
        )

    @app.get("/audit/study/{study_uid}", response_class=HTMLResponse)
    def audit_report(
        request: Request, study_uid: Annotated[str, PathParam(max_length=_TEXT_MAX)]
    ) -> Response:
        user = gate(request, Role.AUDITOR)
        if not isinstance(user, User):
            return user
        records = ctx.audit.search(study_uid=study_uid)
        log_used(user, "report", study_uid=study_uid)
        if not records:
            return page(
                request,
                "message.html",
                404,
                user=user,
                title="No such study",
                kind="error",
                message=f"No audit records for study {study_uid}.",
            )
        report = build_study_report(study_uid, records).as_dict()
        for job in report["jobs"]:
            for t in job["transitions"]:
                t["when"] = _when(t["at"])
        for d in report["deliveries"]:
            for a in d["attempts"]:
                a["when"] = _when(a["at"])
        return page(request, "audit_report.html", user=user, title="Study report", r=report)

    @app.get("/audit/chain", response_class=HTMLResponse)
    def chain(request: Request) -> Response:
        user = gate(request, Role.AUDITOR)
        if not isinstance(user, User):
            return user
        started = time.perf_counter()
        result = ctx.audit.verify()
        log_used(user, "verify", intact=result.ok, first_bad_seq=result.first_bad_seq)
        return page(
            request,
            "chain.html",
            user=user,
            title="Chain status",
            result=result,
            checked_at=_when(time.time()),
            seconds=f"{time.perf_counter() - started:.2f}",
            checkpoint_file=ctx.checkpoint_file,
        )

    @app.get("/studies", response_class=HTMLResponse)
    def studies(
        request: Request,
        patient: SearchText = "",
        modality: Annotated[str, Query(max_length=16)] = "",
        cursor: PageCursor = None,
    ) -> Response:
        user = gate(request, Role.OPERATOR)
        if not isinstance(user, User):
            return user
        found = queries.list_studies(
            ctx.db,
            patient_id=patient.strip() or None,
            modality=modality.strip() or None,
            cursor=cursor,
            limit=PAGE,
            newest_first=True,
        )
        for s in found:
            s["when"] = _when(s["first_received_at"])
        return page(
            request,
            "studies.html",
            user=user,
            title="Studies",
            studies=found,
            q={"patient": patient, "modality": modality},
            next_page=_next_page(request, found),
        )

    job_states = [state.value for state in JobState]

    @app.get("/jobs", response_class=HTMLResponse)
    def jobs_page(
        request: Request,
        state: Annotated[str, Query(max_length=32)] = "",
        pipeline: Annotated[str, Query(max_length=64)] = "",
        study: Annotated[str, Query(max_length=64)] = "",
        cursor: PageCursor = None,
    ) -> Response:
        user = gate(request, Role.OPERATOR)
        if not isinstance(user, User):
            return user
        if state and state not in job_states:
            return message_page(request, "Bad request", f"state: {state[:40]!r} is not a job state")
        found = queries.list_jobs(
            ctx.db,
            state or None,
            study.strip() or None,
            pipeline=pipeline.strip() or None,
            cursor=cursor,
            limit=PAGE,
            newest_first=True,
        )
        for j in found:
            j["when"] = _when(j["updated_at"])
        return page(
            request,
            "jobs.html",
            user=user,
            title="Jobs",
            jobs=found,
            states=job_states,
            q={"state": state, "pipeline": pipeline, "study": study},
            next_page=_next_page(request, found),
        )

    @app.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job_page(
        request: Request, job_id: JobId, message: Annotated[str, Query(max_length=500)] = ""
    ) -> Response:
        user = gate(request, Role.OPERATOR)
        if not isinstance(user, User):
            return user
        try:
            j = job_overview(ctx.db, ctx.audit, job_id)
        except ReviewError as exc:
            return page(
                request, "message.html", 404, user=user, title="No such job", kind="error", message=str(exc)
            )
        for step in j["transitions"]:
            step["when"] = _when(step["at"])
        for d in j["deliveries"]:
            d["when"] = _when(d["delivered_at"])
        return page(request, "job.html", user=user, title=f"Job {job_id}", j=j, message=message)

    @app.post("/jobs/{job_id}/rerun", response_class=HTMLResponse)
    def job_rerun(
        request: Request, job_id: JobId, reason: Annotated[str, Form(max_length=500)] = ""
    ) -> Response:
        user = gate(request, Role.OPERATOR)
        if not isinstance(user, User):
            return user
        try:
            said = rerun_job(ctx.db, ctx.audit, job_id, f"web:{user.username}", reason.strip())
        except KeyError:
            return message_page(request, "No such job", f"No job {job_id}.", 404)
        except NotRerunnable as exc:
            done = f"Not run again: {exc}."
        else:
            done = f"{said[:1].upper()}{said[1:]}: a worker takes it at its turn."
        return RedirectResponse(f"/jobs/{job_id}?message={quote(done)}", status_code=303)

    delivery_states = [state.value for state in DeliveryState]

    @app.get("/outbox", response_class=HTMLResponse)
    def outbox_page(
        request: Request,
        state: Annotated[str, Query(max_length=32)] = "",
        destination: Annotated[str, Query(max_length=64)] = "",
        cursor: PageCursor = None,
    ) -> Response:
        user = gate(request, Role.OPERATOR)
        if not isinstance(user, User):
            return user
        if state and state not in delivery_states:
            return message_page(request, "Bad request", f"state: {state[:40]!r} is not a delivery state")
        found = queries.list_deliveries(
            ctx.db,
            state or None,
            destination=destination.strip() or None,
            cursor=cursor,
            limit=PAGE,
            newest_first=True,
        )
        for d in found:
            d["when"] = _when(d["delivered_at"] or d["next_attempt_at"])
        return page(
            request,
            "outbox.html",
            user=user,
            title="Outbox",
            deliveries=found,
            states=delivery_states,
            q={"state": state, "destination": destination},
            next_page=_next_page(request, found),
        )

    @app.get("/outbox/{delivery_id}", response_class=HTMLResponse)
    def delivery_page(
        request: Request, delivery_id: JobId, message: Annotated[str, Query(max_length=500)] = ""
    ) -> Response:
        user = gate(request, Role.OPERATOR)
        if not isinstance(user, User):
            return user
        found = queries.list_deliveries(ctx.db, delivery_id=delivery_id)
        if not found:
            return page(
                request,
                "message.html",
                404,
                user=user,
                title="No such delivery",
                kind="error",
                message=f"No delivery {delivery_id}.",
            )
        d = found[0]
        attempts = queries.list_delivery_attempts(ctx.db, delivery_id)
        for a in attempts:
            a["when"] = _when(a["started_at"])
        settled = d["state"] in (DeliveryState.DELIVERED.value, DeliveryState.DEAD.value)
        return page(
            request,
            "delivery.html",
            user=user,
            title=f"Delivery {delivery_id}",
            d=d,
            attempts=attempts,
            message=message,
            next_attempt=_when(d["next_attempt_at"]),
            delivered=_when(d["delivered_at"]),
            refresh=not settled,
        )

    @app.post("/outbox/{delivery_id}/retry", response_class=HTMLResponse)
    def delivery_retry(request: Request, delivery_id: JobId) -> Response:
        user = gate(request, Role.OPERATOR)
        if not isinstance(user, User):
            return user
        try:
            Outbox(ctx.config, ctx.db, ctx.audit, "web").retry_dead(delivery_id, f"web:{user.username}")
        except KeyError:
            return message_page(request, "No such delivery", f"No delivery {delivery_id}.", 404)
        except ValueError as exc:
            done = f"Not retried: {exc}."
        else:
            done = f"Delivery {delivery_id} queued again: the outbox sends it at its next turn."
        return RedirectResponse(f"/outbox/{delivery_id}?message={quote(done)}", status_code=303)

    previews = PreviewCache()

    @app.get("/review", response_class=HTMLResponse)
    def review_queue(request: Request, message: Annotated[str, Query(max_length=500)] = "") -> Response:
        user = gate(request, Role.OPERATOR)
        if not isinstance(user, User):
            return user
        jobs = [{**j, "held_since": _when(j["held_since"])} for j in held_jobs(ctx.db)]
        return page(request, "review_list.html", user=user, title="Review queue", jobs=jobs, message=message)

    def review_page(
        request: Request, user: User, job_id: int, status: int = 200, error: str = "", at: int | None = None
    ) -> Response:
        try:
            detail = job_detail(ctx.db, ctx.audit, job_id)
        except ReviewError as exc:
            return page(
                request, "message.html", 404, user=user, title="No such job", kind="error", message=str(exc)
            )
        context: dict[str, Any] = {"kinds": [], "z": 0.0, "where": "", "preview_error": "", "view": None}
        try:
            made = previews.get(ctx.db, job_id, at)
            context.update(kinds=list(made.images), z=made.z, where=made.why, view=made)
        except (ReviewError, OSError, ValueError, AttributeError) as exc:
            context["preview_error"] = f"No preview: {exc}"
        return page(
            request,
            "review_job.html",
            status,
            user=user,
            title=f"Job {job_id}",
            j=detail,
            error=error,
            **context,
        )

    @app.get("/review/{job_id}", response_class=HTMLResponse)
    def review_job(request: Request, job_id: JobId, at: SliceIndex = None) -> Response:
        user = gate(request, Role.OPERATOR)
        if not isinstance(user, User):
            return user
        return review_page(request, user, job_id, at=at)

    @app.get("/review/{job_id}/preview/{kind}.png")
    def review_preview(
        request: Request, job_id: JobId, kind: Annotated[str, PathParam(max_length=64)], at: SliceIndex = None
    ) -> Response:
        user = gate(request, Role.OPERATOR)
        if not isinstance(user, User):
            return user
        try:
            data = previews.get(ctx.db, job_id, at).images[kind]
        except (ReviewError, KeyError):
            return Response(status_code=404)
        return Response(data, media_type="image/png")

    @app.post("/review/{job_id}/approve", response_class=HTMLResponse)
    def review_approve(
        request: Request, job_id: JobId, note: Annotated[str, Form(max_length=2000)] = ""
    ) -> Response:
        user = gate(request, Role.OPERATOR)
        if not isinstance(user, User):
            return user
        try:
            n = approve(
                ctx.db,
                ctx.audit,
                job_id,
                f"web:{user.username}",
                note.strip() or None,
                handover=DestinationProfiles(ctx.config),
                uid_root=ctx.config.node.uid_root,
            )
        except ReviewError as exc:
            return review_page(request, user, job_id, 409, error=str(exc))
        done = f"Job {job_id} approved: {n} delivery(ies) queued."
        return RedirectResponse(f"/review?message={quote(done)}", status_code=303)

    @app.post("/review/{job_id}/reject", response_class=HTMLResponse)
    def review_reject(
        request: Request, job_id: JobId, reason: Annotated[str, Form(max_length=2000)] = ""
    ) -> Response:
        user = gate(request, Role.OPERATOR)
        if not isinstance(user, User):
            return user
        try:
            reject(ctx.db, ctx.audit, job_id, f"web:{user.username}", reason)
        except ReviewError as exc:
            return review_page(request, user, job_id, 409, error=str(exc))
        done = f"Job {job_id} rejected: nothing will be sent."
        return RedirectResponse(f"/review?message={quote(done)}", status_code=303)

    return app


def _next_page(request: Request, rows: list[dict[str, Any]]) -> str | None:
    """The link to the next (older) page of a listing, with the same search; None: last page."""
    if len(rows) < PAGE:
        return None
    query = {k: v for k, v in request.query_params.items() if k != "cursor"}
    query["cursor"] = str(rows[-1]["id"])
    return f"{request.url.path}?{urlencode(query)}"


def _local_target(next_page: str) -> str:
    """Where to go after login: a path on this site, never another ("//host" and "/\\host"
    are read by browsers as other sites; the redirect percent-encodes the rest)."""
    return next_page if next_page.startswith("/") and next_page[1:2] not in ("/", "\\") else "/"
