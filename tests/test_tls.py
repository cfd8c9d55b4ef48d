"""DICOM TLS (PS3.15 Annex B) against real peers, with certificates the test makes on the spot.

A CA signs the node's server certificate (127.0.0.1 / localhost), a good client
certificate, an expired client certificate and a server certificate for another
host; a self-signed client certificate and a second CA stand for strangers.
DCMTK storescu/storescp/echoscu with +tls, pynetdicom and bare ssl clients are
the peers; the node runs as `telenode serve`. The tests check what arrived, what
was refused, what the audit table and the status say, and that a client that
connects and stalls does not hold up anybody else.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from conftest import PEER_ENV, REPO, Node, StoreSCP, dcmtk, free_port, listening, storescu, wait_for
from node.store import Store
from studies import make_study

OTHER_HOST = "pacs.example.org"


# -- certificates ---------------------------------------------------------------------------------


@dataclass
class Pair:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


@dataclass
class PKI:
    ca: Path
    server: Pair  # signed by the CA, for 127.0.0.1 and localhost
    other_host: Pair  # signed by the CA, for OTHER_HOST only
    client: Pair  # signed by the CA
    expired: Pair  # signed by the CA, not valid after yesterday
    self_signed: Pair
    stranger: Pair  # signed by another CA


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "telenode tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _certificate(cn: str, key: Any, issuer: tuple[x509.Name, Any] | None, *, ca: bool = False,
                 names: list[x509.GeneralName] | None = None, usage: Any = None,
                 valid: tuple[dt.datetime, dt.datetime] | None = None) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    start, end = valid or (now - dt.timedelta(hours=1), now + dt.timedelta(days=30))
    issuer_name, issuer_key = issuer or (_name(cn), key)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, stem: str, cert: x509.Certificate, key: Any) -> Pair:
    pair = Pair(folder / f"{stem}.pem", folder / f"{stem}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return pair


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    folder = tmp_path_factory.mktemp("pki")
    ca_key, other_ca_key = _key(), _key()
    ca_cert = _certificate("telenode test CA", ca_key, None, ca=True)
    other_ca = _certificate("stranger CA", other_ca_key, None, ca=True)
    (folder / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    by_ca = (ca_cert.subject, ca_key)
    server, client = [ExtendedKeyUsageOID.SERVER_AUTH], [ExtendedKeyUsageOID.CLIENT_AUTH]
    now = dt.datetime.now(dt.timezone.utc)

    def make(stem: str, cn: str, issuer: Any, **kwargs: Any) -> Pair:
        key = _key()
        return _write(folder, stem, _certificate(cn, key, issuer, **kwargs), key)

    return PKI(
        ca=folder / "ca.pem",
        server=make("server", "telenode", by_ca, usage=server,
                    names=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        other_host=make("other", OTHER_HOST, by_ca, usage=server, names=[x509.DNSName(OTHER_HOST)]),
        client=make("client", "MODALITY", by_ca, usage=client),
        expired=make("expired", "OLD-MODALITY", by_ca, usage=client,
                     valid=(now - dt.timedelta(days=30), now - dt.timedelta(days=1))),
        self_signed=make("selfsigned", "MODALITY", None, usage=client),
        stranger=make("stranger", "MODALITY", (other_ca.subject, other_ca_key), usage=client),
    )


# -- peers ----------------------------------------------------------------------------------------


def tls_args(pki: PKI, client: Pair) -> tuple[str, ...]:
    """DCMTK options: TLS with this client certificate, the test CA verifies the server."""
    return ("+tls", str(client.key), str(client.cert), "+cf", str(pki.ca))


def tls_echo(port: int, pki: PKI, client: Pair, called: str = "TELENODE") -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", called, *tls_args(pki, client), "127.0.0.1",
                           str(port)], capture_output=True, text=True, env=PEER_ENV, timeout=30)


class TLSStoreSCP(StoreSCP):
    """DCMTK storescp with +tls as the remote PACS; by default (-rc) it requires a client certificate."""

    def __init__(self, folder: Path, server: Pair, pki: PKI, port: int | None = None) -> None:
        super().__init__(folder, port or free_port())
        self.server, self.pki = server, pki

    def start(self, client: Pair) -> "TLSStoreSCP":  # type: ignore[override]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "-aet", self.ae_title, "-od", str(self.folder), "-uf", "+xa",
             "+tls", str(self.server.key), str(self.server.cert), "+cf", str(self.pki.ca), str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=PEER_ENV)
        up = wait_for(lambda: tls_echo(self.port, self.pki, client, self.ae_title).returncode == 0, 15)
        assert up, "storescp +tls did not start"
        return self


@pytest.fixture
def tls_storescp(tmp_path: Path, pki: PKI) -> Any:
    peers: list[TLSStoreSCP] = []

    def factory(server: Pair | None = None) -> TLSStoreSCP:
        peer = TLSStoreSCP(tmp_path / f"tlsremote{len(peers)}", server or pki.server, pki)
        peers.append(peer)
        return peer

    yield factory
    for peer in peers:
        peer.stop()


def listener_tls(node: Node, pki: PKI, port: int | None = None, **extra: Any) -> int:
    """Add [node.tls] to the node's config; returns the TLS port (node.port for a TLS-only node)."""
    port = port or free_port()
    lines = ["", "[node.tls]", f"port = {port}", f'certificate = "{pki.server.cert}"',
             f'private_key = "{pki.server.key}"', f'ca_certificates = "{pki.ca}"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in extra.items()]
    node.config.write_text(node.config.read_text() + "\n".join(lines) + "\n")
    return port


def start(node: Node, tls_port: int) -> Node:
    """Start the node and wait for its TLS listener too (Node.start waits for node.port only)."""
    node.start()
    assert wait_for(lambda: listening(tls_port), 30), f"no TLS listener:\n{node.log.read_text()}"
    return node


def destination_tls(node: Node, pki: PKI, **extra: Any) -> None:
    """Add [destinations.tls] (test CA, client certificate) to the node's last destination."""
    lines = ["", "[destinations.tls]", f'ca_certificates = "{pki.ca}"', f'certificate = "{pki.client.cert}"',
             f'private_key = "{pki.client.key}"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in extra.items()]
    node.config.write_text(node.config.read_text() + "\n".join(lines) + "\n")


def assert_closed_by_node(sock: socket.socket, timeout: float) -> None:
    """The node closed (or reset) this connection within `timeout`, without sending anything."""
    sock.settimeout(timeout)
    try:
        assert sock.recv(1) == b""
    except ConnectionResetError:
        pass


def audits(node: Node, event: str) -> list[dict[str, Any]]:
    store = Store(node.folder / "var" / "telenode.sqlite")
    try:
        return store.audit_records(event)
    finally:
        store.close()


def status(node: Node) -> dict[str, Any]:
    return json.loads(node.cli("status", "--json", check=True).stdout)["destinations"]


def log_events(node: Node, event: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in node.log.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == event]


def pynetdicom_echo(port: int, context: ssl.SSLContext) -> bool:
    """One association over TLS with pynetdicom; True when it was established (and echoed)."""
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="TELENODE", tls_args=(context, "127.0.0.1"))
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return getattr(status, "Status", None) == 0


def client_context(pki: PKI, pair: Pair | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if pair is not None:
        context.load_cert_chain(str(pair.cert), str(pair.key))
    return context


# -- the listener ---------------------------------------------------------------------------------


def test_dcmtk_tls_client_reaches_plain_destination_deidentified_beside_plain_listener(
        tmp_path, pki, make_node, make_storescp):
    """storescu +tls → the TLS listener and storescu → the plain listener, side by side on one node;
    both studies arrive de-identified at a plain storescp; the audit tells the two apart."""
    remote = make_storescp().start()
    node = make_node([(remote.ae_title, remote.port)])
    tls_port = listener_tls(node, pki)
    start(node, tls_port)
    secure_study = make_study(tmp_path / "secure", instances=2, series=1)
    plain_study = make_study(tmp_path / "plain", instances=1, series=1)

    sent = storescu(tls_port, secure_study.files, extra=tls_args(pki, pki.client))
    assert sent.returncode == 0, sent.stderr
    sent = storescu(node.port, plain_study.files)
    assert sent.returncode == 0, sent.stderr

    assert wait_for(lambda: len(remote.files()) == 3), f"{len(remote.files())} of 3 arrived"
    for path in remote.files():
        raw = path.read_bytes()
        for value in secure_study.identifying_strings + plain_study.identifying_strings:
            assert value.encode() not in raw
        assert pydicom.dcmread(path).PatientIdentityRemoved == "YES"
    accepted = [a for a in audits(node, "association") if a["accepted"]]
    assert {(a["calling_aet"], a["called_aet"], a["tls"]) for a in accepted} == {
        ("MODALITY", "TELENODE", True), ("MODALITY", "TELENODE", False)}, accepted
    assert all(a["peer"].startswith("127.0.0.1:") for a in accepted)
    assert [e["client_cn"] for e in log_events(node, "tls_established")][-1] == "MODALITY"


def test_clients_without_a_valid_certificate_are_refused_and_the_node_keeps_serving(
        tmp_path, pki, make_node, make_storescp):
    """A TLS-only node (tls.port == node.port): no certificate, self-signed, expired, another CA's,
    and plain DICOM are all refused; a disallowed AE title over TLS is rejected at association;
    the good client is served after all of them; every refusal is audited and logged, without PHI."""
    remote = make_storescp().start()
    node = make_node([(remote.ae_title, remote.port)], allowed=["MODALITY", "ECHOSCU"])
    listener_tls(node, pki, port=node.port)
    node.start()

    for pair in (None, pki.self_signed, pki.expired, pki.stranger):
        assert not pynetdicom_echo(node.port, client_context(pki, pair)), pair
    intruder = storescu(node.port, make_study(tmp_path / "x", instances=1).files, calling="INTRUDER",
                        extra=tls_args(pki, pki.client))
    assert intruder.returncode != 0
    plain = subprocess.run([dcmtk("echoscu"), "-aec", "TELENODE", "127.0.0.1", str(node.port)],
                           capture_output=True, text=True, env=PEER_ENV, timeout=60)
    assert plain.returncode != 0, "plain DICOM must not pass a TLS-only port"

    study = make_study(tmp_path / "study", instances=1, series=1)
    sent = storescu(node.port, study.files, extra=tls_args(pki, pki.client))
    assert sent.returncode == 0, sent.stderr
    assert wait_for(lambda: len(remote.files()) == 1)

    records = audits(node, "association")
    refused = [r for r in records if not r["accepted"] and r["calling_aet"] == ""]
    assert len(refused) >= 5 and all(r["tls"] and r["reason"].startswith("TLS: ") for r in refused), refused
    reasons = " | ".join(r["reason"] for r in refused)
    assert "expired" in reasons and "certificate" in reasons, reasons
    rejected = [r for r in records if r["calling_aet"] == "INTRUDER"]
    assert rejected == [dict(rejected[0], accepted=False, tls=True, reason="calling AE title not allowed")]
    assert any(r["accepted"] and r["tls"] and r["calling_aet"] == "MODALITY" for r in records)
    logged = log_events(node, "tls_refused")
    assert len(logged) >= 5 and all(e["peer"].startswith("127.0.0.1:") and e["reason"] for e in logged)
    assert "SMITHERSON" not in node.log.read_text()


def test_a_stalled_client_does_not_hold_up_a_good_one(tmp_path, pki, make_node, make_storescp):
    """Clients that open the TLS port and send nothing (or half a ClientHello) stay connected while a
    real TLS client associates and stores: the handshake is not done in the accept loop."""
    remote = make_storescp().start()
    node = make_node([(remote.ae_title, remote.port)])
    tls_port = listener_tls(node, pki, handshake_timeout=60)
    start(node, tls_port)
    stallers = [socket.create_connection(("127.0.0.1", tls_port)) for _ in range(3)]
    stallers[0].sendall(b"\x16\x03\x01")  # the start of a TLS record, then nothing
    try:
        time.sleep(0.5)  # the node accepted them
        study = make_study(tmp_path / "study", instances=2, series=1)
        began = time.monotonic()
        sent = storescu(tls_port, study.files, extra=tls_args(pki, pki.client))
        took = time.monotonic() - began
        assert sent.returncode == 0, sent.stderr
        assert took < 20, f"the good client took {took:.1f} s behind the stalled ones"
        for staller in stallers:  # still connected: nothing was read or closed on them
            staller.setblocking(False)
            with pytest.raises(BlockingIOError):
                staller.recv(1)
        assert wait_for(lambda: len(remote.files()) == 2)
    finally:
        for staller in stallers:
            staller.close()


def test_handshake_timeout_drops_a_stalled_client_and_audits_it(pki, make_node, make_storescp):
    remote = make_storescp().start()
    node = make_node([(remote.ae_title, remote.port)])
    tls_port = listener_tls(node, pki, handshake_timeout=1)
    start(node, tls_port)
    with socket.create_connection(("127.0.0.1", tls_port)) as staller:
        staller.sendall(b"\x16\x03\x01")
        assert_closed_by_node(staller, 20)
    assert wait_for(lambda: any(r["reason"] == "TLS: handshake timed out" and not r["accepted"]
                                for r in audits(node, "association")), 10)


def test_handshake_timeout_bounds_the_whole_handshake_not_each_read(pki, make_node):
    """A client that trickles a byte of its ClientHello every 0.4 s never lets one read time out;
    it must still be dropped once handshake_timeout (1 s) has passed since it connected."""
    node = make_node([("TELERAD", free_port())])
    tls_port = listener_tls(node, pki, handshake_timeout=1)
    start(node, tls_port)
    hello = b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03" + bytes(200)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", tls_port)) as trickler:
        try:
            for byte in hello:
                trickler.sendall(bytes([byte]))
                time.sleep(0.4)
                if time.monotonic() - started > 15:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
    assert time.monotonic() - started < 10, "the node kept a trickling handshake past its timeout"
    assert wait_for(lambda: any(r["reason"] == "TLS: handshake timed out" and not r["accepted"]
                                for r in audits(node, "association")), 10)


