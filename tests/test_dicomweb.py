"""DICOMweb STOW-RS end to end: DCMTK storescu → telenode serve → Orthanc's DICOMweb plugin (basic auth).

Checks what Orthanc stored (de-identified, each instance once), the study's batches, a
server that is down and comes back, refused credentials; and, against a scripted STOW-RS
server on loopback, how the node classifies answers: a Failed SOP item counts against
that instance only (quarantined after max_failures), 503 with Retry-After and 401 keep
everything pending with the reason as the destination's last error.
"""

from __future__ import annotations

import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import free_port, storescu, wait_for
from servers import Orthanc, cloud_node
from studies import make_study
from test_tls import pki  # noqa: F401 - the test CA and certificates (a fixture)

PASSWORD_ENV = "TELENODE_TEST_STOW_PASSWORD"


def destination(url: str, extra: str = "") -> str:
    return (f'[[destinations]]\nname = "cloud"\nkind = "dicomweb"\nurl = "{url}"\nusername = "telenode"\n'
            f'password_env = "{PASSWORD_ENV}"\n{extra}')


@pytest.fixture
def orthanc(tmp_path: Path) -> Any:
    server = Orthanc(tmp_path / "orthanc").start()
    yield server
    server.stop()


def status(node: Any) -> dict:
    return json.loads(node.cli("status", "--json", check=True).stdout)["destinations"]["cloud"]


def studies(node: Any) -> list[dict]:
    return json.loads(node.cli("studies", "--json", check=True).stdout)["studies"]


def forwarded(node: Any) -> int:
    """How many instances the node recorded as delivered (audit), re-sends included."""
    lines = node.cli("audit", "show", "--event", "forwarded", check=True).stdout.splitlines()
    return sum(json.loads(line)["detail"]["count"] for line in lines)


def test_study_arrives_complete_and_deidentified(make_node, orthanc, monkeypatch, tmp_path):
    monkeypatch.setenv(PASSWORD_ENV, orthanc.password)
    node = cloud_node(make_node, destination(orthanc.url)).start()
    study = make_study(tmp_path / "study", instances=6, series=2)
    assert storescu(node.port, study.files).returncode == 0
    assert wait_for(lambda: len(orthanc.instances()) == 6, 60), node.log.read_text()[-3000:]
    stored = orthanc.instances()
    assert not set(stored) & set(study.sop_uids) and all(uid.startswith("2.25.") for uid in stored)
    for orthanc_id in orthanc._get("/instances"):
        body = orthanc.file(orthanc_id)
        for value in study.identifying_strings:
            assert value.encode() not in body, "an original value reached the DICOMweb server"
    assert wait_for(lambda: studies(node)[0]["batches"][0]["destinations"]["cloud"]["state"] == "done", 30)
    [view] = studies(node)
    assert view["instances"] == 6 and view["destinations"]["cloud"]["sent"] == 6
    assert view["batches"][0]["destinations"]["cloud"]["manifest"] is False  # DICOMweb has no manifest
    assert orthanc.tags(stored[0])["AccessionNumber"] == view["cloud_study_id"]
    text = node.cli("studies", check=True).stdout
    assert view["study_instance_uid"] in text and "cloud sent (6/6 sent)" in text and "cloud done" in text
    assert "batches to cloud: open 0, sending 0, done 1, failed 0" in node.cli("status", check=True).stdout
    assert forwarded(node) == 6 and node.stop() == 0


def test_late_instances_form_a_new_batch(make_node, orthanc, monkeypatch, tmp_path):
    monkeypatch.setenv(PASSWORD_ENV, orthanc.password)
    node = cloud_node(make_node, destination(orthanc.url)).start()
    study = make_study(tmp_path / "study", instances=6, series=2)
    assert storescu(node.port, study.files[:3]).returncode == 0
    assert wait_for(lambda: studies(node) and studies(node)[0]["batches"][0]["complete"], 30)
    assert storescu(node.port, study.files[3:]).returncode == 0
    assert wait_for(lambda: len(orthanc.instances()) == 6, 60)
    assert wait_for(lambda: [b["destinations"]["cloud"]["state"] for b in studies(node)[0]["batches"]]
                    == ["done", "done"], 30), studies(node)
    assert [b["instances"] for b in studies(node)[0]["batches"]] == [3, 3]


