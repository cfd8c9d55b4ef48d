"""Privileged acts: who may re-identify or read a held original, and what the audit trail records.

Re-identification and reading quarantined originals reveal PHI. Each request
names an operator (flag, `$TELENODE_OPERATOR`, else the OS user) and a reason
(flag or `$TELENODE_REASON`). With `[security] operators` set, the operator must
be named and listed and a reason given; a refusal is audited before it is
answered. Otherwise the act is allowed and its record says where the operator
came from and whether a reason was given. The act's own audit record is
committed before any original is printed (the callers do that in this order).
"""

from __future__ import annotations

import getpass
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Sequence

from node.store import Store


class Refused(Exception):
    """The request does not meet `[security] operators`; the message says what is missing (no PHI)."""


@dataclass(frozen=True)
class Request:
    """Who asks and why, as given (None: not given)."""

    operator: str | None = None  # --operator
    reason: str | None = None  # --reason

    @classmethod
    def from_environment(cls, operator: str | None, reason: str | None) -> Request:
        """Flags first, then $TELENODE_OPERATOR / $TELENODE_REASON."""
        return cls(operator, reason or os.environ.get("TELENODE_REASON") or None)

    def who(self) -> dict[str, Any]:
        """The audit facts: operator, where it came from, the OS user, the reason."""
        given = self.operator or os.environ.get("TELENODE_OPERATOR")
        source = "flag" if self.operator else "env" if given else "os_user"
        return {"operator": given or os_user(), "operator_source": source, "os_user": os_user(),
                "reason": self.reason, "reason_given": self.reason is not None}


def os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return f"uid {os.getuid()}"


def operator_name(operator: str | None) -> str:
    """The operator of a non-privileged act (pause, rotate, backup): flag, environment or OS user."""
    return operator or os.environ.get("TELENODE_OPERATOR") or os_user()


def refusal(operators: Sequence[str], who: dict[str, Any]) -> str:
    """Why `who` may not act under `[security] operators` ("" when allowed)."""
    if not operators:
        return ""
    if who["operator_source"] == "os_user":
        return "an operator must be named (--operator or TELENODE_OPERATOR)"
    if who["operator"] not in operators:
        return f"operator {who['operator']!r} is not in [security] operators"
    if who["reason"] is None:
        return "a reason is required (--reason or TELENODE_REASON)"
    return ""


def authorize(store: Store, operators: Sequence[str], event: str, request: Request, **facts: Any) -> dict[str, Any]:
    """The audit facts of an allowed request; a refused one is audited (`{event}_refused`), then Refused."""
    who = request.who()
    why = refusal(operators, who)
    if why:
        store.audit(f"{event}_refused", **who, **facts, refused=why)
        raise Refused(f"{event} refused: {why}")
    return who


def asked(organization: str, value: str, found: bool | None) -> dict[str, str]:
    """What the audit records of a re-identification request: the value when it is (or, before the
    lookup, looks like) one of our pseudonyms; otherwise — an original typed by mistake is PHI —
    only a digest, enough to correlate repeated attempts."""
    ours = value.startswith((f"{organization}-", "2.25.")) if found is None else found
    if ours:
        return {"pseudonym": value}
    return {"value_sha256": hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:16]}


def reidentify(store: Store, operators: Sequence[str], organization: str, request: Request,
               value: str) -> dict[str, Any] | None:
    """The originals behind `value` (None if unknown), audited and committed before they are returned.
    Raises Refused, or MappingKeyError when the originals cannot be decrypted."""
    who = authorize(store, operators, "reidentify", request, **asked(organization, value, None))
    found = store.lookup(value)  # MappingKeyError: nothing decrypted, nothing to audit as answered
    store.audit("reidentify", **who, **asked(organization, value, found is not None), found=found is not None)
    return found