def test_handshakes_in_progress_are_capped(pki, make_node):
    """max(8, max_associations) handshakes at once: connections past that are closed at once and
    audited, instead of each holding a thread (a flood of silent connections)."""
    node = make_node([("TELERAD", free_port())])
    node.config.write_text(node.config.read_text().replace("[node]\n", "[node]\nworkers = 1\nmax_associations = 8\n", 1))
    tls_port = listener_tls(node, pki, handshake_timeout=30)
    start(node, tls_port)
    stallers = [socket.create_connection(("127.0.0.1", tls_port)) for _ in range(8)]
    try:
        for staller in stallers:
            staller.sendall(b"\x16")  # one byte: past the port-probe check, into the handshake
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", tls_port)) as ninth:
            ninth.sendall(b"\x16")
            assert_closed_by_node(ninth, 10)
        assert wait_for(lambda: any(r["reason"] == "TLS: too many handshakes in progress"
                                    for r in audits(node, "association")), 10)
    finally:
        for staller in stallers:
            staller.close()


def test_tls_1_1_client_is_refused(pki, make_node, make_storescp):
    remote = make_storescp().start()
    node = make_node([(remote.ae_title, remote.port)])
    tls_port = listener_tls(node, pki)
    start(node, tls_port)
    context = client_context(pki, pki.client)
    try:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.minimum_version = ssl.TLSVersion.TLSv1_1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ssl.SSLError, ValueError) as exc:
        pytest.skip(f"the local OpenSSL cannot make a TLS 1.1 client: {exc}")
    with socket.create_connection(("127.0.0.1", tls_port), timeout=20) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="127.0.0.1"):
                pytest.fail("a TLS 1.1 handshake succeeded")
        except ssl.SSLError as exc:
            if "NO_PROTOCOLS_AVAILABLE" in str(exc) or "NO_CIPHERS_AVAILABLE" in str(exc):
                pytest.skip(f"the local OpenSSL refuses to offer TLS 1.1: {exc}")
    assert wait_for(lambda: any(not r["accepted"] and "protocol" in r["reason"].lower()
                                for r in audits(node, "association")), 10), audits(node, "association")
    assert pynetdicom_echo(tls_port, client_context(pki, pki.client))


