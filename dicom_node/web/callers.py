"""Who is calling the REST API or STOW-RS: an API token (``Authorization: Bearer``), or a
signed-in browser's session (the API only). A refused token is audited and throttled per
source address; a session's POST needs the page's origin and its form token in the
``X-CSRF-Token`` header; the wrong role is a 403, audited as a security alert."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials

from audit import AuditEvent, Outcome
from dicom_node.web.guard import SAFE_METHODS, allowed_origins, form_token, origin_problem
from dicom_node.web.users import ApiToken, Role, User, UserStore

if TYPE_CHECKING:
    from dicom_node.web.app import WebContext, _LoginThrottle

CSRF_HEADER = "X-CSRF-Token"


class ApiProblem(HTTPException):
    """An answer other than success: the status and a sentence saying why."""


@dataclass(frozen=True)
class Caller:
    """Who is calling: the user, and the API token when one was used (else a session)."""

    user: User
    token: ApiToken | None
    address: str | None

    @property
    def actor(self) -> str:
        return f"api:{self.user.username}"

    def facts(self) -> dict[str, Any]:
        if self.token is None:
            return {"via": "session"}
        return {"via": "token", "token_id": self.token.id, "token_name": self.token.name}


class Authenticator:
    def __init__(self, ctx: WebContext, users: UserStore, throttle: _LoginThrottle) -> None:
        self.ctx = ctx
        self.users = users
        self.throttle = throttle

    def _refuse_token(self, request: Request, address: str | None, why: str) -> None:
        self.throttle.failed_address(address or "")
        self.ctx.audit.record(
            AuditEvent.USER_LOGIN,
            Outcome.MINOR_FAILURE,
            peer_host=address,
            result="api token refused",
            reason=why,
            path=request.url.path,
        )

    def caller(
        self,
        request: Request,
        credentials: HTTPAuthorizationCredentials | None,
        session: str | None,
        *,
        sessions: bool = True,
    ) -> Caller:
        """The caller, or an :class:`ApiProblem` (401, 403 for a cross-site POST, 429)."""
        address = request.client.host if request.client else None
        if self.throttle.address_blocked(address or ""):
            raise ApiProblem(429, "too many refused credentials from this address; wait five minutes")
        challenge = {"WWW-Authenticate": "Bearer"}
        if request.headers.get("authorization"):
            if credentials is None:
                self._refuse_token(request, address, "not a bearer token")
                raise ApiProblem(401, "send 'Authorization: Bearer <API token>'", headers=challenge)
            found = self.users.token_user(credentials.credentials.strip())
            if found is None:
                self._refuse_token(
                    request, address, "unknown, revoked or expired token, or its user is disabled"
                )
                raise ApiProblem(
                    401,
                    "the API token is unknown, revoked or expired, or its user is disabled",
                    headers=challenge,
                )
            return Caller(found[0], found[1], address)
        user = self.users.session_user(session) if sessions else None
        if user is None:
            raise ApiProblem(
                401,
                "sign in: send 'Authorization: Bearer <API token>' (dicom-node user token create)",
                headers=challenge,
            )
        if request.method not in SAFE_METHODS:
            allowed = allowed_origins(
                request.url.scheme, request.headers.get("host"), self.ctx.config.web.trusted_origins
            )
            problem = origin_problem(request.headers, allowed)
            if problem is None and request.headers.get(CSRF_HEADER) != form_token(session or ""):
                problem = f"the {CSRF_HEADER} header is missing or out of date"
            if problem is not None:
                self.ctx.audit.record(
                    AuditEvent.SECURITY_ALERT,
                    Outcome.MINOR_FAILURE,
                    actor=f"api:{user.username}",
                    peer_host=address,
                    alert="restricted-function",
                    reason=f"cross-site request refused: {problem}",
                    method=request.method,
                    path=request.url.path,
                )
                raise ApiProblem(403, f"refused: {problem}")
        return Caller(user, None, address)

    def require(self, request: Request, caller: Caller, needed: Role) -> Caller:
        """The caller when they have the role; else a 403, audited."""
        if caller.user.role == needed:
            return caller
        self.ctx.audit.record(
            AuditEvent.SECURITY_ALERT,
            Outcome.MINOR_FAILURE,
            actor=caller.actor,
            peer_host=caller.address,
            alert="restricted-function",
            reason=f"{request.method} {request.url.path} needs the {needed.value} role",
            role=caller.user.role.value,
            **caller.facts(),
        )
        raise ApiProblem(
            403, f"this needs the {needed.value} role; {caller.user.username} is {caller.user.role.value}"
        )
