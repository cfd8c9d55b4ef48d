"""The status page: one server-rendered HTML document, no script, no external asset, reloads itself.

Shows destinations (state, queue, oldest age, last error), recent studies by pseudonym
with their delivery per destination, and the quarantine by kind and reason. Every value
is escaped; none identifies a patient (pseudonyms, counts, states, reasons).
"""

from __future__ import annotations

from datetime import datetime, timezone
from html import escape

from node.http.views import Snapshot

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;min-width:40em}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left}th{background:#f0f0f0}
td.n{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#777}
.active,.delivered{color:#176b2c}.paused,.pending{color:#8a6d00}.error,.failed{color:#b00020}
code{font-size:.9em}
"""


def _cell(value: object, css: str = "") -> str:
    attribute = f' class="{css}"' if css else ""
    return f"<td{attribute}>{escape(str(value))}</td>"


def _table(headers: list[str], rows: list[str], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _destinations(snapshot: Snapshot) -> str:
    rows = [f"<tr>{_cell(d.name)}{_cell(d.state, d.state)}{_cell(d.pending, 'n')}{_cell(d.sending, 'n')}"
            f"{_cell(d.sent, 'n')}{_cell(d.failed, 'n')}{_cell(_age(d.oldest_age_s), 'n')}{_cell(d.last_error)}</tr>"
            for d in snapshot.destinations]
    return _table(["destination", "state", "pending", "sending", "sent", "failed", "oldest", "last error"], rows,
                  "No destinations.")


def _studies(snapshot: Snapshot) -> str:
    rows = []
    for s in snapshot.studies:
        delivery = ", ".join(f"{name}: {state}" for name, state in s.delivery.items()) or "not queued"
        worst = next((c for c in ("failed", "pending") if c in s.delivery.values()), "delivered" if s.delivery else "")
        rows.append(f"<tr>{_cell(s.received)}{_cell(s.accession or '-')}<td><code>{escape(s.study_uid)}</code></td>"
                    f"{_cell(s.modalities or '-')}{_cell(s.instances, 'n')}{_cell(delivery, worst)}</tr>")
    return _table(["received (UTC)", "accession (pseudonym)", "study UID (pseudonym)", "modality", "instances",
                   "delivery"], rows, "No studies received yet.")


def _quarantine(snapshot: Snapshot) -> str:
    rows = [f"<tr>{_cell(q.kind)}{_cell(q.reason)}{_cell(q.count, 'n')}</tr>" for q in snapshot.quarantine]
    return _table(["kind", "reason", "instances"], rows, "Nothing in quarantine.")


def render(snapshot: Snapshot, *, ae_title: str, version: str, refresh: int) -> str:
    """The whole page."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta http-equiv=\"refresh\" content=\"{int(refresh)}\">"
        f"<title>telenode {escape(ae_title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>telenode {escape(ae_title)}</h1>"
        f"<p class=\"muted\">version {escape(version)} · {now} · refreshes every {int(refresh)} s</p>"
        f"<h2>Destinations</h2>{_destinations(snapshot)}"
        f"<h2>Recent studies</h2>{_studies(snapshot)}"
        f"<h2>Quarantine ({snapshot.quarantined})</h2>{_quarantine(snapshot)}"
        "</body></html>"
    )