WORKER = """
import sys, time
from node import config, log, scp
from node.store import Store
log.configure("json", "info")
settings = config.load(sys.argv[1])
class Pipeline: store = Store(sys.argv[2])
scp.start(settings, Pipeline())
print("listening", flush=True)
time.sleep(120)
"""


def test_two_processes_share_the_plain_and_tls_ports(tmp_path, pki, make_node, make_storescp):
    """SO_REUSEPORT: two processes call scp.start with the same settings; both listen, both serve."""
    remote = make_storescp().start()
    node = make_node([(remote.ae_title, remote.port)])
    tls_port = listener_tls(node, pki)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(node.config), str(tmp_path / f"w{i}.sqlite")],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        for proc in procs:
            line = proc.stdout.readline()
            assert line.strip() == "listening", proc.stderr.read() if proc.poll() is not None else line
        for _ in range(6):
            assert tls_echo(tls_port, pki, pki.client).returncode == 0
            assert subprocess.run([dcmtk("echoscu"), "-aec", "TELENODE", "127.0.0.1", str(node.port)],
                                  env=PEER_ENV, timeout=30).returncode == 0
        served = [len([r for r in Store(tmp_path / f"w{i}.sqlite").audit_records("association") if r["accepted"]])
                  for i in range(2)]
        assert sum(served) == 12, served
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