def test_server_down_then_up_delivers_everything_exactly_once(make_node, orthanc, monkeypatch, tmp_path):
    monkeypatch.setenv(PASSWORD_ENV, orthanc.password)
    node = cloud_node(make_node, destination(orthanc.url)).start()
    orthanc.stop()
    study = make_study(tmp_path / "study", instances=8, series=2)
    assert storescu(node.port, study.files).returncode == 0
    assert wait_for(lambda: "unreachable" in (status(node)["last_error"] or ""), 30), status(node)
    row = status(node)
    assert row["pending"] + row["inflight"] == 8 and row["sent"] == 0 and row["failed"] == 0
    orthanc.start()
    assert wait_for(lambda: status(node)["sent"] == 8, 60), node.log.read_text()[-3000:]
    assert sorted(orthanc.instances()) == sorted(set(orthanc.instances())) and len(orthanc.instances()) == 8
    assert forwarded(node) == 8 and status(node)["last_error"] is None


def test_wrong_credentials_keep_everything_pending_with_a_clear_error(make_node, orthanc, monkeypatch, tmp_path):
    monkeypatch.setenv(PASSWORD_ENV, "not-the-password")
    node = cloud_node(make_node, destination(orthanc.url)).start()
    study = make_study(tmp_path / "study", instances=4, series=1)
    assert storescu(node.port, study.files).returncode == 0
    assert wait_for(lambda: "401" in (status(node)["last_error"] or ""), 30), status(node)
    row = status(node)
    assert "credentials refused" in row["last_error"] and row["pending"] + row["inflight"] == 4
    assert row["failed"] == 0 and orthanc.instances() == []
    assert "not-the-password" not in node.log.read_text()
    assert node.stop() == 0
    monkeypatch.setenv(PASSWORD_ENV, orthanc.password)
    node.start()
    assert wait_for(lambda: len(orthanc.instances()) == 4, 60), node.log.read_text()[-3000:]


# -- a scripted STOW-RS server: classification of answers ---------------------------------------


class Scripted:
    """A STOW-RS endpoint on loopback answering from a script: (status, headers, failed SOP UIDs)."""

    def __init__(self, answer: Any, tls: ssl.SSLContext | None = None) -> None:
        self.answer = answer  # (list of SOP UIDs in the request) → (status, headers, uids to fail)
        self.scheme = "https" if tls else "http"
        self.requests: list[list[str]] = []
        self.authorizations: list[str] = []
        self.port = free_port()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                uids = _sop_uids(body, self.headers["Content-Type"])
                outer.requests.append(uids)
                outer.authorizations.append(self.headers.get("Authorization", ""))
                code, headers, failed = outer.answer(uids)
                document = {
                    "00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [u]}}
                                                       for u in uids if u not in failed]},
                    "00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [u]},
                                                        "00081197": {"vr": "US", "Value": [0xC000]}}
                                                       for u in failed]},
                }
                payload = json.dumps(document).encode()
                self.send_response(code)
                for name, value in {**headers, "Content-Type": "application/dicom+json"}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/dicom-web"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _sop_uids(body: bytes, content_type: str) -> list[str]:
    """The SOP Instance UIDs of the parts of a multipart/related request."""
    import io

    import pydicom

    boundary = content_type.split("boundary=")[1].strip('"').encode()
    uids = []
    for part in body.split(b"--" + boundary)[1:-1]:
        payload = part.split(b"\r\n\r\n", 1)[1][:-2]
        uids.append(str(pydicom.dcmread(io.BytesIO(payload)).SOPInstanceUID))
    return uids


@pytest.fixture
def scripted() -> Any:
    servers: list[Scripted] = []

    def factory(answer: Any, tls: ssl.SSLContext | None = None) -> Scripted:
        servers.append(Scripted(answer, tls))
        return servers[-1]

    yield factory
    for server in servers:
        server.stop()


