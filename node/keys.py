"""Key files: private (0600) creation and checks, and the mapping keyring that encrypts originals.

The mapping keyring is a text file of hex AES keys, one a line; the first
encrypts new values, every key listed decrypts. A key's id is the first
4 bytes of SHA-256 over a label and the key, so the file needs no other
bookkeeping and a value's ciphertext names the key it needs. Each value is
sealed with AES-256-GCM (NIST SP 800-38D) under a fresh 96-bit random nonce,
with associated data binding it to its table, column and row, so a
ciphertext copied into another row or column fails authentication.

The ring is reloaded when its file changes (a `telenode keys rotate` in
another process), so every process sharing the store follows a rotation
without a restart. The file is replaced atomically (write, fsync, rename,
fsync folder): a crash leaves either the old ring or the new one, never half.
Key material is never logged, printed or quoted in an exception.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import stat
from pathlib import Path
from typing import Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = 1  # first byte of every ciphertext: the format below
HEADER = 5  # version (1) + key id (4)
NONCE = 12
HEADER_TEXT = (
    "# telenode mapping keyring: encrypts the original values in the mapping store.\n"
    "# The first key encrypts, every key listed decrypts. Change it only with `telenode keys rotate`.\n"
    "# Losing this file loses re-identification (pseudonyms come from the pseudonym key, not from here).\n"
)


class KeyFileError(ValueError):
    """A key file exists but cannot be used; the message never quotes its content."""


class MappingKeyError(Exception):
    """A stored original cannot be decrypted: unknown key id, or it fails authentication."""


def check_private(path: str | os.PathLike[str]) -> None:
    """Refuse a key file that group or others can read or write (it must be 0600 or stricter)."""
    path = Path(path)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise KeyFileError(f"{path} is readable or writable by group or others (mode {mode:04o}): "
                           f"run chmod 600 {path}")


def write_private(path: Path, text: str, *, exclusive: bool = False) -> bool:
    """Write `text` to `path` (0600 from the first byte) atomically and durably.

    `exclusive`: only if `path` does not exist yet (returns False if another process was first).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            try:
                os.link(tmp, path)  # atomic and fails if the file exists: no reader sees it half written
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return True


def key_id(key: bytes) -> int:
    """The 32-bit id that tags every ciphertext made with `key` (reveals nothing usable about it)."""
    return int.from_bytes(hashlib.sha256(b"telenode mapping key id\x00" + key).digest()[:4], "big")


def new_key() -> bytes:
    return secrets.token_bytes(32)


def parse_ring(text: str) -> list[bytes]:
    """Keys of a ring file, first (encrypting) key first; a bare hex key file is a ring of one."""
    keys = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = bytes.fromhex(line)
        except ValueError:
            raise KeyFileError("not a keyring of hex-encoded keys") from None
        if len(key) not in (16, 24, 32):
            raise KeyFileError("a keyring key is not 128, 192 or 256 bits")
        keys.append(key)
    if not keys:
        raise KeyFileError("keyring holds no key")
    return keys


def format_ring(keys: list[bytes]) -> str:
    return HEADER_TEXT + "".join(key.hex() + "\n" for key in keys)


def value_context(table: str, column: str, row: str) -> bytes:
    """AES-GCM associated data of a stored original: it belongs to this table, column and row, nowhere else."""
    return f"telenode-mapping\x00{table}\x00{column}\x00{row}".encode("utf-8")


