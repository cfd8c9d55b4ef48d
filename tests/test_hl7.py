"""HL7 ORU^R01 reports on the return path, end to end over MLLP: a study goes out through a real
`telenode serve` to a DCMTK storescp; the reader's report about it comes back to [return.hl7] as an
ORU^R01 with the pseudonyms; a test MLLP listener playing the hospital RIS receives it with the originals.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from conftest import free_port, storescu, wait_for
from studies import PHI, make_study
from test_return import with_return

from node.hl7 import END, START, read_frame


class RIS:
    """A test MLLP listener as the hospital RIS: records every message, answers `respond(n)` (AA by default)."""

    def __init__(self, port: int | None = None, respond: Callable[[int], str] = lambda n: "AA") -> None:
        self.port = port or free_port()
        self.respond = respond
        self.messages: list[str] = []
        self.server: socketserver.ThreadingTCPServer | None = None

    def start(self) -> RIS:
        ris = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                buffer = bytearray()
                while (payload := read_frame(self.request, buffer)) is not None:
                    text = payload.decode("utf-8")
                    code = ris.respond(len(ris.messages))
                    ris.messages.append(text)
                    control = text.split("\r")[0].split("|")[9]
                    answer = f"MSH|^~\\&|RIS|HOSP|TELENODE|HOSP|20261201||ACK^R01|A{control}|P|2.5\rMSA|{code}|{control}\r"
                    self.request.sendall(START + answer.encode() + END)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def send(port: int, message: str) -> str:
    """One MLLP exchange: the message out, the ACK back."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(START + message.encode("utf-8") + END)
        answer = read_frame(sock, bytearray())
    assert answer is not None, "no ACK"
    return answer.decode("utf-8")


def msa(ack: str) -> list[str]:
    return next(s for s in ack.split("\r") if s.startswith("MSA")).split("|")


def fields(message: str, segment: str) -> list[str]:
    return next(s for s in message.split("\r") if s.startswith(segment + "|")).split("|")


def oru(control: str, patient: str, accession: str, study_uid: str, birth: str = "") -> str:
    return "\r".join([
        f"MSH|^~\\&|TELERAD|READER|TELENODE|HOSP|20261201101500||ORU^R01|{control}|P|2.5",
        f"PID|1||{patient}^^^TELERAD^MR||{patient}||{birth}|F",
        f"ORC|RE|{accession}|{accession}",
        f"OBR|1|{accession}|{accession}|CTCHEST^CT CHEST|||20261201",
        f"OBX|1|TX|REPORT^Report||Findings for {patient}: study {study_uid}, accession {accession}. No acute "
        "disease.||||||F",
    ]) + "\r"


@pytest.fixture
def hl7_node(tmp_path, make_node, make_storescp, request):
    """A node with [return.hl7] whose 1-image study reached the reader; returns (node, RIS, pseudonyms)."""

    def build(ris_up: bool = True, respond: Callable[[int], str] = lambda n: "AA"):
        reader = make_storescp(name="reader").start()
        ris = RIS(respond=respond)
        hl7_port = free_port()
        node = make_node([("TELERAD", reader.port)])
        with_return(node, free_port(), "\n".join([
            "[return.hl7]", f"port = {hl7_port}", 'forward_host = "127.0.0.1"', f"forward_port = {ris.port}",
            "retry_delay = 0.3", "max_retry_delay = 1.0", "max_failures = 3", ""]))
        node.hl7_port = hl7_port
        node.start()
        if ris_up:
            ris.start()
        request.addfinalizer(ris.stop)
        study = make_study(tmp_path / "study", instances=1, series=1)
        assert storescu(node.port, study.files).returncode == 0
        assert wait_for(lambda: len(reader.files()) == 1, 60)
        arrived = pydicom.dcmread(reader.files()[0])
        return node, ris, study, arrived

    return build


