"""dicom_node.web: forms refused from other sites (origin and form token), login throttled
per user name and per source address, every bad parameter a 4xx with a message, Secure
cookies over HTTPS. The app runs in a real uvicorn on loopback; the client is httpx."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from dicom_node.runtime import Runtime
from dicom_node.web.app import WebContext, create_app
from dicom_node.web.guard import PRESESSION_COOKIE, SESSION_COOKIE, TOKEN_FIELD, normalise_origin
from dicom_node.web.server import WebServer
from dicom_node.web.users import UserStore
from tests.conftest import state_rows
from tests.peers import free_port

PASSWORD = "a long enough password"
TRUSTED = "https://node.hospital.example"


@dataclass
class Site:
    base: str
    home: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, follow_redirects=False, verify=False, timeout=30)

    def alerts(self) -> list[dict[str, Any]]:
        rows = state_rows(
            self.home,
            "select actor, facts from audit_events where event = 'security-alert' order by seq",
            audit=True,
        )
        return [{"actor": actor, **json.loads(facts)} for actor, facts in rows]

    def logins(self) -> list[dict[str, Any]]:
        rows = state_rows(
            self.home, "select facts from audit_events where event = 'user-login' order by seq", audit=True
        )
        return [json.loads(r[0]) for r in rows]


def start_site(
    home: Path, web: dict[str, Any] | None = None, tls: tuple[Path, Path] | None = None
) -> Iterator[Site]:
    runtime = Runtime.open(None, home, {"web": web or {}})
    users = UserStore(runtime.db)
    users.add("olga", "operator", PASSWORD)
    users.add("alice", "auditor", PASSWORD)
    ctx = WebContext(
        runtime.config,
        runtime.db,
        runtime.audit,
        runtime.paths.checkpoint_file(runtime.config),
        https=tls is not None,
    )
    port = free_port()
    server = WebServer(
        create_app(ctx), "127.0.0.1", port, tls=tls, trusted_proxies=runtime.config.web.trusted_proxies
    )
    server.start()
    try:
        yield Site(f"{'https' if tls else 'http'}://127.0.0.1:{port}", home)
    finally:
        server.stop()
        runtime.close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    yield from start_site(tmp_path / "home", {"trusted_origins": [TRUSTED]})


def form_token(client: httpx.Client, path: str) -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    found = re.search(rf'name="{TOKEN_FIELD}" value="([0-9a-f]+)"', page.text)
    assert found, f"no form token on {path}"
    return found.group(1)


def log_in(client: httpx.Client, base: str, username: str) -> None:
    token = form_token(client, "/login")
    r = client.post(
        "/login",
        data={"username": username, "password": PASSWORD, "next": "/", TOKEN_FIELD: token},
        headers={"Origin": base},
    )
    assert r.status_code == 303, r.text
    assert SESSION_COOKIE in client.cookies


def session_token(client: httpx.Client) -> str:
    """The form token of the client's session, from a page that has a form (log out)."""
    return form_token(client, "/")


def test_posts_from_another_site_are_refused_and_audited(site: Site) -> None:
    with site.client() as client:
        log_in(client, site.base, "olga")
        token = session_token(client)
        refusals = {
            "another origin": {"Origin": "https://evil.example"},
            "Origin: null": {"Origin": "null"},
            "a Referer from another site": {"Referer": "https://evil.example/page"},
            "neither header": {},
            "a lookalike host": {"Origin": site.base + ".evil.example"},
        }
        for what, headers in refusals.items():
            r = client.post("/logout", data={TOKEN_FIELD: token}, headers=headers)
            assert r.status_code == 403, what
            assert r.headers["content-type"].startswith("text/plain"), what
            assert r.text.startswith("Refused: "), what
        # The right origin without the token, or with another browser's token, is refused too.
        assert client.post("/logout", headers={"Origin": site.base}).status_code == 403
        with site.client() as other:
            log_in(other, site.base, "alice")
            foreign = session_token(other)
        r = client.post("/logout", data={TOKEN_FIELD: foreign}, headers={"Origin": site.base})
        assert r.status_code == 403 and "token" in r.text
        assert client.get("/studies").status_code == 200, "none of these logged the user out"

        alerts = site.alerts()
        assert len(alerts) == len(refusals) + 2
        assert {a["actor"] for a in alerts} == {"web:olga"}
        assert {a["alert"] for a in alerts} == {"restricted-function"}
        assert any("Origin: null" in a["reason"] for a in alerts)
        assert all(a["path"] == "/logout" and a["method"] == "POST" for a in alerts)

        # Same origin (by Origin, or by Referer alone) with the token: done.
        r = client.post("/logout", data={TOKEN_FIELD: token}, headers={"Referer": site.base + "/studies"})
        assert r.status_code == 303 and r.headers["location"] == "/login"
        assert client.get("/studies").status_code == 303, "logged out"