def test_a_failed_sop_counts_against_that_instance_only(make_node, scripted, monkeypatch, tmp_path):
    bad: list[str] = []

    def answer(uids: list[str]) -> tuple[int, dict, list[str]]:
        if not bad:
            bad.append(uids[0])  # the first instance of the first request is refused, every time
        failed = [u for u in uids if u in bad]
        return (202 if failed and len(failed) < len(uids) else 409 if failed else 200), {}, failed

    server = scripted(answer)
    monkeypatch.setenv(PASSWORD_ENV, "x")
    node = cloud_node(make_node, destination(server.url, "max_failures = 2\n")).start()
    study = make_study(tmp_path / "study", instances=4, series=1)
    assert storescu(node.port, study.files).returncode == 0
    assert wait_for(lambda: status(node)["failed"] == 1 and status(node)["sent"] == 3, 30), status(node)
    assert sum(uids.count(bad[0]) for uids in server.requests) == 2  # max_failures tries, then quarantined
    assert all(len(set(uids)) == len(uids) for uids in server.requests)
    held = json.loads(node.cli("quarantine", "list", "--json", check=True).stdout)
    assert [(e["kind"], e["sop_instance_uid"]) for e in held] == [("send_failed", bad[0])]
    assert "0xC000" in held[0]["reason"]
    bad[0] = "fixed"  # the server takes it now: released from the quarantine, it goes out in a batch of its own
    assert node.cli("quarantine", "retry", "--all").returncode == 0
    assert wait_for(lambda: status(node)["sent"] == 4 and status(node)["failed"] == 0, 30), status(node)
    assert wait_for(lambda: len(studies(node)[0]["batches"]) == 2, 30)


def test_throttling_and_refused_credentials_count_against_nothing(make_node, scripted, monkeypatch, tmp_path):
    replies = iter([(503, {"Retry-After": "1"}, []), (401, {}, [])])

    def answer(uids: list[str]) -> tuple[int, dict, list[str]]:
        return next(replies, (200, {}, []))

    server = scripted(answer)
    monkeypatch.setenv(PASSWORD_ENV, "x")
    node = cloud_node(make_node, destination(server.url, "max_failures = 1\n")).start()
    study = make_study(tmp_path / "study", instances=3, series=1)
    assert storescu(node.port, study.files).returncode == 0
    assert wait_for(lambda: status(node)["sent"] == 3, 30), status(node)
    assert status(node)["failed"] == 0 and len(server.requests) >= 3  # 503, 401, then stored
    log = node.log.read_text()
    assert "HTTP 503" in log and "HTTP 401" in log and "credentials refused" in log


def test_stat_goes_before_routine(make_node, scripted, monkeypatch, tmp_path):
    server = scripted(lambda uids: (200, {}, []))
    monkeypatch.setenv(PASSWORD_ENV, "x")
    route = '\n[[routes]]\nname = "er"\ncalling_aets = ["ER_CT"]\npriority = "stat"\n'
    node = cloud_node(make_node, destination(server.url, "batch_size = 4\n"))
    node.config.write_text(node.config.read_text() + route)
    node.start()
    node.cli("pause", "cloud", check=True)
    routine = make_study(tmp_path / "routine", instances=8, series=1)
    stat = make_study(tmp_path / "stat", instances=2, series=1)
    assert storescu(node.port, routine.files).returncode == 0
    assert storescu(node.port, stat.files, calling="ER_CT").returncode == 0
    node.cli("resume", "cloud", check=True)
    assert wait_for(lambda: status(node)["sent"] == 10, 30), status(node)
    [view] = [s for s in studies(node) if s["priority"] == "STAT"]
    assert len(server.requests[0]) == 2 and view["instances"] == 2  # the STAT study went first, alone
    assert sum(map(len, server.requests)) == 10