def test_oru_round_trip_reaches_the_ris_with_the_originals(hl7_node):
    node, ris, study, arrived = hl7_node()
    pid, acc, uid = str(arrived.PatientID), str(arrived.AccessionNumber), str(arrived.StudyInstanceUID)
    ack = send(node.hl7_port, oru("MSG0001", pid, acc, uid))
    assert msa(ack)[1:3] == ["AA", "MSG0001"]
    assert wait_for(lambda: len(ris.messages) == 1, 30), "the RIS got nothing"

    message = ris.messages[0]
    assert fields(message, "MSH")[9] == "MSG0001"  # MSH as the reader sent it
    pid_fields = fields(message, "PID")
    assert pid_fields[3] == f"{PHI['PatientID']}^^^{PHI['IssuerOfPatientID']}^MR"  # issuer as assigning authority
    assert pid_fields[5] == PHI["PatientName"]
    assert pid_fields[7] == PHI["PatientBirthDate"]  # empty in the message: from the mapping
    assert fields(message, "ORC")[2:4] == [PHI["AccessionNumber"]] * 2
    assert fields(message, "OBR")[2:4] == [PHI["AccessionNumber"]] * 2
    report = fields(message, "OBX")[5]
    assert PHI["PatientID"] in report and study.study_uid in report and PHI["AccessionNumber"] in report
    assert pid not in message and acc not in message and uid not in message

    audit = [json.loads(line)["detail"] for line in
             node.cli("audit", "show", "--event", "hl7_reidentified", check=True).stdout.splitlines()]
    assert [a["control_id"] for a in audit] == ["MSG0001"]
    assert {m["pseudonym"] for m in audit[0]["mappings"]} >= {pid, acc, uid}
    trail = node.cli("audit", "show", check=True).stdout + node.log.read_text()
    assert PHI["PatientID"] not in trail and PHI["AccessionNumber"] not in trail and "SMITHERSON" not in trail
    status = json.loads(node.cli("status", "--json", check=True).stdout)
    assert status["destinations"]["return.hl7"]["sent"] == 1
    assert node.stop() == 0


def test_unknown_pseudonyms_get_AE_and_other_messages_AR(hl7_node):
    node, ris, _, arrived = hl7_node()
    unknown = send(node.hl7_port, oru("MSG0002", "NOT-OURS", "ACC0", "1.2.3.4"))
    assert msa(unknown)[1:3] == ["AE", "MSG0002"] and "pseudonym" in msa(unknown)[3]
    adt = oru("MSG0003", str(arrived.PatientID), "X", "1.2").replace("ORU^R01", "ADT^A08")
    assert msa(send(node.hl7_port, adt))[1] == "AR"
    assert msa(send(node.hl7_port, "not hl7 at all"))[1] == "AR"
    wait_for(lambda: ris.messages, 2)
    assert ris.messages == []  # nothing refused is ever forwarded
    refused = [json.loads(line)["detail"] for line in
               node.cli("audit", "show", "--event", "hl7_refused", check=True).stdout.splitlines()]
    assert [r["ack"] for r in refused] == ["AE", "AR", "AR"]


def test_ris_down_then_up_and_a_negative_ack_are_retried_until_delivered_once(hl7_node):
    node, ris, _, arrived = hl7_node(ris_up=False, respond=lambda n: "AE" if n == 0 else "AA")
    pid, acc, uid = str(arrived.PatientID), str(arrived.AccessionNumber), str(arrived.StudyInstanceUID)
    assert msa(send(node.hl7_port, oru("MSG0004", pid, acc, uid)))[1] == "AA"  # durable while the RIS is down
    status = json.loads(node.cli("status", "--json", check=True).stdout)
    assert status["destinations"]["return.hl7"]["pending"] + status["destinations"]["return.hl7"]["inflight"] == 1
    ris.start()
    assert wait_for(lambda: len(ris.messages) == 2, 30), "not retried after the RIS answered AE"
    wait_for(lambda: len(ris.messages) > 2, 2)
    assert len(ris.messages) == 2 and ris.messages[0] == ris.messages[1]
    assert node.stop() == 0


def test_an_acknowledged_report_survives_a_kill(hl7_node, tmp_path: Path):
    node, ris, _, arrived = hl7_node(ris_up=False)
    pid, acc, uid = str(arrived.PatientID), str(arrived.AccessionNumber), str(arrived.StudyInstanceUID)
    assert msa(send(node.hl7_port, oru("MSG0005", pid, acc, uid)))[1] == "AA"
    node.kill()
    ris.start()
    node.start()
    assert wait_for(lambda: len(ris.messages) == 1, 30)
    assert fields(ris.messages[0], "PID")[3].startswith(PHI["PatientID"])
    assert node.stop() == 0
