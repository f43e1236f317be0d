"""The REST API (``/api/v1``), described by OpenAPI at ``/api/openapi.json``.

Who may call it: a script or another system with an API token (``dicom-node user token
create``; ``Authorization: Bearer <token>``), or a browser signed in to the web pages
(its session cookie; a POST then also needs the page's origin and the form token in an
``X-CSRF-Token`` header). Either acts with its user's role, the same roles as the pages:
``operator`` for studies, jobs, deliveries, review and models; ``auditor`` for the audit
log. Each operation names its role in the document (``x-roles``).

Answers: 401 without valid credentials (a refused token is audited and throttled per
source address, like a failed login), 403 for the wrong role (audited as a security
alert), 400 naming a bad parameter, 404 and 409 with a reason. Every request that is
served is audited with the user, and the token's id and name when one was used:
listings and reads as ``query`` (PS3.15 Query) events, the audit log's as
``audit-log-used``, actions by their own events (``review-approved``, ...).

Listings are paged newest first (the audit log oldest first, as a chain is read): pass
``next_cursor`` back as ``cursor``.
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations, and
# ``Operator`` and ``Auditor`` are local to create_api.

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from audit import AuditEvent, Outcome
from audit.report import build_study_report
from dicom_node.db import queries
from dicom_node.db.schema import MAX_ROW_ID
from dicom_node.delivery.ledger import DeliveryState
from dicom_node.delivery.outbox import Outbox
from dicom_node.delivery.profiles import DestinationProfiles
from dicom_node.jobs.inventory import model_inventory
from dicom_node.jobs.rerun import NotRerunnable, rerun_job
from dicom_node.jobs.review import ReviewError, UnknownJob, approve, held_jobs, job_overview, reject
from dicom_node.jobs.state import JobState
from dicom_node.web import api_schemas as s
from dicom_node.web.callers import ApiProblem, Authenticator, Caller
from dicom_node.web.guard import SESSION_COOKIE
from dicom_node.web.params import BadParameter, search_instant, validation_problems
from dicom_node.web.users import Role, UserStore

if TYPE_CHECKING:
    from dicom_node.web.app import WebContext, _LoginThrottle

API_PREFIX = "/api"
_TEXT_MAX = 256

Limit = Annotated[int, Query(ge=1, le=500, description="Items per page (1-500).")]
Cursor = Annotated[int | None, Query(ge=0, le=MAX_ROW_ID, description="`next_cursor` of the page before.")]
Text = Annotated[str | None, Query(max_length=_TEXT_MAX)]
Uid = Annotated[str, PathParam(max_length=64, pattern=r"^[0-9.]+$", description="A DICOM UID.")]
RowId = Annotated[int, PathParam(ge=1, le=MAX_ROW_ID)]
Date = Annotated[
    str | None,
    Query(max_length=40, description="YYYY-MM-DD or an ISO date-time; a bare `until` date: to its end."),
]


def _roles(*roles: Role) -> dict[str, Any]:
    return {"x-roles": [r.value for r in roles]}


OPERATOR, AUDITOR = _roles(Role.OPERATOR), _roles(Role.AUDITOR)
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": s.Problem, "description": what}
    for code, what in (
        (400, "A parameter the API cannot use (named)"),
        (401, "No valid credentials"),
        (403, "The user's role may not do this"),
    )
}


def _choice(name: str, value: str | None, allowed: list[str]) -> str | None:
    if value is not None and value not in allowed:
        raise BadParameter(f"{name}: {value[:40]!r} is not one of {', '.join(allowed)}")
    return value


def _page(items: list[dict[str, Any]], limit: int, key: str = "id") -> dict[str, Any]:
    return {"items": items, "limit": limit, "next_cursor": items[-1][key] if len(items) == limit else None}


def create_api(ctx: "WebContext", users: UserStore, throttle: "_LoginThrottle") -> FastAPI:
    api = FastAPI(
        title="dicom-node REST API",
        version="1",
        description=__doc__ or "",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        responses=_ERRORS,
    )
    bearer = HTTPBearer(auto_error=False, description="An API token: `dicom-node user token create`.")
    cookie = APIKeyCookie(
        name=SESSION_COOKIE, auto_error=False, description="The web pages' session (a signed-in browser)."
    )

    @api.exception_handler(RequestValidationError)
    async def invalid_parameter(_request: Request, exc: RequestValidationError) -> Response:
        return JSONResponse({"detail": validation_problems(exc)}, status_code=400)

    @api.exception_handler(BadParameter)
    async def bad_parameter(_request: Request, exc: BadParameter) -> Response:
        return JSONResponse({"detail": exc.message}, status_code=400)

    callers = Authenticator(ctx, users, throttle)

    def role(needed: Role) -> Callable[..., Caller]:
        def dependency(
            request: Request,
            credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
            session: Annotated[str | None, Security(cookie)],
        ) -> Caller:
            return callers.require(request, callers.caller(request, credentials, session), needed)

        return dependency

    Operator = Annotated[Caller, Depends(role(Role.OPERATOR))]
    Auditor = Annotated[Caller, Depends(role(Role.AUDITOR))]

    def audited(caller: Caller, event: AuditEvent, what: str, **facts: Any) -> None:
        """Audit a request the API served: who, through which token, what."""
        ctx.audit.record(
            event, actor=caller.actor, peer_host=caller.address, what=what, **facts, **caller.facts()
        )

    def queried(caller: Caller, what: str, results: int, **facts: Any) -> None:
        """A read (PS3.15 Query); ``study_uid`` and ``patient_id`` — a study read, or a
        listing's filter — are the record's indexed participants; filters not given are left out."""
        audited(
            caller,
            AuditEvent.QUERY,
            what,
            results=results,
            **{k: v for k, v in facts.items() if v is not None},
        )

    # -- studies --------------------------------------------------------------------------

    @api.get("/v1/studies", response_model=s.Page[s.Study], openapi_extra=OPERATOR, tags=["studies"])
    def studies(
        caller: Operator,
        patient_id: Text = None,
        modality: Annotated[str | None, Query(max_length=16)] = None,
        source_ae: Annotated[str | None, Query(max_length=16)] = None,
        since: Date = None,
        until: Date = None,
        cursor: Cursor = None,
        limit: Limit = 100,
    ) -> dict[str, Any]:
        """Studies received, newest first, with their state and counts."""
        found = queries.list_studies(
            ctx.db,
            patient_id=patient_id,
            modality=modality,
            source_ae=source_ae,
            since=search_instant("since", since),
            until=search_instant("until", until, end=True),
            cursor=cursor,
            limit=limit,
            newest_first=True,
        )
        queried(caller, "studies", len(found), patient_id=patient_id, modality=modality, source_ae=source_ae)
        return _page(found, limit)

    @api.get(
        "/v1/studies/{study_uid}",
        response_model=s.StudyDetail,
        openapi_extra=OPERATOR,
        tags=["studies"],
        responses={404: {"model": s.Problem}},
    )
    def study(caller: Operator, study_uid: Uid) -> dict[str, Any]:
        """One study with its series and its jobs."""
        found = queries.list_studies(ctx.db, study_uid=study_uid)
        if not found:
            raise ApiProblem(404, f"no study {study_uid}")
        body = {
            **found[0],
            "series_list": queries.study_series(ctx.db, study_uid),
            "jobs": queries.list_jobs(ctx.db, study_uid=study_uid),
        }
        queried(caller, "study", 1, study_uid=study_uid, patient_id=found[0]["patient_id"])
        return body

    # -- jobs -----------------------------------------------------------------------------

    job_states = [state.value for state in JobState]

    @api.get("/v1/jobs", response_model=s.Page[s.JobSummary], openapi_extra=OPERATOR, tags=["jobs"])
    def jobs(
        caller: Operator,
        state: Annotated[str | None, Query(description="One of the job states.")] = None,
        pipeline: Annotated[str | None, Query(max_length=64)] = None,
        study_uid: Annotated[str | None, Query(max_length=64)] = None,
        patient_id: Text = None,
        cursor: Cursor = None,
        limit: Limit = 100,
    ) -> dict[str, Any]:
        """Jobs, newest first."""
        found = queries.list_jobs(
            ctx.db,
            _choice("state", state, job_states),
            study_uid,
            pipeline=pipeline,
            patient_id=patient_id,
            cursor=cursor,
            limit=limit,
            newest_first=True,
        )
        queried(
            caller,
            "jobs",
            len(found),
            state=state,
            pipeline=pipeline,
            study_uid=study_uid,
            patient_id=patient_id,
        )
        return _page(found, limit)

    @api.get(
        "/v1/jobs/{job_id}",
        response_model=s.JobDetail,
        openapi_extra=OPERATOR,
        tags=["jobs"],
        responses={404: {"model": s.Problem}},
    )
    def job(caller: Operator, job_id: RowId) -> dict[str, Any]:
        """One job: its states, stage times, QC figures, the gate's reasons, outputs, deliveries."""
        try:
            body = job_overview(ctx.db, ctx.audit, job_id)
        except ReviewError as exc:
            raise ApiProblem(404, str(exc)) from None
        queried(caller, "job", 1, study_uid=body["study_uid"], patient_id=body["patient_id"], job_id=job_id)
        return body

    @api.post(
        "/v1/jobs/{job_id}/rerun",
        response_model=s.RerunDone,
        openapi_extra=OPERATOR,
        tags=["jobs"],
        responses={
            404: {"model": s.Problem},
            409: {"model": s.Problem, "description": "Not failed or refused (the detail says what to do)"},
        },
    )
    def rerun(caller: Operator, job_id: RowId, body: s.RerunRequest | None = None) -> dict[str, Any]:
        """Run a failed or refused job again on the same input, once what stopped it is fixed."""
        try:
            said = rerun_job(
                ctx.db, ctx.audit, job_id, caller.actor, body.reason if body else "", **caller.facts()
            )
        except KeyError:
            raise ApiProblem(404, f"no job {job_id}") from None
        except NotRerunnable as exc:
            raise ApiProblem(409, str(exc)) from None
        return {"job_id": job_id, "state": JobState.QUEUED.value, "detail": said}

    # -- review ---------------------------------------------------------------------------

    @api.get("/v1/review", response_model=list[s.HeldJob], openapi_extra=OPERATOR, tags=["review"])
    def review_queue(caller: Operator) -> list[dict[str, Any]]:
        """Jobs the gate held, oldest first: approve or reject each."""
        held = held_jobs(ctx.db)
        queried(caller, "review queue", len(held))
        return held

    def reviewed(job_id: int, action: Callable[[], int | None]) -> int | None:
        try:
            return action()
        except UnknownJob as exc:
            raise ApiProblem(404, str(exc)) from None
        except ReviewError as exc:
            raise ApiProblem(409, str(exc)) from None

    @api.post(
        "/v1/jobs/{job_id}/approve",
        response_model=s.ReviewDone,
        openapi_extra=OPERATOR,
        tags=["review"],
        responses={
            404: {"model": s.Problem},
            409: {"model": s.Problem, "description": "Not held, or refused"},
        },
    )
    def approve_job(caller: Operator, job_id: RowId, body: s.ApproveBody) -> dict[str, Any]:
        """Release a held job: its deliveries are queued (audited as `review-approved` by this user)."""
        queued = reviewed(
            job_id,
            lambda: approve(
                ctx.db,
                ctx.audit,
                job_id,
                caller.actor,
                body.note.strip() or None,
                handover=DestinationProfiles(ctx.config),
                uid_root=ctx.config.node.uid_root,
                **caller.facts(),
            ),
        )
        return {"job_id": job_id, "state": JobState.DELIVERING.value, "deliveries_queued": queued or 0}

    @api.post(
        "/v1/jobs/{job_id}/reject",
        response_model=s.ReviewDone,
        openapi_extra=OPERATOR,
        tags=["review"],
        responses={404: {"model": s.Problem}, 409: {"model": s.Problem, "description": "Not held"}},
    )
    def reject_job(caller: Operator, job_id: RowId, body: s.RejectBody) -> dict[str, Any]:
        """Reject a held job with a reason: nothing of it is ever sent."""
        reviewed(
            job_id, lambda: reject(ctx.db, ctx.audit, job_id, caller.actor, body.reason, **caller.facts())
        )
        return {"job_id": job_id, "state": JobState.FAILED.value}

    # -- deliveries -----------------------------------------------------------------------

    delivery_states = [state.value for state in DeliveryState]

    @api.get("/v1/deliveries", response_model=s.Page[s.Delivery], openapi_extra=OPERATOR, tags=["deliveries"])
    def deliveries(
        caller: Operator,
        state: Annotated[str | None, Query(description="`dead`: the dead letters.")] = None,
        destination: Annotated[str | None, Query(max_length=64)] = None,
        job_id: Annotated[int | None, Query(ge=1, le=MAX_ROW_ID)] = None,
        cursor: Cursor = None,
        limit: Limit = 100,
    ) -> dict[str, Any]:
        """The outbox: deliveries to PACS and TPS, newest first."""
        found = queries.list_deliveries(
            ctx.db,
            _choice("state", state, delivery_states),
            destination=destination,
            job_id=job_id,
            cursor=cursor,
            limit=limit,
            newest_first=True,
        )
        queried(caller, "deliveries", len(found), state=state, destination=destination, job_id=job_id)
        return _page(found, limit)

    @api.get(
        "/v1/deliveries/{delivery_id}",
        response_model=s.DeliveryDetail,
        openapi_extra=OPERATOR,
        tags=["deliveries"],
        responses={404: {"model": s.Problem}},
    )
    def delivery(caller: Operator, delivery_id: RowId) -> dict[str, Any]:
        """One delivery with every attempt."""
        found = queries.list_deliveries(ctx.db, delivery_id=delivery_id)
        if not found:
            raise ApiProblem(404, f"no delivery {delivery_id}")
        body = {**found[0], "attempt_log": queries.list_delivery_attempts(ctx.db, delivery_id)}
        queried(caller, "delivery", 1, study_uid=body["study_uid"], delivery_id=delivery_id)
        return body

    @api.post(
        "/v1/deliveries/{delivery_id}/retry",
        response_model=s.RetryDone,
        openapi_extra=OPERATOR,
        tags=["deliveries"],
        responses={404: {"model": s.Problem}, 409: {"model": s.Problem, "description": "Not a dead letter"}},
    )
    def retry(caller: Operator, delivery_id: RowId) -> dict[str, Any]:
        """Give a dead-lettered delivery a fresh set of attempts."""
        try:
            Outbox(ctx.config, ctx.db, ctx.audit, "web").retry_dead(
                delivery_id, caller.actor, **caller.facts()
            )
        except KeyError:
            raise ApiProblem(404, f"no delivery {delivery_id}") from None
        except ValueError as exc:
            raise ApiProblem(409, str(exc)) from None
        return {"delivery_id": delivery_id, "state": DeliveryState.PENDING.value}

    # -- models ---------------------------------------------------------------------------

    @api.get("/v1/models", response_model=list[s.Model], openapi_extra=OPERATOR, tags=["models"])
    def models(caller: Operator) -> list[dict[str, Any]]:
        """Every model version installed, the one each pipeline runs, and the weights check."""
        rows = model_inventory(ctx.config, ctx.environment_pins)
        queried(caller, "models", len(rows))
        return rows

    # -- audit ----------------------------------------------------------------------------

    def log_used(caller: Caller, what: str, **facts: Any) -> None:
        audited(caller, AuditEvent.AUDIT_LOG_USED, what, **facts)

    events = sorted(e.value for e in AuditEvent)

    @api.get(
        "/v1/audit/events", response_model=s.Page[s.AuditEventOut], openapi_extra=AUDITOR, tags=["audit"]
    )
    def audit_events(
        caller: Auditor,
        patient_id: Text = None,
        study_uid: Annotated[str | None, Query(max_length=64)] = None,
        since: Date = None,
        until: Date = None,
        event: Annotated[str | None, Query(description="An audit event name.")] = None,
        ae: Annotated[str | None, Query(max_length=16, description="Calling or called AE title.")] = None,
        cursor: Cursor = None,
        limit: Limit = 100,
    ) -> dict[str, Any]:
        """Audit records, oldest first (the order of the chain)."""
        found = ctx.audit.search(
            patient_id=patient_id,
            study_uid=study_uid,
            since=search_instant("since", since),
            until=search_instant("until", until, end=True),
            events=[_choice("event", event, events) or ""] if event else None,
            ae=ae,
            limit=limit,
            after=cursor,
        )
        filters: dict[str, Any] = {"patient_id": patient_id, "study_uid": study_uid, "since": since}
        filters |= {"until": until, "event": event, "ae": ae, "cursor": cursor}
        log_used(
            caller, "search", filters={k: v for k, v in filters.items() if v is not None}, results=len(found)
        )
        items = [{**r.__dict__, "outcome": Outcome(r.outcome).name.lower()} for r in found]
        return _page(items, limit, key="seq")

    @api.get(
        "/v1/audit/studies/{study_uid}",
        response_model=s.StudyReport,
        openapi_extra=AUDITOR,
        tags=["audit"],
        responses={404: {"model": s.Problem}},
    )
    def audit_report(caller: Auditor, study_uid: Uid) -> dict[str, Any]:
        """What happened to one study, from its audit records."""
        records = ctx.audit.search(study_uid=study_uid)
        log_used(caller, "report", study_uid=study_uid)
        if not records:
            raise ApiProblem(404, f"no audit records for study {study_uid}")
        return build_study_report(study_uid, records).as_dict()

    @api.get("/v1/audit/verify", response_model=s.ChainStatus, openapi_extra=AUDITOR, tags=["audit"])
    def audit_verify(caller: Auditor) -> dict[str, Any]:
        """Verify the audit chain (every record's hash and the checkpoints)."""
        started = time.perf_counter()
        result = ctx.audit.verify()
        log_used(caller, "verify", intact=result.ok, first_bad_seq=result.first_bad_seq)
        return {
            "intact": result.ok,
            "records": result.records,
            "head_seq": result.head_seq,
            "first_bad_seq": result.first_bad_seq,
            "problem": result.problem,
            "checkpoints_checked": result.checkpoints_checked,
            "seconds": round(time.perf_counter() - started, 3),
        }

    return api
