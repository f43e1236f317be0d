"""The node's web pages (FastAPI, served from the ``serve`` process; loopback by default).

Login required for everything but the login page. Roles: ``auditor`` reads the audit log
(search, per-study report, chain status); ``operator`` sees studies and jobs and works the
review queue (previews of held outputs with their maps; approve or reject, audited). Every
read of the audit log is itself audited, with the user's name. Pages are server-rendered
(Jinja2, autoescaped); no script, no external asset, and a strict Content-Security-Policy.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from audit import AuditEvent, AuditTrail, Outcome
from audit.report import build_study_report
from dicom_node.config import NodeConfig
from dicom_node.db import queries
from dicom_node.db.engine import Database
from dicom_node.delivery.profiles import DestinationProfiles
from dicom_node.jobs.previews import PreviewCache
from dicom_node.jobs.review import ReviewError, approve, held_jobs, job_detail, reject
from dicom_node.web.users import Role, User, UserStore

COOKIE = "dicom_node_session"
_HERE = Path(__file__).parent
_FAILURE_WINDOW, _FAILURE_LIMIT = 300.0, 5


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


def _day(value: str | None, end: bool = False) -> float | None:
    if not value:
        return None
    day = dt.datetime.fromisoformat(value)
    if end and len(value) <= 10:
        day += dt.timedelta(days=1)
    return day.timestamp()


@dataclass
class WebContext:
    config: NodeConfig
    db: Database
    audit: AuditTrail
    checkpoint_file: Path


class _LoginThrottle:
    """At most 5 failed logins per user name in 5 minutes (then: wait)."""

    def __init__(self) -> None:
        self._failures: dict[str, deque[float]] = defaultdict(deque)

    def blocked(self, username: str) -> bool:
        recent = self._failures[username]
        while recent and recent[0] < time.time() - _FAILURE_WINDOW:
            recent.popleft()
        return len(recent) >= _FAILURE_LIMIT

    def failed(self, username: str) -> None:
        self._failures[username].append(time.time())

    def succeeded(self, username: str) -> None:
        self._failures.pop(username, None)


def create_app(ctx: WebContext) -> FastAPI:
    app = FastAPI(title="dicom-node", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=_HERE / "static"), name="static")
    templates = Jinja2Templates(directory=_HERE / "templates")
    users = UserStore(ctx.db)
    throttle = _LoginThrottle()

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; form-action 'self'; frame-ancestors 'none'"
        )
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    def page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(request, name, context, status_code=status)

    def session_user(request: Request) -> User | None:
        return users.session_user(request.cookies.get(COOKIE))

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

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/") -> Response:
        return page(request, "login.html", user=None, title="Sign in", next=next)

    @app.post("/login", response_class=HTMLResponse)
    def login(
        request: Request, username: str = Form(...), password: str = Form(...), next: str = Form("/")
    ) -> Response:
        client = request.client.host if request.client else None
        if throttle.blocked(username):
            ctx.audit.record(
                AuditEvent.USER_LOGIN,
                Outcome.MINOR_FAILURE,
                actor=f"web:{username}",
                peer_host=client,
                result="throttled",
            )
            return page(
                request,
                "login.html",
                429,
                user=None,
                title="Sign in",
                username=username,
                next=next,
                error="Too many failed attempts for this user name; wait five minutes.",
            )
        user = users.authenticate(username, password)
        if user is None:
            throttle.failed(username)
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
        target = next if next.startswith("/") and not next.startswith("//") else "/"
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE,
            token,
            httponly=True,
            samesite="strict",
            secure=ctx.config.web.secure_cookies,
            max_age=int(ctx.config.web.session_hours * 3600),
        )
        return response

    @app.post("/logout")
    def logout(request: Request) -> Response:
        users.close_session(request.cookies.get(COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request) -> Response:
        user = session_user(request)
        if user is None:
            return RedirectResponse("/login", status_code=303)
        return page(request, "home.html", user=user, title="Home")

    @app.get("/audit", response_class=HTMLResponse)
    def audit_search(
        request: Request,
        patient: str = "",
        study: str = "",
        since: str = "",
        until: str = "",
        event: str = "",
        ae: str = "",
    ) -> Response:
        user = gate(request, Role.AUDITOR)
        if not isinstance(user, User):
            return user
        q = {"patient": patient, "study": study, "since": since, "until": until, "event": event, "ae": ae}
        searched = any(q.values()) or "search" in request.query_params
        records: list[Any] = []
        error = None
        limit = 500
        if searched:
            try:
                found = ctx.audit.search(
                    patient_id=patient or None,
                    study_uid=study.strip() or None,
                    since=_day(since),
                    until=_day(until, end=True),
                    events=[event] if event else None,
                    ae=ae or None,
                    limit=limit,
                )
            except ValueError as exc:
                found, error = [], f"Cannot search: {exc}"
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
            user=user,
            title="Audit search",
            q=q,
            searched=searched,
            records=records,
            limit=limit,
            error=error,
            events=sorted(e.value for e in AuditEvent),
        )

    @app.get("/audit/study/{study_uid}", response_class=HTMLResponse)
    def audit_report(request: Request, study_uid: str) -> Response:
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
    def studies(request: Request) -> Response:
        user = gate(request, Role.OPERATOR)
        if not isinstance(user, User):
            return user
        return page(
            request,
            "studies.html",
            user=user,
            title="Studies and jobs",
            studies=queries.list_studies(ctx.db),
            jobs=queries.list_jobs(ctx.db),
        )

    previews = PreviewCache()

    @app.get("/review", response_class=HTMLResponse)
    def review_queue(request: Request, message: str = "") -> Response:
        user = gate(request, Role.OPERATOR)
        if not isinstance(user, User):
            return user
        jobs = [{**j, "held_since": _when(j["held_since"])} for j in held_jobs(ctx.db)]
        return page(request, "review_list.html", user=user, title="Review queue", jobs=jobs, message=message)

    def review_page(
        request: Request, user: User, job_id: int, status: int = 200, error: str = ""
    ) -> Response:
        try:
            detail = job_detail(ctx.db, ctx.audit, job_id)
        except ReviewError as exc:
            return page(
                request, "message.html", 404, user=user, title="No such job", kind="error", message=str(exc)
            )
        context: dict[str, Any] = {"kinds": [], "z": 0.0, "where": "", "preview_error": ""}
        try:
            made = previews.get(ctx.db, job_id)
            context.update(kinds=list(made.images), z=made.z, where=made.why)
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
    def review_job(request: Request, job_id: int) -> Response:
        user = gate(request, Role.OPERATOR)
        if not isinstance(user, User):
            return user
        return review_page(request, user, job_id)

    @app.get("/review/{job_id}/preview/{kind}.png")
    def review_preview(request: Request, job_id: int, kind: str) -> Response:
        user = gate(request, Role.OPERATOR)
        if not isinstance(user, User):
            return user
        try:
            data = previews.get(ctx.db, job_id).images[kind]
        except (ReviewError, KeyError):
            return Response(status_code=404)
        return Response(data, media_type="image/png")

    @app.post("/review/{job_id}/approve", response_class=HTMLResponse)
    def review_approve(request: Request, job_id: int, note: str = Form("")) -> Response:
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
    def review_reject(request: Request, job_id: int, reason: str = Form("")) -> Response:
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
