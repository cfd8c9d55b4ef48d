"""The gateway's app in process (Starlette's TestClient) for what a running node can't easily show:
an unhealthy node, the reject policy, unknown routes; and the [http] config section."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest
from starlette.testclient import TestClient

from node import config
from node.cli import open_worker
from node.http.app import Context, build
from node.http.batches import Batches
from node.http.server import GatewayError, load_token
from studies import make_study

BASE = """
[node]
data_dir = "var"
[anonymization]
organization = "TESTORG"
burned_in = "{policy}"
[[destinations]]
name = "remote0"
ae_title = "TELERAD"
host = "127.0.0.1"
port = 11113
[http]
{http}
"""


def settings_for(tmp_path: Path, policy: str = "quarantine", http: str = "") -> config.Settings:
    path = tmp_path / "telenode.toml"
    path.write_text(BASE.format(policy=policy, http=http))
    return config.load(path)


@pytest.fixture
def app_for(tmp_path):
    stores = []

    def factory(policy: str = "quarantine", healthy: bool = True) -> TestClient:
        settings = settings_for(tmp_path, policy)
        pipeline, store = open_worker(settings, lambda: None)
        stores.append(store)
        ctx = Context(settings, pipeline, store, "t" * 32, lambda: healthy,
                      Batches(pipeline, tmp_path / "staging", ()))
        return TestClient(build(ctx), headers={"Authorization": "Bearer " + "t" * 32})

    yield factory
    for store in stores:
        store.close()


def test_healthz_503_when_a_listener_is_down(app_for):
    answer = app_for(healthy=False).get("/healthz")
    assert answer.status_code == 503 and answer.json()["status"] != "ok"


def test_reject_policy_answers_422_with_no_quarantine_id(app_for, tmp_path):
    study = make_study(tmp_path / "s", instances=1, series=1)
    ds = pydicom.dcmread(study.files[0])
    ds.BurnedInAnnotation = "YES"
    ds.save_as(study.files[0])
    answer = app_for(policy="reject").post("/api/anonymize-stream", files={"file": study.files[0].read_bytes()})
    assert answer.status_code == 422
    assert answer.json()["quarantine_id"] is None and "burned-in" in answer.json()["error"]


def test_unknown_routes_and_methods_answer_json(app_for):
    client = app_for()
    assert client.get("/api/nothing").status_code == 404
    assert client.get("/api/anonymize-stream").status_code == 405
    assert client.get("/api/nothing").json() == {"error": "not found"}


def test_http_section_defaults_and_resolution(tmp_path):
    assert settings_for(tmp_path).http == config.HTTP(token_file=(tmp_path / "var/http.token").resolve())
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    http = settings_for(tmp_path, http='port = 9090\nallowed_roots = ["link", "/srv/../srv/in"]').http
    assert http.port == 9090 and http.allowed_roots == (real, Path("/srv/in"))
    (tmp_path / "telenode.toml").write_text(BASE.format(policy="pass", http="").replace("[http]\n", ""))
    assert config.load(tmp_path / "telenode.toml").http is None


@pytest.mark.parametrize("http,message", [
    ("prot = 1", "http.prot: unknown key"),
    ("port = 0", "http.port: must be a TCP port"),
    ('allowed_roots = "/srv"', "http.allowed_roots: must be a list"),
    ('certificate = "nope.pem"', "http.certificate:"),
    ("max_request_mb = 0", "http.max_request_mb: must be greater than zero"),
])
def test_http_section_errors_name_the_key(tmp_path, http, message):
    with pytest.raises(config.ConfigError, match=message.replace(".", r"\.")):
        settings_for(tmp_path, http=http)


def test_token_file_created_0600_and_refused_when_others_can_read_it(tmp_path):
    path = tmp_path / "var" / "http.token"
    token = load_token(path)
    assert len(token) >= 32 and (path.stat().st_mode & 0o777) == 0o600 and load_token(path) == token
    os.chmod(path, 0o644)
    with pytest.raises(GatewayError, match="http.token_file"):
        load_token(path)
    os.chmod(path, 0o600)
    path.write_text("short\n")
    with pytest.raises(GatewayError, match="at least 16"):
        load_token(path)
