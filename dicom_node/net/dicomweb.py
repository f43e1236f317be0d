"""A dicomweb-client for a DICOMweb peer the config names: its base URL, its authentication
(HTTP basic with the password in a file, or a bearer token in a file; relative to <home>,
so no secret is written in the config) and the CA file that verifies an https URL.
Used for archives searched and retrieved over DICOMweb (``ingest/archives.py``) and for
destinations delivered to by STOW-RS (``delivery/stow.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


def _path(home: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else home / path


def read_secret(home: Path, value: str, key: str) -> str:
    """The secret in file ``value`` (``key`` names the setting); ValueError saying which
    file could not be read."""
    path = _path(home, value)
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read {key} {path}: {exc.strerror}") from None


def dicomweb_client(
    url: str,
    home: Path,
    *,
    timeout: float,
    username: str = "",
    password_file: str = "",
    token_file: str = "",
    ca_file: str = "",
) -> Any:
    """A DICOMwebClient for ``url`` whose every request is bounded by ``timeout`` alone
    (its own retries are off: the caller retries, with its backoff and its audit).
    Raises ValueError when a secret file cannot be read."""
    import requests
    from dicomweb_client import DICOMwebClient

    session = requests.Session()
    # A redirect is not followed: a query names a patient, a STOW carries images, and both
    # go only to the configured URL (a redirect raises requests.TooManyRedirects).
    session.max_redirects = 0
    headers: dict[str, str] = {}
    if username:
        session.auth = (username, read_secret(home, password_file, "password_file"))
    if token_file:
        headers["Authorization"] = f"Bearer {read_secret(home, token_file, 'token_file')}"
    if ca_file:
        session.verify = str(_path(home, ca_file))
    client = DICOMwebClient(url.rstrip("/"), session=session, headers=headers or None, timeout=timeout)
    client.set_http_retry_params(retry=False)
    return client


class DicomwebPeer(Protocol):
    """A config section that names a DICOMweb peer (a ``dicomweb`` destination or archive)."""

    @property
    def dicomweb_url(self) -> str: ...

    @property
    def timeout_seconds(self) -> float: ...

    @property
    def username(self) -> str: ...

    @property
    def password_file(self) -> str: ...

    @property
    def token_file(self) -> str: ...

    @property
    def ca_file(self) -> str: ...


def client_for(peer: DicomwebPeer, home: Path) -> Any:
    """:func:`dicomweb_client` with the peer's URL, timeout, authentication and CA file."""
    return dicomweb_client(
        peer.dicomweb_url,
        home,
        timeout=peer.timeout_seconds,
        username=peer.username,
        password_file=peer.password_file,
        token_file=peer.token_file,
        ca_file=peer.ca_file,
    )