# -- the destinations -----------------------------------------------------------------------------


def test_node_forwards_to_dcmtk_tls_storescp(tmp_path, pki, make_node, tls_storescp):
    """telenode → storescp +tls (which requires a client certificate): the instance arrives, one
    'forwarded' audit record names the destination, the pseudonymous UIDs and tls true."""
    remote = tls_storescp().start(pki.client)
    node = make_node([(remote.ae_title, remote.port)])
    destination_tls(node, pki)
    node.start()
    study = make_study(tmp_path / "study", instances=2, series=1)
    sent = storescu(node.port, study.files)
    assert sent.returncode == 0, sent.stderr
    assert wait_for(lambda: len(remote.files()) == 2), (len(remote.files()), status(node))
    arrived = {pydicom.dcmread(p).SOPInstanceUID for p in remote.files()}
    assert wait_for(lambda: sum(r["count"] for r in audits(node, "forwarded")) == 2), audits(node, "forwarded")
    forwarded = audits(node, "forwarded")
    assert all(r["tls"] and r["destination"] == "remote0" for r in forwarded)
    assert {uid for r in forwarded for uid in r["sop_instance_uids"]} == arrived


def test_destination_certificate_for_another_host_is_refused_until_server_name_names_it(
        tmp_path, pki, make_node, tls_storescp):
    """The remote's certificate names pacs.example.org, not 127.0.0.1: the instance stays pending
    (nothing counted against it) with a TLS last_error; with server_name = that name it is sent."""
    remote = tls_storescp(pki.other_host).start(pki.client)
    node = make_node([(remote.ae_title, remote.port)])
    base = node.config.read_text()
    destination_tls(node, pki)
    node.start()
    study = make_study(tmp_path / "study", instances=1, series=1)
    assert storescu(node.port, study.files).returncode == 0
    assert wait_for(lambda: (status(node)["remote0"]["last_error"] or "").startswith("TLS"), 30), status(node)
    row = status(node)["remote0"]
    assert row["pending"] + row["inflight"] == 1 and row["failed"] == 0, row
    assert "address mismatch" in row["last_error"], row  # host is 127.0.0.1: an IP address check
    assert remote.files() == []
    assert any("mismatch" in e.get("reason", "") for e in log_events(node, "tls_failed"))
    assert node.stop() == 0

    node.config.write_text(base)
    destination_tls(node, pki, server_name=OTHER_HOST)
    node.start()
    assert wait_for(lambda: len(remote.files()) == 1, 30), status(node)
    assert wait_for(lambda: status(node)["remote0"]["sent"] == 1)


