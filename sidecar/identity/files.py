"""The identity in PEM files that something else writes and rotates (SPIRE's
spiffe-helper, cert-manager's csi-driver-spiffe, Vault agent).

Rules of this file: the files are read, never written. A change is noticed by polling
stat (inode, mtime_ns, size of each file; stat follows symlinks, so a Kubernetes volume's
`..data` swap counts). A changed set is used only once it is consistent again: the key
belongs to the certificate and the chain is signed by one of the roots. A rotation caught
half-written (new certificate, old key; a leaf from a root the bundle does not hold yet)
is waited out and read again on the next poll, never handed on.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from . import certs
from .base import Identity, IdentitySource, IdentityUnavailable

log = logging.getLogger(__name__)

# (inode, mtime_ns, size) of the certificate, the key and the CA file
Stamp = tuple[tuple[int, int, int], ...]


class FilesIdentitySource(IdentitySource):
    kind = "files"

    def __init__(self, cert: Path, key: Path, ca: Path, *, poll: float = 1.0) -> None:
        if not poll > 0:
            raise ValueError(f"poll ({poll}) must be positive")
        self.cert = Path(cert)
        self.key = Path(key)
        self.ca = Path(ca)
        self._poll = poll
        self._stamp: Stamp | None = None  # the files as last read
        self.reads = 0
        self.waiting: str | None = None  # why the changed files are not used yet

    def __repr__(self) -> str:
        state = f" waiting={self.waiting!r}" if self.waiting else ""
        return f"<FilesIdentitySource cert={str(self.cert)!r} reads={self.reads}{state}>"

    def describe(self) -> dict[str, object]:
        summary: dict[str, object] = {
            "kind": self.kind,
            "cert": str(self.cert),
            "key": str(self.key),
            "ca": str(self.ca),
        }
        if self.waiting:
            summary["waiting"] = self.waiting
        return summary

    async def fetch(self, current: Identity | None) -> Identity:
        if current is None:
            identity, self._stamp = await asyncio.to_thread(self._read)
            return identity
        while True:
            await asyncio.sleep(self._poll)
            found = await asyncio.to_thread(self._changed, current)
            if found is not None:
                return found

    def _changed(self, current: Identity) -> Identity | None:
        """In a thread: the files' identity if they changed since last read, are consistent
        and hold something other than `current`; else None (look again next poll)."""
        try:
            if self._stat_all() == self._stamp:
                return None
            identity, stamp = self._read()
        except IdentityUnavailable as exc:
            if str(exc) != self.waiting:
                log.warning("%s; keeping serial %s until the files are consistent", exc, current.serial)
            self.waiting = str(exc)
            return None
        self.waiting = None
        self._stamp = stamp
        if identity.chain_pem == current.chain_pem and identity.roots_pem == current.roots_pem:
            return None  # touched, or rewritten with the same content
        return identity

    def _stat_all(self) -> Stamp:
        stamp = []
        for what, path in (("certificate", self.cert), ("key", self.key), ("CA", self.ca)):
            try:
                st = os.stat(path)
            except OSError as exc:
                raise IdentityUnavailable(f"TLS {what} {path}: {exc.strerror}") from None
            stamp.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamp)

    def _read(self) -> tuple[Identity, Stamp]:
        """In a thread: the identity in the files, checked, and their stamp from before
        reading (a write during the read shows as a change on the next poll)."""
        stamp = self._stat_all()
        chain_pem = _read(self.cert, "certificate")
        key_pem = _read(self.key, "key")
        roots_pem = _read(self.ca, "CA")
        try:
            chain = certs.load_certs(chain_pem, "certificate")
            spiffe_id = certs.spiffe_id_of(chain[0])
        except ValueError as exc:
            raise IdentityUnavailable(f"TLS certificate {self.cert}: {exc}") from None
        try:
            key = certs.load_key(key_pem)
        except ValueError as exc:
            raise IdentityUnavailable(f"TLS key {self.key}: {exc}") from None
        if not certs.key_matches(key, chain[0]):
            raise IdentityUnavailable(
                f"TLS key {self.key} does not belong to certificate {self.cert} ({spiffe_id})"
            )
        try:
            certs.load_certs(roots_pem, "root certificate")
        except ValueError as exc:
            raise IdentityUnavailable(f"TLS CA {self.ca}: {exc}") from None
        try:
            certs.check_chain(chain_pem, roots_pem)
        except ValueError as exc:
            raise IdentityUnavailable(f"TLS certificate {self.cert} against CA {self.ca}: {exc}") from None
        try:
            identity = certs.identity_from_pem(chain_pem, key_pem, roots_pem, self.kind)
        except ValueError as exc:  # checked above; kept for a case the checks miss
            raise IdentityUnavailable(f"TLS files {self.cert}, {self.key}, {self.ca}: {exc}") from None
        self.reads += 1
        return identity, stamp


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise IdentityUnavailable(f"TLS {what} {path}: {exc.strerror}") from None
