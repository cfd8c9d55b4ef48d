"""The HTTP gateway's server: uvicorn in a thread of the supervisor, started and stopped with the node.

The bearer token lives in [http] token_file (one line), created 0600 with a random
token on first start; a token file others can read is refused like a key file.
Uvicorn's own access log is off (paths and clients are logged by telenode's
structlog lines); TLS when [http] certificate and private_key are set.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import uvicorn

from node import config, log
from node.deid.pseudonyms import KeyFileError
from node.http import batches
from node.http.app import Context, build
from node.keys import check_private, write_private
from node.serve import StartError
from node.store import Store


class GatewayError(StartError):
    """The gateway cannot start; the message names the key or the port (no PHI)."""


def load_token(path: Path) -> str:
    """The bearer token: created (0600, random) if the file is missing; refused if others can read it."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(path, secrets.token_urlsafe(32) + "\n", exclusive=True)
    try:
        check_private(path)
        token = path.read_text(encoding="utf-8").splitlines()[0].strip() if path.stat().st_size else ""
    except (KeyFileError, OSError, UnicodeDecodeError) as exc:
        raise GatewayError(f"http.token_file: {exc}") from None
    if len(token) < 16:
        raise GatewayError(f"http.token_file: {path} must hold a token of at least 16 characters")
    return token


def probe(http: config.HTTP) -> None:
    """A taken port is a start-up error, in one line, before anything else starts."""
    with socket.socket(socket.AF_INET6 if ":" in http.host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((http.host, http.port))
        except OSError as exc:
            raise GatewayError(f"cannot listen on {http.host}:{http.port} (http): {exc.strerror}") from None


def _quiet_uvicorn() -> None:
    """Uvicorn's warnings and errors as structlog lines: the message only, never a traceback (the
    routes answer every exception themselves; a traceback's messages could quote a value)."""
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        logger.handlers = [log._ToStructlog(level=logging.WARNING)]
        logger.setLevel(logging.WARNING)
        logger.propagate = False


def _empty(folder: Path) -> None:
    """Uploads a killed node was handling: never answered, and originals (PHI)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for leftover in folder.iterdir():
        if leftover.is_file():
            leftover.unlink(missing_ok=True)


class Gateway:
    """Builds the context (its own pipeline and store connection) and runs uvicorn in a thread."""

    def __init__(self, settings: config.Settings, open_pipeline: Callable[..., tuple[Any, Store]],
                 on_queued: Callable[[], None], healthy: Callable[[], bool]) -> None:
        assert settings.http is not None
        self.settings = settings
        self.http = settings.http
        token = load_token(self.http.token_file)
        probe(self.http)
        _empty(settings.incoming_dir / "http")
        pipeline, self.store = open_pipeline(settings, on_queued)
        staging = settings.data_dir / "staging"
        staging.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.batches = batches.Batches(pipeline, staging, self.http.allowed_roots)
        context = Context(settings, pipeline, self.store, token, healthy, self.batches)
        self.server = uvicorn.Server(uvicorn.Config(
            build(context), host=self.http.host, port=self.http.port, access_log=False, log_config=None,
            log_level=logging.WARNING, lifespan="off", server_header=False, timeout_graceful_shutdown=10,
            ssl_certfile=str(self.http.certificate) if self.http.certificate else None,
            ssl_keyfile=str(self.http.private_key) if self.http.private_key else None,
        ))
        _quiet_uvicorn()
        self.thread = threading.Thread(target=self._serve, name="http", daemon=True)
        self.failure: str | None = None

    def _serve(self) -> None:
        try:
            self.server.run()
        except BaseException as exc:  # uvicorn exits (SystemExit) when it cannot bind or load TLS
            self.failure = type(exc).__name__

    def start(self, timeout: float = 30.0) -> None:
        """Serve; raise GatewayError if uvicorn cannot (TLS files it cannot load)."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise GatewayError(f"http gateway on {self.http.host}:{self.http.port} did not start "
                                   f"({self.failure or 'timeout'}; check http.certificate and http.private_key)")
            time.sleep(0.05)
        log.get("http").info("http_started", host=self.http.host, port=self.http.port,
                             tls=self.http.certificate is not None)

    def stop(self, timeout: float = 15.0) -> None:
        """Finish the requests in progress (batch threads are daemons: a batch not done is not answered)."""
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout)
        self.batches.stop(timeout)
        self.store.close()