def test_destination_signed_by_an_unknown_ca_is_refused(tmp_path, pki, make_node, tls_storescp):
    remote = tls_storescp().start(pki.client)
    node = make_node([(remote.ae_title, remote.port)])
    lines = ["", "[destinations.tls]", f'ca_certificates = "{pki.self_signed.cert}"',
             f'certificate = "{pki.client.cert}"', f'private_key = "{pki.client.key}"', ""]
    node.config.write_text(node.config.read_text() + "\n".join(lines))
    node.start()
    assert storescu(node.port, make_study(tmp_path / "study", instances=1).files).returncode == 0
    assert wait_for(lambda: "certificate verify failed" in (status(node)["remote0"]["last_error"] or ""), 30), \
        status(node)
    assert status(node)["remote0"]["failed"] == 0 and remote.files() == []


def test_a_destination_ca_replaces_the_system_store(tmp_path, monkeypatch):
    """With ca_certificates set, only that CA is trusted: a certificate from a CA in the system store
    (stood in for by SSL_CERT_FILE) must not verify, or any public CA could take the stream."""
    from node.config import TLS
    from node.tls import client_context as destination_context

    system_key, ours_key = _key(), _key()
    system_ca = _certificate("system store CA", system_key, None, ca=True)
    ours = _certificate("our CA", ours_key, None, ca=True)
    (tmp_path / "system.pem").write_bytes(system_ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ours.pem").write_bytes(ours.public_bytes(serialization.Encoding.PEM))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "system.pem"))
    trusted = destination_context(TLS(ca_certificates=tmp_path / "ours.pem")).get_ca_certs()
    assert [dict(name[0] for name in c["subject"])["commonName"] for c in trusted] == ["our CA"]
    default = destination_context(TLS()).get_ca_certs()  # no ca_certificates: the system store
    assert "system store CA" in [dict(name[0] for name in c["subject"])["commonName"] for c in default]