def test_a_trusted_origin_may_post(site: Site) -> None:
    with site.client() as client:
        log_in(client, site.base, "olga")
        token = session_token(client)
        r = client.post("/logout", data={TOKEN_FIELD: token}, headers={"Origin": TRUSTED + ":443"})
        assert r.status_code == 303
    assert site.alerts() == []


def test_login_needs_the_login_forms_token(site: Site) -> None:
    with site.client() as client:
        data = {"username": "olga", "password": PASSWORD, "next": "/"}
        r = client.post("/login", data=data, headers={"Origin": site.base})
        assert r.status_code == 403
        assert SESSION_COOKIE not in client.cookies
        token = form_token(client, "/login")
        assert PRESESSION_COOKIE in client.cookies
        r = client.post(
            "/login", data={**data, TOKEN_FIELD: token}, headers={"Origin": "https://evil.example"}
        )
        assert r.status_code == 403
        r = client.post("/login", data={**data, TOKEN_FIELD: token}, headers={"Origin": site.base})
        assert r.status_code == 303 and SESSION_COOKIE in client.cookies
    assert [r["result"] for r in site.logins()] == ["signed in"], "refused posts never reached the login"


def test_thirty_names_with_one_password_from_one_address_are_throttled(site: Site) -> None:
    with site.client() as client:
        token = form_token(client, "/login")
        codes = []
        for i in range(30):
            r = client.post(
                "/login",
                data={"username": f"user{i}", "password": "Winter2024!", TOKEN_FIELD: token},
                headers={"Origin": site.base},
            )
            codes.append(r.status_code)
        assert codes[:20] == [401] * 20, "each name was tried once: only the address counts"
        assert codes[20:] == [429] * 10
        assert "this address" in r.text
        # The address waits even with the right password for a real account.
        r = client.post(
            "/login",
            data={"username": "olga", "password": PASSWORD, TOKEN_FIELD: token},
            headers={"Origin": site.base},
        )
        assert r.status_code == 429 and SESSION_COOKIE not in client.cookies
    results = [(r["result"], r.get("throttled_by")) for r in site.logins()]
    assert results.count(("refused", None)) == 20
    assert results.count(("throttled", "address")) == 11


def test_one_name_is_throttled_after_five_failures(site: Site) -> None:
    with site.client() as client:
        token = form_token(client, "/login")
        codes = [
            client.post(
                "/login",
                data={"username": "olga", "password": f"guess {i}", TOKEN_FIELD: token},
                headers={"Origin": site.base},
            ).status_code
            for i in range(6)
        ]
    assert codes == [401] * 5 + [429]


