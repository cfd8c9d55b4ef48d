"""scripts/bench.py reads where one sender's time goes from the node's own log lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench  # noqa: E402


def test_pace_splits_time_between_instances_into_pipeline_and_the_rest(tmp_path):
    log = tmp_path / "node.log"
    lines = [json.dumps({"event": "node_started", "timestamp": "2026-12-01T10:00:00.000Z"})]
    for index, (at, ms) in enumerate([(0.000, 11.0), (0.020, 12.0), (0.040, 13.0), (0.061, 12.5)]):
        lines.append(json.dumps({"event": "instance_stored", "ms": ms, "sop_instance_uid": f"2.25.{index}",
                                 "timestamp": f"2026-12-01T10:00:01.{int(at * 1000):03d}000Z"}))
    lines.append("not json: a traceback line")
    log.write_text("\n".join(lines) + "\n")
    inside, between = bench.pace(log)
    assert inside == 12.25  # median of the node's own `ms`
    assert round(between, 3) == 20.0  # median of 20, 20, 21 ms between stored instances


def test_pace_needs_a_few_instances(tmp_path):
    log = tmp_path / "node.log"
    log.write_text(json.dumps({"event": "instance_stored", "ms": 1.0, "timestamp": "2026-12-01T10:00:00Z"}) + "\n")
    assert bench.pace(log) is None


def test_sender_span_is_first_storescu_association_to_last_release(tmp_path):
    log = tmp_path / "node.log"
    events = [("association_accepted", "TELENODE_HC", "09.000"), ("association_released", "TELENODE_HC", "09.100"),
              ("association_accepted", "SENDER0", "10.000"), ("association_accepted", "SENDER1", "10.500"),
              ("instance_stored", None, "11.000"), ("association_released", "SENDER1", "14.250"),
              ("association_released", "SENDER0", "13.000"), ("association_released", "TELENODE_HC", "20.000")]
    lines = [json.dumps({"event": name, **({"calling_aet": aet} if aet else {}),
                         "timestamp": f"2026-12-01T10:00:{at}Z"}) for name, aet, at in events]
    log.write_text("\n".join(lines) + "\n")
    assert bench.sender_span(log) == 4.25  # SENDER0 accepted at 10.0, SENDER1 released at 14.25


def test_sender_span_needs_a_sender(tmp_path):
    log = tmp_path / "node.log"
    log.write_text(json.dumps({"event": "association_accepted", "calling_aet": "ECHOSCU",
                               "timestamp": "2026-12-01T10:00:00Z"}) + "\n")
    assert bench.sender_span(log) is None
