"""The embedded identity source: a mesh CA in a directory shared by the sidecars of a host.

Rules of this file: the CA is two files, `mesh-ca.pem` and `mesh-ca.key` (0600), in a
directory this user owns (0700 when we make it). Whoever looks first makes them, holding
an exclusive `flock` on `mesh-ca.lock`, so sidecars that start at once share ONE CA; every
reader holds the shared lock, so none sees a new certificate beside the old key. Each
file is written whole to a temp file and linked into place (never over an existing one),
so not even a reader that ignores the lock sees half a file. Leaves live in memory only.

Renewal: a leaf is replaced at a time drawn once, uniformly, between 60% and 90% of the
validity it was asked for (`cert_ttl`), or sooner when the CA files change on disk (an
operator or another process replaced them); a half-replaced pair is waited out.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from . import certs
from .base import Identity, IdentitySource, IdentityUnavailable, SpiffeId

DEFAULT_TRUST_DOMAIN = "micro-sidecar.local"
CA_CERT = "mesh-ca.pem"
CA_KEY = "mesh-ca.key"
CA_LOCK = "mesh-ca.lock"
RENEW_WINDOW = (0.6, 0.9)  # fractions of cert_ttl
LOCK_TIMEOUT = 10.0

# (inode, mtime_ns, size) of the certificate and the key; None for a missing file
Stamp = tuple[tuple[int, int, int] | None, tuple[int, int, int] | None]


@dataclass(frozen=True)
class _Ca:
    cert: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes
    pem: bytes
    stamp: Stamp


class LocalIdentitySource(IdentitySource):
    kind = "local"

    def __init__(
        self,
        ca_dir: Path,
        service: str,
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        cert_ttl: float = 86400.0,
        poll: float = 1.0,
    ) -> None:
        spiffe_id = SpiffeId(trust_domain, service)
        try:
            valid = SpiffeId.parse(spiffe_id.uri) == spiffe_id
        except ValueError:
            valid = False
        if not valid:
            raise ValueError(f"no SPIFFE ID for service {service!r} in trust domain {trust_domain!r}")
        if not cert_ttl > 0 or not poll > 0:
            raise ValueError(f"cert_ttl ({cert_ttl}) and poll ({poll}) must be positive")
        self.ca_dir = Path(ca_dir)
        self.spiffe_id = spiffe_id
        self.cert_ttl = float(cert_ttl)
        self._poll = poll
        self._issued = 0
        self._renew: tuple[str, float] | None = None  # (serial of our last leaf, epoch to renew it)
        self._ca_stamp: Stamp = (None, None)  # the CA files as last read

    @property
    def ca_path(self) -> Path:
        return self.ca_dir / CA_CERT

    @property
    def key_path(self) -> Path:
        return self.ca_dir / CA_KEY

    def __repr__(self) -> str:
        return f"<LocalIdentitySource {self.spiffe_id} ca={str(self.ca_path)!r} issued={self._issued}>"

    def describe(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "trust_domain": self.spiffe_id.trust_domain,
            "ca": str(self.ca_path),
            "cert_ttl": self.cert_ttl,
        }

    async def fetch(self, current: Identity | None) -> Identity:
        if current is not None:
            await self._wait_for_renewal(current)
        identity, issued_at, stamp = await asyncio.to_thread(self._issue)
        self._issued += 1
        self._ca_stamp = stamp
        self._renew = (identity.serial, issued_at + random.uniform(*RENEW_WINDOW) * self.cert_ttl)
        return identity

    def renewal_time(self, current: Identity) -> float:
        """When `current` is due (epoch seconds): the time drawn when we issued it, else
        60-90% of its own validity for a leaf we did not issue (a restart's, a test's)."""
        if self._renew is not None and self._renew[0] == current.serial:
            return self._renew[1]
        issued = current.not_before + certs.BACKDATE
        return issued + random.uniform(*RENEW_WINDOW) * max(0.0, current.not_after - issued)

    async def _wait_for_renewal(self, current: Identity) -> None:
        due = self.renewal_time(current)
        self._renew = (current.serial, due)  # a retried fetch(current) keeps the same time
        # Sleep in steps on the wall clock: certificates are wall-clock, and a host that
        # slept through the renewal time renews as soon as it wakes.
        while (left := due - time.time()) > 0:
            await asyncio.sleep(min(self._poll, left))
            if await asyncio.to_thread(self._ca_replaced, current.roots_pem):
                return

    def _ca_replaced(self, roots_pem: bytes) -> bool:
        """In a thread: whether the CA files now hold a CA other than `roots_pem`'s. A
        pair that cannot be read (half replaced, say) is not a replacement yet."""
        try:
            stamp = self._stamp()
            if stamp == self._ca_stamp:
                return False
            if stamp == (None, None):
                return True  # both gone: the next issue makes a new CA
            with self._locked(fcntl.LOCK_SH):
                ca = self._read_ca()
        except (OSError, IdentityUnavailable):
            return False
        if ca is None:
            return True
        if ca.pem == roots_pem:
            self._ca_stamp = ca.stamp  # touched or rewritten unchanged
            return False
        return True

    def _issue(self) -> tuple[Identity, float, Stamp]:
        """In a thread: (a new leaf from the CA on disk, the time it was issued, the CA's stamp)."""
        ca = self._load_ca()
        now = time.time()
        leaf, key = certs.make_leaf(ca.cert, ca.key, self.spiffe_id, ttl=self.cert_ttl, now=now)
        identity = certs.identity_from_pem(certs.cert_to_pem(leaf), certs.key_to_pem(key), ca.pem, self.kind)
        return identity, now, ca.stamp

    def _load_ca(self) -> _Ca:
        """The CA on disk, made first when there is none."""
        try:
            self._check_dir()
            with self._locked(fcntl.LOCK_SH):
                ca = self._read_ca()
            if ca is None:
                with self._locked(fcntl.LOCK_EX):
                    ca = self._read_ca()  # another process may have made it meanwhile
                    if ca is None:
                        self._create_ca()
                        ca = self._read_ca()
        except OSError as exc:
            raise IdentityUnavailable(f"local CA in {self.ca_dir}: {exc}") from exc
        if ca is None:
            raise IdentityUnavailable(f"local CA in {self.ca_dir}: the CA files vanished while being made")
        return ca

    def _check_dir(self) -> None:
        self.ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(self.ca_dir)
        if st.st_uid != os.getuid() or st.st_mode & stat.S_IWOTH:
            raise IdentityUnavailable(
                f"local CA directory {self.ca_dir} is owned by uid {st.st_uid} with mode "
                f"{stat.S_IMODE(st.st_mode):o}: it must be this user's (uid {os.getuid()}) and not "
                "writable by others, since the mesh CA key lives there"
            )

    @contextlib.contextmanager
    def _locked(self, how: int) -> Iterator[None]:
        fd = os.open(self.ca_dir / CA_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT
            while True:
                try:
                    fcntl.flock(fd, how | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise IdentityUnavailable(
                            f"local CA in {self.ca_dir}: {CA_LOCK} stayed locked for {LOCK_TIMEOUT:.0f} s"
                        ) from None
                    time.sleep(0.005)
            yield
        finally:
            os.close(fd)  # and with it the lock

    def _stamp(self) -> Stamp:
        return (_stat(self.ca_path), _stat(self.key_path))

    def _read_ca(self) -> _Ca | None:
        """The CA pair, checked; None when neither file exists. Call with a lock held."""
        stamp = self._stamp()
        if stamp == (None, None):
            return None
        if None in stamp:
            there, missing = (
                (self.ca_path, self.key_path) if stamp[1] is None else (self.key_path, self.ca_path)
            )
            raise IdentityUnavailable(
                f"local CA: {there} exists but {missing} does not; restore it, or remove both "
                "to have a new CA made (every sidecar then gets new certificates)"
            )
        mode = stat.S_IMODE(os.stat(self.key_path).st_mode)
        if mode & 0o077:
            raise IdentityUnavailable(f"local CA key {self.key_path} has mode {mode:o}; it must be 600")
        cert_pem = self.ca_path.read_bytes()
        key_pem = self.key_path.read_bytes()
        try:
            cert = certs.load_certs(cert_pem, "CA certificate")[0]
        except ValueError as exc:
            raise IdentityUnavailable(f"local CA certificate {self.ca_path}: {exc}") from None
        try:
            key = certs.load_key(key_pem)
        except ValueError as exc:
            raise IdentityUnavailable(f"local CA key {self.key_path}: {exc}") from None
        if not isinstance(key, certs.ISSUER_KEY_TYPES):
            raise IdentityUnavailable(f"local CA key {self.key_path}: this kind of key cannot sign")
        if not certs.key_matches(key, cert):
            raise IdentityUnavailable(f"local CA key {self.key_path} does not belong to {self.ca_path}")
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise IdentityUnavailable(f"local CA certificate {self.ca_path} is not a CA (no CA:TRUE)")
        expires = cert.not_valid_after_utc
        if expires.timestamp() <= time.time():
            raise IdentityUnavailable(
                f"local CA certificate {self.ca_path} expired at {expires:%Y-%m-%dT%H:%M:%SZ}; "
                "remove it and its key to have a new CA made"
            )
        return _Ca(cert=cert, key=key, pem=certs.cert_to_pem(cert), stamp=stamp)

    def _create_ca(self) -> None:
        """A new CA pair. Call with the exclusive lock held and neither file present."""
        cert, key = certs.make_ca(self.spiffe_id.trust_domain)
        # The key first: a crash in between leaves a key without a certificate, which
        # `_read_ca` reports, rather than a certificate whose key is lost.
        _write_new(self.key_path, certs.key_to_pem(key), 0o600)
        _write_new(self.ca_path, certs.cert_to_pem(cert), 0o644)
        dir_fd = os.open(self.ca_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """`data` as a new file at `path` with `mode`, all or nothing: written to a temp file
    beside it, then linked into place (FileExistsError if `path` appeared meanwhile)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # exactly `mode`, whatever the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    finally:
        os.unlink(tmp)