_HUGE = "9" * 30
_LONG = "x" * 3000
#: (who, method, path, query or form, what the message names). Every one a 400.
BAD_PARAMETERS: list[tuple[str, str, str, dict[str, str], str]] = [
    ("alice", "GET", "/audit", {"until": "9999-12-31"}, "until"),
    ("alice", "GET", "/audit", {"since": "0000-01-01"}, "since"),
    ("alice", "GET", "/audit", {"since": "0001-01-01"}, "since"),
    ("alice", "GET", "/audit", {"until": "2024-13-45"}, "until"),
    ("alice", "GET", "/audit", {"since": _HUGE}, "since"),
    ("alice", "GET", "/audit", {"since": "-1"}, "since"),
    ("alice", "GET", "/audit", {"until": "２０２４-０１-０１"}, "until"),
    ("alice", "GET", "/audit", {"since": "2024-01-01T00:00:00+99:00"}, "since"),
    ("alice", "GET", "/audit", {"until": "9999-12-31T23:59:59"}, "until"),
    ("alice", "GET", "/audit", {"event": "no-such-event"}, "event"),
    ("alice", "GET", "/audit", {"event": "ünïcødé \u202e"}, "event"),
    ("alice", "GET", "/audit", {"patient": _LONG}, "patient"),
    ("alice", "GET", "/audit", {"study": _LONG}, "study"),
    ("alice", "GET", "/audit", {"ae": _LONG}, "ae"),
    ("alice", "GET", f"/audit/study/{_LONG}", {}, "study_uid"),
    ("olga", "GET", "/review/0", {}, "job_id"),
    ("olga", "GET", "/review/-5", {}, "job_id"),
    ("olga", "GET", f"/review/{_HUGE}", {}, "job_id"),
    ("olga", "GET", "/review/abc", {}, "job_id"),
    ("olga", "GET", "/review/1e3", {}, "job_id"),
    ("olga", "GET", "/review/%F0%9F%98%80", {}, "job_id"),
    ("olga", "GET", f"/review/{_HUGE}/preview/derived.png", {}, "job_id"),
    ("olga", "GET", "/review", {"message": _LONG}, "message"),
    ("olga", "POST", f"/review/{_HUGE}/approve", {}, "job_id"),
    ("olga", "POST", "/review/-1/reject", {"reason": "no"}, "job_id"),
    ("olga", "POST", "/review/1/approve", {"note": _LONG}, "note"),
    ("olga", "POST", "/review/1/reject", {"reason": _LONG}, "reason"),
    ("", "GET", "/login", {"next": _LONG}, "next"),
    ("", "POST", "/login", {"username": "olga"}, "password"),
    ("", "POST", "/login", {"username": _LONG, "password": "x"}, "username"),
]


@pytest.mark.parametrize(
    ("who", "method", "path", "params", "named"),
    BAD_PARAMETERS,
    ids=[f"{m} {p[:24]} {' '.join(q)[:20]}".strip() for _w, m, p, q, _n in BAD_PARAMETERS],
)
def test_a_bad_parameter_is_a_400_that_names_it(
    site: Site, who: str, method: str, path: str, params: dict[str, str], named: str
) -> None:
    with site.client() as client:
        if who:
            log_in(client, site.base, who)
        if method == "GET":
            r = client.get(path, params=params)
        else:
            token = form_token(client, "/" if who else "/login")
            r = client.post(path, data={**params, TOKEN_FIELD: token}, headers={"Origin": site.base})
    assert r.status_code == 400, r.text[:500]
    assert named in r.text, "the message names the parameter"
    assert 'id="message"' in r.text or "Cannot search" in r.text


@pytest.mark.parametrize(
    ("who", "path", "params", "status"),
    [
        ("olga", "/review/9223372036854775807", {}, 404),
        ("olga", "/review/1/preview/%00.png", {}, 404),
        ("alice", "/audit/study/ünïcødé\u202e", {}, 404),
        ("alice", "/audit", {"patient": "ünïcødé \u202e\x00", "ae": "-1", "until": "2999-12-31"}, 200),
        ("alice", "/audit", {"since": "1900-01-01", "until": "2024-01-01T12:00:00+05:00"}, 200),
        ("", "/login", {"next": "//evil.example/"}, 200),
    ],
)
def test_odd_but_valid_parameters_are_answered(
    site: Site, who: str, path: str, params: dict[str, str], status: int
) -> None:
    with site.client() as client:
        if who:
            log_in(client, site.base, who)
        assert client.get(path, params=params).status_code == status


