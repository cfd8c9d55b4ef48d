"""A `telenode serve` subprocess with [http] on a free port, and an httpx client for it."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest

from conftest import Node, StoreSCP, free_port, wait_for


class HttpNode(Node):
    """conftest's Node plus the HTTP gateway: `url`, `token`, `client()`."""

    def __init__(self, folder: Path, destinations: list[tuple[str, int]], roots: list[Path] | None = None,
                 extra: str = "", **kwargs) -> None:
        super().__init__(folder, destinations, **kwargs)
        self.http_port = free_port()
        self.roots = roots or []
        self.scheme = "https" if "certificate" in extra else "http"
        roots_toml = "[" + ", ".join(f'"{r}"' for r in self.roots) + "]"
        with open(self.config, "a") as handle:
            handle.write(f'\n[http]\nhost = "127.0.0.1"\nport = {self.http_port}\n'
                         f'token_file = "var/http.token"\nallowed_roots = {roots_toml}\n{extra}\n')

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.http_port}"

    @property
    def token(self) -> str:
        return (self.folder / "var" / "http.token").read_text().strip()

    def start(self) -> "HttpNode":
        super().start()
        assert wait_for(lambda: self._healthy(), 30), f"gateway did not start:\n{self.log.read_text()}"
        return self

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2, verify=False).status_code == 200
        except httpx.HTTPError:
            return False

    def client(self, token: str | None = None) -> httpx.Client:
        """A client with the bearer token (or the given one; "" for none)."""
        token = self.token if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, verify=False)


@pytest.fixture
def make_http_node(tmp_path: Path) -> Iterator[Callable[..., HttpNode]]:
    """Like conftest's make_node, with [http] on a free port; import it into the test module."""
    nodes: list[HttpNode] = []

    def factory(destinations: list[tuple[str, int]], **kwargs) -> HttpNode:
        node = HttpNode(tmp_path / f"httpnode{len(nodes)}", destinations, **kwargs)
        nodes.append(node)
        return node

    yield factory
    for node in nodes:
        node.kill()


@pytest.fixture(scope="module")
def remote(tmp_path_factory) -> Iterator[StoreSCP]:
    """One DCMTK storescp for a module's node; import it into the test module."""
    peer = StoreSCP(tmp_path_factory.mktemp("remote"), free_port()).start()
    yield peer
    peer.stop()
