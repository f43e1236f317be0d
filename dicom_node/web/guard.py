"""Cross-site request checks for the web pages' forms.

A state-changing request (any POST) must pass two checks, each of which a page on another
site cannot:

* its ``Origin`` (or, when a browser sent none, its ``Referer``) is the page's own origin
  or one of ``[web] trusted_origins``; ``Origin: null`` (a sandboxed frame, a data: URL, a
  privacy-stripped request) never is;
* it carries the form token of the browser's session (a synchronizer token): a keyed hash
  of the session cookie, which the other site cannot read. Before login the token is tied
  the same way to a random pre-session cookie, so the login form is covered too.

Neither check keeps state on the server: the token follows from the cookie, so it stays
valid across a restart for as long as the session does.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

SESSION_COOKIE = "dicom_node_session"
#: Ties the login form's token to this browser before there is a session.
PRESESSION_COOKIE = "dicom_node_presession"
#: The hidden field every form carries.
TOKEN_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def new_presession() -> str:
    return secrets.token_urlsafe(32)


def form_token(secret: str) -> str:
    """The form token for a session (or pre-session) cookie value."""
    return hmac.new(secret.encode(), b"dicom-node form token", hashlib.sha256).hexdigest()


def token_secret(cookies: Mapping[str, str]) -> str | None:
    """The cookie value the browser's form tokens are tied to: its session, else its
    pre-session (None: it has neither yet)."""
    return cookies.get(SESSION_COOKIE) or cookies.get(PRESESSION_COOKIE) or None


def token_matches(cookies: Mapping[str, str], sent: object) -> bool:
    secret = token_secret(cookies)
    if secret is None or not isinstance(sent, str):
        return False
    return hmac.compare_digest(form_token(secret), sent)


def normalise_origin(text: str) -> str | None:
    """``scheme://host[:port]`` in lower case, default port left out; None when ``text``
    names no http(s) origin."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}" if port in (None, _DEFAULT_PORTS[scheme]) else f"{scheme}://{host}:{port}"


def allowed_origins(scheme: str, host_header: str | None, trusted: Iterable[str]) -> frozenset[str]:
    """The page's own origin (the scheme it was served over and the Host it was asked
    for) and the trusted ones."""
    found = {normalise_origin(origin) for origin in trusted}
    if host_header:
        found.add(normalise_origin(f"{scheme}://{host_header}"))
    return frozenset(o for o in found if o is not None)


def origin_problem(headers: Mapping[str, str], allowed: frozenset[str]) -> str | None:
    """Why the request's origin may not post here, or None."""
    origin = headers.get("origin")
    if origin is not None:
        if origin.strip().lower() == "null":
            return "the form was posted from an opaque origin (Origin: null)"
        if normalise_origin(origin) not in allowed:
            return f"the form was posted from another site ({origin[:200]})"
        return None
    referer = headers.get("referer")
    if referer is None:
        return "the request names no Origin or Referer (a browser sends one)"
    if normalise_origin(referer) not in allowed:
        return "the form was posted from another site (by its Referer)"
    return None