class Keyring:
    """The mapping keys of one store: encrypt with the first, decrypt with any; follows the file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.created = False  # True when this process made the ring (a new store, or a lost key)
        if not self.path.exists():
            self.created = write_private(self.path, format_ring([new_key()]), exclusive=True)
        if self.path.is_dir():
            raise KeyFileError("is a directory, not a key file")
        check_private(self.path)
        self._signature: tuple[int, int, int] | None = None
        self._keys: list[bytes] = []
        self._ciphers: dict[int, AESGCM] = {}
        self.reload()

    def __repr__(self) -> str:  # never show a key
        return f"Keyring({str(self.path)!r}, ids={[f'{i:08x}' for i in self.ids]})"

    @property
    def ids(self) -> list[int]:
        return [key_id(k) for k in self._keys]

    @property
    def active_id(self) -> int:
        return key_id(self._keys[0])

    def _stat(self) -> tuple[int, int, int]:
        info = os.stat(self.path)
        return info.st_ino, info.st_mtime_ns, info.st_size

    def reload(self) -> None:
        """Read the ring file again (a missing or unreadable file keeps the ring in memory)."""
        signature = self._stat()
        keys = parse_ring(self.path.read_text(encoding="ascii", errors="replace"))
        self._keys, self._signature = keys, signature
        self._ciphers = {key_id(k): AESGCM(k) for k in keys}

    def refresh(self, *, strict: bool = False) -> None:
        """Reload if the file changed since it was read (one stat; called inside each write transaction).

        `strict` (writers): an unreadable ring raises OSError rather than encrypting with a key that a
        rotation may have retired meanwhile; readers keep the keys they know."""
        try:
            if self._stat() != self._signature:
                self.reload()
        except (OSError, KeyFileError) as exc:
            if strict:
                raise OSError(errno.EIO, f"mapping keyring {self.path} unreadable") from exc

    def encrypt(self, value: str, context: bytes) -> bytes:
        """version | key id | nonce | AES-GCM(value) with associated data = context + header."""
        kid = self.active_id
        header = bytes([VERSION]) + kid.to_bytes(4, "big")
        nonce = os.urandom(NONCE)
        return header + nonce + self._ciphers[kid].encrypt(nonce, value.encode("utf-8"), context + header)

    def decrypt(self, blob: bytes, context: bytes) -> str:
        if len(blob) < HEADER + NONCE + 16 or blob[0] != VERSION:
            raise MappingKeyError("not a telenode ciphertext")
        kid = int.from_bytes(blob[1:HEADER], "big")
        if kid not in self._ciphers:
            self.refresh()  # rotated by another process since this one read the ring
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise MappingKeyError(f"mapping key {kid:08x} is not in the keyring {self.path}")
        try:
            plain = cipher.decrypt(blob[HEADER:HEADER + NONCE], blob[HEADER + NONCE:], context + blob[:HEADER])
        except InvalidTag:
            raise MappingKeyError("stored value fails authentication (altered, or moved from another row)") from None
        return plain.decode("utf-8")

    def seal(self, table: str, column: str, row: str, value: str | None) -> bytes | None:
        """An original as the mapping store keeps it: encrypted and bound to its cell, or NULL when empty."""
        if value is None or value == "":
            return None
        return self.encrypt(value, value_context(table, column, row))

    def unseal(self, table: str, column: str, row: str, stored: bytes | memoryview | str | None) -> str:
        """The original of a stored cell ("" for NULL); MappingKeyError if it is not authentic there."""
        if stored is None:
            return ""
        if isinstance(stored, str):  # plaintext of a database never migrated: tolerated, never produced
            return stored
        return self.decrypt(bytes(stored), value_context(table, column, row))

    def add_key(self) -> int:
        """Put a new key first in the ring file (it encrypts from now on); returns its id."""
        self.reload()
        key = new_key()
        write_private(self.path, format_ring([key, *self._keys]))
        self.reload()
        return key_id(key)

    def retire(self, keep: set[int]) -> list[int]:
        """Drop every key but the first and those in `keep`; returns the ids dropped."""
        self.reload()
        kept = [k for i, k in enumerate(self._keys) if i == 0 or key_id(k) in keep]
        dropped = [key_id(k) for k in self._keys if k not in kept]
        if dropped:
            write_private(self.path, format_ring(kept))
            self.reload()
        return dropped


@contextlib.contextmanager
def rotation_lock(ring_path: Path) -> Iterator[None]:
    """One rotation at a time per keyring (an advisory lock on a file beside it)."""
    lock = ring_path.with_name(ring_path.name + ".lock")
    fd = os.open(lock, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KeyFileError(f"another `telenode keys rotate` holds {lock}") from None
        yield
    finally:
        os.close(fd)
