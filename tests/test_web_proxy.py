"""dicom_node.web behind a reverse proxy (``[web] trusted_proxies``).

The pages listen on loopback and the README says to put a TLS-terminating proxy in front.
Without trusting the proxy's headers every browser arrives from the proxy's address: the
audit log records the proxy, twenty failed logins anywhere lock every user out, and
``/metrics``' loopback rule lets every client of the proxy in. Trusted, the address is the
browser's, and a client's own X-Forwarded-For entries do not choose it. Untrusted (the
default), the headers are ignored. The app runs in a real uvicorn on loopback (the test
client plays the proxy); the client is httpx.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dicom_node.config import ConfigError, load_config
from dicom_node.web.guard import TOKEN_FIELD
from tests.conftest import state_rows
from tests.test_web_security import PASSWORD, Site, form_token, start_site

BROWSER = "203.0.113.7"
OTHER_BROWSER = "203.0.113.8"


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[Site]:
    yield from start_site(tmp_path / "home", {"trusted_proxies": ["127.0.0.1"]})


@pytest.fixture
def direct(tmp_path: Path) -> Iterator[Site]:
    yield from start_site(tmp_path / "home")


def _login(client: httpx.Client, site: Site, username: str, password: str, forwarded: str) -> int:
    token = form_token(client, "/login")
    r = client.post(
        "/login",
        data={"username": username, "password": password, "next": "/", TOKEN_FIELD: token},
        headers={"Origin": site.base, "X-Forwarded-For": forwarded, "X-Forwarded-Proto": "http"},
    )
    return r.status_code


def _login_hosts(site: Site) -> list[str | None]:
    rows = state_rows(
        site.home, "select peer_host from audit_events where event = 'user-login' order by seq", audit=True
    )
    return [r[0] for r in rows]


def test_behind_a_trusted_proxy_the_audit_log_records_the_browser(proxied: Site) -> None:
    with proxied.client() as client:
        assert _login(client, proxied, "olga", PASSWORD, BROWSER) == 303
    assert _login_hosts(proxied) == [BROWSER]


def test_a_client_cannot_choose_its_address_through_the_proxy(proxied: Site) -> None:
    """A browser that sends its own X-Forwarded-For: the proxy appends the address it saw,
    and that one (the nearest the proxies did not add) is taken."""
    with proxied.client() as client:
        assert _login(client, proxied, "olga", "wrong", f"10.9.9.9, {BROWSER}") == 401
    assert _login_hosts(proxied) == [BROWSER]


def test_the_throttle_counts_each_browser_not_the_proxy(proxied: Site) -> None:
    with proxied.client() as client:
        codes = [_login(client, proxied, f"user{i}", "Winter2024!", BROWSER) for i in range(21)]
        assert codes[:20] == [401] * 20 and codes[20] == 429
        # another browser behind the same proxy is not locked out by the first one's failures
        assert _login(client, proxied, "olga", PASSWORD, OTHER_BROWSER) == 303


def test_metrics_through_the_proxy_need_the_token(proxied: Site) -> None:
    with proxied.client() as client:
        assert client.get("/metrics").status_code == 200  # loopback itself, no proxy header
        remote = client.get("/metrics", headers={"X-Forwarded-For": BROWSER})
        assert remote.status_code == 401 and "Bearer" in remote.text
        spoofed = client.get("/metrics", headers={"X-Forwarded-For": f"127.0.0.1, {BROWSER}"})
        assert spoofed.status_code == 401


def test_without_trusted_proxies_the_headers_are_ignored(direct: Site) -> None:
    with direct.client() as client:
        assert _login(client, direct, "olga", PASSWORD, BROWSER) == 303
        assert client.get("/metrics", headers={"X-Forwarded-For": BROWSER}).status_code == 200
        # twenty failures, each claiming another address: one address (the peer's) counts them
        codes = [_login(client, direct, f"user{i}", "x" * 12, f"198.51.100.{i}") for i in range(21)]
        assert codes[20] == 429
    assert set(_login_hosts(direct)) == {"127.0.0.1"}


@pytest.mark.parametrize(
    ("entry", "accepted"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("10.20.0.0/24", "10.20.0.0/24"),
        ("10.20.0.7/24", "10.20.0.0/24"),
        ("::1", "::1"),
    ],
)
def test_proxies_are_named_by_address_or_network(tmp_path: Path, entry: str, accepted: str) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text(f'[web]\ntrusted_proxies = ["{entry}"]\n')
    assert load_config(toml, tmp_path).config.web.trusted_proxies == (accepted,)


@pytest.mark.parametrize("entry", ["*", "nginx.hospital.example", "10.20.0.0/33"])
def test_trusting_every_sender_or_a_name_is_refused(tmp_path: Path, entry: str) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text(f'[web]\ntrusted_proxies = ["{entry}"]\n')
    with pytest.raises(ConfigError, match="not an IP address or network.*audit log"):
        load_config(toml, tmp_path)
