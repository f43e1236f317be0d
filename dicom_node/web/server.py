"""Run the web app inside the ``serve`` process (uvicorn on its own thread), over HTTPS
when ``[web] cert_file`` and ``key_file`` are set."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import uvicorn
from fastapi import FastAPI


class WebServer:
    """uvicorn on a socket we bind ourselves, so a busy port is a clear start-up error.

    ``tls`` is (certificate chain, private key), PEM; None serves plain HTTP.
    """

    def __init__(
        self,
        app: FastAPI,
        host: str,
        port: int,
        tls: tuple[Path, Path] | None = None,
        trusted_proxies: Sequence[str] = (),
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        # No access log: request lines carry query strings (patient IDs in searches).
        # Proxy headers only from the configured proxies ([web] trusted_proxies): uvicorn
        # would otherwise take X-Forwarded-For from any loopback client, which could then
        # pick the address the login throttle counts and the audit log records. From those,
        # uvicorn takes the nearest address the proxies did not add (a client's own
        # X-Forwarded-For entries come before it).
        self._server = uvicorn.Server(
            uvicorn.Config(
                app,
                log_level="warning",
                access_log=False,
                proxy_headers=bool(trusted_proxies),
                forwarded_allow_ips=list(trusted_proxies) or None,
                lifespan="off",
                ssl_certfile=str(tls[0]) if tls else None,
                ssl_keyfile=str(tls[1]) if tls else None,
            )
        )
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"

    def start(self, timeout: float = 15.0) -> None:
        if self.tls is not None:
            _check_certificate(*self.tls)
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise OSError(f"web pages: cannot listen on {self.host}:{self.port}: {exc.strerror}") from None
        sock.listen(128)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="web", daemon=True
        )
        self._thread.start()
        deadline = time.time() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.time() > deadline:
                raise OSError(f"web pages: the server on {self.host}:{self.port} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)


def _check_certificate(cert: Path, key: Path) -> None:
    """Load the pair once here, so a wrong path or a key that does not fit is one clear
    line at start-up rather than a server thread that dies."""
    for name, path in (("cert_file", cert), ("key_file", key)):
        if not path.is_file():
            raise OSError(f"web pages: [web] {name} {path} not found")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise OSError(
            f"web pages: [web] cert_file {cert} and key_file {key} do not load as a PEM certificate "
            f"chain and its key ({exc.strerror or exc})"
        ) from None