def test_config_of_the_kinds_names_the_key(tmp_path):
    from node import config

    def load(table: str) -> None:
        path = tmp_path / "t.toml"
        path.write_text(f'[[destinations]]\nname = "cloud"\n{table}')
        config.load(path)

    for table, key in (('kind = "ftp"\n', r"destinations\[0\]\.kind"),
                       ('kind = "dicomweb"\n', r"destinations\[0\]\.url"),
                       ('kind = "dicomweb"\nurl = "ftp://x"\n', r"destinations\[0\]\.url"),
                       ('kind = "dicomweb"\nurl = "https://u:p@x/dicom-web"\n', r"destinations\[0\]\.url: must not hold"),
                       ('kind = "dicomweb"\nurl = "https://x"\nusername = "u"\n', r"destinations\[0\]\.password_env"),
                       ('kind = "dicomweb"\nurl = "https://x"\nbucket = "b"\n', r"destinations\[0\]\.bucket: unknown"),
                       ('kind = "s3"\n', r"destinations\[0\]\.bucket"),
                       ('kind = "azure"\n', r"destinations\[0\]\.container"),
                       ('kind = "azure"\ncontainer = "c"\nconnection_string_env = "A B"\n',
                        r"destinations\[0\]\.connection_string_env")):
        with pytest.raises(config.ConfigError, match=key):
            load(table)
    token = tmp_path / "stow.token"
    token.write_text("secret")
    token.chmod(0o644)
    with pytest.raises(config.ConfigError, match="bearer_token_file.*chmod 600"):
        load(f'kind = "dicomweb"\nurl = "https://x"\nbearer_token_file = "{token}"\n')
    token.chmod(0o600)
    load(f'kind = "dicomweb"\nurl = "https://x"\nbearer_token_file = "{token}"\n')


def test_bearer_token_from_a_private_file(make_node, scripted, tmp_path):
    server = scripted(lambda uids: (200, {}, []))
    token = tmp_path / "stow.token"
    token.write_text("token-1\n")
    token.chmod(0o600)
    table = f'[[destinations]]\nname = "cloud"\nkind = "dicomweb"\nurl = "{server.url}"\nbearer_token_file = "{token}"\n'
    node = cloud_node(make_node, table).start()
    study = make_study(tmp_path / "study", instances=2, series=1)
    assert storescu(node.port, study.files[:1]).returncode == 0
    assert wait_for(lambda: status(node)["sent"] == 1, 30)
    token.write_text("token-2\n")  # rotated while the node runs: read again for the next request
    assert storescu(node.port, study.files[1:]).returncode == 0
    assert wait_for(lambda: status(node)["sent"] == 2, 30)
    assert server.authorizations == ["Bearer token-1", "Bearer token-2"]
    assert "token-1" not in node.log.read_text() and "token-2" not in node.log.read_text()


def test_https_is_verified_against_the_configured_ca(make_node, scripted, pki, monkeypatch, tmp_path):  # noqa: F811
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server.cert, pki.server.key)
    server = scripted(lambda uids: (200, {}, []), tls=context)
    monkeypatch.setenv(PASSWORD_ENV, "x")
    node = cloud_node(make_node, destination(server.url)).start()  # the system's CAs: the test CA is unknown
    study = make_study(tmp_path / "study", instances=2, series=1)
    assert storescu(node.port, study.files).returncode == 0
    assert wait_for(lambda: "TLS" in (status(node)["last_error"] or ""), 30), status(node)
    row = status(node)
    assert "certificate verify failed" in row["last_error"] and row["failed"] == 0 and server.requests == []
    assert node.stop() == 0
    node.config.write_text(node.config.read_text().replace(
        "\n[studies]", f'\n[destinations.tls]\nca_certificates = "{pki.ca}"\n\n[studies]'))
    node.start()
    assert wait_for(lambda: status(node)["sent"] == 2, 30), status(node)


def test_requests_carry_one_study_each_bounded_in_size(tmp_path):
    from node.batches import Item
    from node.config import Destination
    from node.destinations.dicomweb import DicomWeb

    def item(number: int, study: str, mib: float) -> Item:
        return Item(queue_id=number, path=tmp_path / f"{number}.dcm", size=int(mib * 1024 * 1024), sop_class_uid="",
                    transfer_syntax="", priority=0, attempts=0, failures=0, sop_instance_uid=f"2.25.{number}",
                    series_instance_uid="2.25.9", study_instance_uid=study, batch_id="b", started=False)

    kind = DicomWeb(Destination("cloud", "", "", 0, kind="dicomweb", url="http://127.0.0.1:1", max_request_mb=2))
    items = [item(1, "A", 0.5), item(2, "B", 0.5), item(3, "A", 1.0), item(4, "A", 5.0), item(5, "A", 0.5)]
    assert [[i.queue_id for i in group] for group in kind.groups(items)] == [[1, 3], [4], [5], [2]]
