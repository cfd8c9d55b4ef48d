"""Keyed, deterministic pseudonyms: UIDs, patient IDs and names, accession numbers, date offsets.

Every pseudonym is HMAC-SHA256 of the original under the node's secret key,
with a purpose label so that equal strings in different roles never collide.
The same original gives the same pseudonym on every upload, after a restart
and on any node that shares the key; without the key nothing can be reversed
by trying every medical record number. The key is never logged or echoed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from functools import lru_cache
from pathlib import Path

from node.keys import KeyFileError, check_private, write_private

KEY_BYTES = 32

#: Date shift range for the Modified Dates option: 1 to 3650 days into the past.
MAX_OFFSET_DAYS = 3650


__all__ = ["KeyFileError", "Pseudonymizer", "load_or_create_key", "patient_key"]


def load_or_create_key(path: str | os.PathLike[str]) -> bytes:
    """Read the hex key at `path`, or create one (mode 0600) if the file does not exist.

    A key file that group or others can read or write is refused (KeyFileError naming `chmod 600`).
    Creation is atomic: a process starting at the same time reads the whole key or creates its own
    first, never half a file.
    """
    path = Path(path)
    if not path.exists():
        write_private(path, secrets.token_hex(KEY_BYTES) + "\n", exclusive=True)  # False: another process won
    if path.is_dir():
        raise KeyFileError("is a directory, not a key file")
    check_private(path)
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise KeyFileError("not a hex-encoded key") from None
    if len(key) < 16:
        raise KeyFileError("key shorter than 128 bits")
    return key


class Pseudonymizer:
    """Deterministic replacements under one secret key; cheap to call (results cached)."""

    def __init__(self, key: bytes, organization: str) -> None:
        if len(key) < 16:
            raise ValueError("key shorter than 128 bits")
        self._key = key
        self.organization = organization
        self._digest = lru_cache(maxsize=65536)(self._hmac)

    def __repr__(self) -> str:  # never show the key
        return f"Pseudonymizer(organization={self.organization!r})"

    def _hmac(self, purpose: str, value: str) -> bytes:
        return hmac.new(self._key, f"{purpose}\x00{value}".encode("utf-8"), hashlib.sha256).digest()

    def _token(self, purpose: str, value: str, length: int) -> str:
        return base64.b32encode(self._digest(purpose, value)).decode("ascii")[:length]

    def uid(self, original: str) -> str:
        """`2.25.` + the first 128 bits of the HMAC as a decimal integer (PS3.5 B.2)."""
        return "2.25." + str(int.from_bytes(self._digest("uid", original)[:16], "big"))

    def patient_id(self, patient_key: str) -> str:
        """`{organization}-{token}` for one original patient (see `patient_key`)."""
        return f"{self.organization}-{self._token('patient', patient_key, 12)}"

    def patient_name(self, patient_key: str) -> str:
        """The patient's pseudonymous name: the same token as the ID, valid as PN."""
        return self.patient_id(patient_key)

    def accession(self, original: str) -> str:
        """A 16-character token for an original accession number (SH allows 16)."""
        return self._token("accession", original, 16)

    def date_offset_days(self, patient_key: str) -> int:
        """A per-patient shift, 1 to 3650 days back, for the Modified Dates option."""
        value = int.from_bytes(self._digest("date-offset", patient_key)[:8], "big")
        return -(1 + value % MAX_OFFSET_DAYS)


def patient_key(patient_id: str, issuer: str, name: str, birth_date: str, study_uid: str) -> str:
    """What identifies one original patient: issuer + ID, else name + birth date, else the study."""
    if patient_id.strip():
        return f"id\x00{issuer.strip()}\x00{patient_id.strip()}"
    if name.strip():
        return f"name\x00{name.strip().upper()}\x00{birth_date.strip()}"
    return f"study\x00{study_uid.strip()}"
