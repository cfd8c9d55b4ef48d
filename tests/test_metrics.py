"""Prometheus metrics: counted in every worker process, added up by the supervisor's /metrics."""

from __future__ import annotations

import httpx
import pytest

from conftest import storescu, wait_for
from http_node import make_http_node  # noqa: F401 (a fixture)
from node import metrics
from studies import make_study

pytestmark = pytest.mark.dcmtk


def series(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


@pytest.mark.parametrize("mode", ["workers = 2", 'ack = "received"'])
def test_c_store_in_worker_processes_is_counted_by_the_gateway(make_http_node, make_storescp, tmp_path, mode):
    """Two SCP workers, or (ack = "received") a worker and the settler: the counts come from other processes."""
    remote = make_storescp().start()
    node = make_http_node([(remote.ae_title, remote.port)])
    with open(node.config, "r+") as handle:
        text = handle.read().replace('port = ', f'{mode}\nport = ', 1)
        handle.seek(0)
        handle.write(text)
    node.start()
    study = make_study(tmp_path / "s", instances=4, series=1)
    for path in study.files:  # one association each: the kernel spreads them over the workers
        assert storescu(node.port, [path]).returncode == 0
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x40\x00" + b"1" * 20)
    storescu(node.port, [broken])
    assert wait_for(lambda: len(remote.files()) == 4, 30)

    def scraped() -> dict[str, float]:
        return series(httpx.get(f"{node.url}/metrics", timeout=10).text)

    assert wait_for(lambda: scraped().get('telenode_instances_forwarded_total{destination="remote0"}') == 4, 30)
    values = scraped()
    assert values['telenode_instances_stored_total{source="scp"}'] == 4
    assert values['telenode_instances_received_total{source="scp"}'] >= 4
    assert values['telenode_processing_seconds_count{source="scp"}'] == 4
    assert values['telenode_queue_depth{destination="remote0"}'] == 0
    assert values["telenode_received_waiting"] == 0
    assert values['telenode_instances_failed_total{destination="remote0"}'] == 0
    assert len(list((node.folder / "var" / "metrics").glob("counter_*.db"))) >= 2, "one file per process"
    for name in values:  # labels carry sources and destination names only
        assert "SMITHERSON" not in name and "MRN" not in name


def test_queue_gauges_come_from_the_store_at_scrape_time():
    status = {"remote0": {"pending": 3, "inflight": 2, "oldest_pending_age_s": 41.5}}
    collector = metrics.QueueCollector(lambda: status, ("remote0", "idle"), lambda: 7)
    text = metrics.exposition(collector).decode()
    values = series(text)
    assert values["telenode_received_waiting"] == 7
    assert values['telenode_queue_depth{destination="remote0"}'] == 5
    assert values['telenode_queue_oldest_age_seconds{destination="remote0"}'] == 41.5
    assert values['telenode_queue_depth{destination="idle"}'] == 0
    status["remote0"]["pending"] = 0
    assert series(metrics.exposition(collector).decode())['telenode_queue_depth{destination="remote0"}'] == 2