def test_after_login_only_local_pages(site: Site) -> None:
    with site.client() as client:
        for target, lands in (("//evil.example/x", "/"), ("/\\evil.example", "/"), ("/review", "/review")):
            token = form_token(client, "/login")  # after the first login: the session's token
            r = client.post(
                "/login",
                data={"username": "olga", "password": PASSWORD, "next": target, TOKEN_FIELD: token},
                headers={"Origin": site.base},
            )
            assert r.headers["location"] == lands, target


def test_the_pages_send_the_referrer_only_to_themselves(site: Site) -> None:
    """With "no-referrer" a browser sends ``Origin: null`` on the node's own forms."""
    with site.client() as client:
        assert client.get("/login").headers["referrer-policy"] == "same-origin"


def test_origins_are_compared_by_scheme_host_and_port() -> None:
    assert normalise_origin("HTTPS://Node.Example:443") == "https://node.example"
    assert normalise_origin("http://127.0.0.1:8480/review/1?x") == "http://127.0.0.1:8480"
    assert normalise_origin("http://[::1]:80") == "http://[::1]"
    for junk in ("null", "file:///etc", "https://", "http://h:99999", "javascript:alert(1)"):
        assert normalise_origin(junk) is None, junk


def test_cookies_are_not_secure_over_plain_http_unless_configured(tmp_path: Path) -> None:
    for web, secure in (({}, False), ({"secure_cookies": True}, True)):
        for site in start_site(tmp_path / f"home-{secure}", web):
            with site.client() as client:
                cookie = client.get("/login").headers["set-cookie"]
            assert ("secure" in cookie.lower()) is secure, cookie


def self_signed(where: Path) -> tuple[Path, Path]:
    cert, key = where / "web.crt", where / "web.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_https_serves_the_pages_with_secure_cookies(tmp_path: Path) -> None:
    tls = self_signed(tmp_path)
    for site in start_site(tmp_path / "home", {"cert_file": str(tls[0]), "key_file": str(tls[1])}, tls=tls):
        assert site.base.startswith("https://")
        with site.client() as client:
            login_page = client.get("/login")
            assert "secure" in login_page.headers["set-cookie"].lower()
            token = re.search(rf'name="{TOKEN_FIELD}" value="([0-9a-f]+)"', login_page.text)
            assert token is not None
            r = client.post(
                "/login",
                data={"username": "olga", "password": PASSWORD, TOKEN_FIELD: token.group(1)},
                headers={"Origin": site.base},
            )
            assert r.status_code == 303
            session = [c for c in r.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE)]
            assert session and "secure" in session[0].lower()


def test_a_certificate_that_does_not_load_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "web.crt").write_text("not a certificate")
    (tmp_path / "web.key").write_text("not a key")
    runtime = Runtime.open(None, tmp_path / "home")
    try:
        app = create_app(WebContext(runtime.config, runtime.db, runtime.audit, tmp_path / "cp", https=True))
        for files, says in (
            ((tmp_path / "web.crt", tmp_path / "web.key"), "do not load as a PEM certificate"),
            ((tmp_path / "missing.crt", tmp_path / "web.key"), "cert_file .*missing.crt not found"),
        ):
            with pytest.raises(OSError, match=says):
                WebServer(app, "127.0.0.1", free_port(), tls=files).start()
    finally:
        runtime.close()


def test_search_dates_keep_their_meaning(site: Site) -> None:
    """A valid search still works after the checks: today's records are found by today's date."""
    today = dt.date.today().isoformat()
    with site.client() as client:
        log_in(client, site.base, "alice")
        r = client.get("/audit", params={"since": today, "until": today, "event": "user-login"})
    assert r.status_code == 200
    assert "1 record(s)" in r.text
