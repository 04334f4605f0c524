"""Certificates for the TLS rows, and the new-connection measurement (openssl s_time).

Every certificate here comes from sidecar.identity.certs, as the sidecars' own do: one
P-256 leaf whose identity is a SPIFFE URI SAN, signed by a CA whose files are PEM pairs
(`<name>.pem`, `<name>.key`, the key 0600). The nginx rows get a CA of their own
(`make_ca`); the sidecars make theirs beside their registry file (`mesh-ca.pem`), and a
client of the handshake measurement gets its leaf from whichever CA the server trusts.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from harness import SMALL_BODY, Harness, children_cpu_seconds, cpu_seconds, machine_busy_seconds

from sidecar.identity.base import SpiffeId
from sidecar.identity.certs import (
    ISSUER_KEY_TYPES,
    cert_to_pem,
    key_to_pem,
    load_certs,
    load_key,
    make_ca,
    make_leaf,
)

if TYPE_CHECKING:
    from stack import TlsServer

LEAF_TTL = 86400.0  # longer than any run: no certificate expires during one


def write_pair(stem: Path, cert: x509.Certificate, key: Any) -> tuple[Path, Path]:
    """`<stem>.pem` and `<stem>.key` (0600)."""
    cert_path, key_path = stem.with_suffix(".pem"), stem.with_suffix(".key")
    cert_path.write_bytes(cert_to_pem(cert))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_to_pem(key))
    return cert_path, key_path


def make_bench_ca(directory: Path, trust_domain: str) -> Path:
    """A new CA in `directory` (ca.pem, ca.key); the path of its certificate."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert, key = make_ca(trust_domain)
    return write_pair(directory / "ca", cert, key)[0]


def mint_leaf(ca_cert: Path, service: str, stem: Path, dns_name: str | None = None) -> tuple[Path, Path]:
    """A leaf for `service` in the CA's trust domain, signed by the CA at `ca_cert` (its key
    beside it, `.key`), written to `<stem>.pem` and `<stem>.key`.

    `dns_name` adds a DNS SAN: nginx's `proxy_ssl_verify` checks the upstream's certificate
    against a host name and knows nothing of SPIFFE URIs, which is what the sidecar pins."""
    ca = load_certs(ca_cert.read_bytes(), "CA certificate")[0]
    ca_key = load_key(ca_cert.with_suffix(".key").read_bytes())
    if not isinstance(ca_key, ISSUER_KEY_TYPES):
        raise ValueError(f"{ca_cert.with_suffix('.key')}: this kind of key cannot sign")
    cert, key = make_leaf(ca, ca_key, SpiffeId(trust_domain_of(ca), service), ttl=LEAF_TTL)
    if dns_name:
        cert = _with_dns_name(cert, ca_key, dns_name)
    return write_pair(stem, cert, key)


def trust_domain_of(ca: x509.Certificate) -> str:
    """The trust domain in a mesh CA's URI SAN (`spiffe://<trust domain>`)."""
    san = ca.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://"):
            return uri.removeprefix("spiffe://").strip("/")
    raise ValueError("the CA certificate has no spiffe:// URI SAN")


def _with_dns_name(
    cert: x509.Certificate, ca_key: CertificateIssuerPrivateKeyTypes, dns: str
) -> x509.Certificate:
    """`cert` as make_leaf made it, the DNS name added to its SAN, signed again by the CA."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for ext in cert.extensions:
        value = ext.value
        if isinstance(value, x509.SubjectAlternativeName):
            value = x509.SubjectAlternativeName([*value, x509.DNSName(dns)])
        builder = builder.add_extension(value, critical=ext.critical)
    return builder.sign(ca_key, hashes.SHA256())


# --- new connections per second ----------------------------------------------------------

# s_time's summary: "714 connections in 0.76s; 939.47 connections/user sec, ..." where the
# seconds are its own user CPU time, not the wall: the caller times the run itself.
_S_TIME_RE = re.compile(r"^(\d+) connections in [\d.]+s;", re.MULTILINE)


def parse_s_time(text: str) -> int | None:
    """The number of connections s_time completed, or None when it printed no summary."""
    found = _S_TIME_RE.search(text)
    return int(found.group(1)) if found else None


def s_time_argv(port: int, cert: Path, key: Path, ca: Path, seconds: int, path: str) -> list[str]:
    """openssl s_time: for `seconds`, a new connection each time (no session resumption), a
    full handshake with the client certificate, `GET <path> HTTP/1.0`, read to the close."""
    return [
        "openssl",
        "s_time",
        "-connect",
        f"127.0.0.1:{port}",
        "-new",
        "-cert",
        str(cert),
        "-key",
        str(key),
        "-CAfile",
        str(ca),
        "-time",
        str(seconds),
        "-www",
        path,
    ]


def probe(port: int, cert: Path, key: Path, ca: Path, path: str, timeout: float = 5.0) -> dict[str, Any]:
    """One connection as s_time makes them (client certificate, `GET <path> HTTP/1.0`, read
    to the close): what was negotiated and answered, so that a run that counts refused
    handshakes or error pages is caught before it is timed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # the sidecar pins a SPIFFE URI, not a host name
    ctx.load_verify_locations(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw) as conn:
            conn.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            version, cipher = conn.version(), conn.cipher()
            peer = conn.getpeercert() or {}
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
    parts = status_line.split()
    sans = [value for kind, value in peer.get("subjectAltName", ()) if kind == "URI"]
    return {
        "tls": version,
        "cipher": cipher[0] if cipher else None,
        "status": int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None,
        "body": body,
        "peer": sans[0] if sans else None,
    }


def run_s_time(
    harness: Harness, name: str, argv: list[str], seconds: int, core: int, clients: int = 1
) -> int:
    """`clients` s_time processes at once on `core`, bounded in time: the connections they
    completed together. One s_time waits for each handshake before it starts the next, so
    one alone leaves the server idle while it computes its own half."""
    procs = [
        harness.start(f"s_time-{name}-{i}", argv, core=core, stop_signal=signal.SIGKILL)
        for i in range(clients)
    ]
    try:
        for proc in procs:
            proc.popen.wait(seconds + 30)
    finally:
        for proc in procs:
            proc.stop()
            harness.procs.remove(proc)
    total = 0
    for proc in procs:
        text = proc.log_path.read_text(errors="replace")
        n = parse_s_time(text)
        if proc.popen.returncode != 0 or not n:
            raise RuntimeError(
                f"openssl s_time against {name} failed ({proc.popen.returncode}):\n{text[-2000:]}"
            )
        total += n
    return total


def client_for(workdir: Path, name: str, server: TlsServer) -> tuple[Path, Path, dict[str, Any]]:
    """A client leaf (`bench-client`) from the CA that `server` trusts, and one probe with it."""
    cert, key = mint_leaf(server.ca_cert, "bench-client", workdir / f"client-{name}")
    seen = probe(server.port, cert, key, server.ca_cert, "/small")
    if seen["status"] != 200 or seen.pop("body") != SMALL_BODY:
        raise RuntimeError(f"{name}: {server.label} answered a client-certificate GET with {seen}")
    return cert, key, seen


def measure_handshakes(
    harness: Harness,
    name: str,
    server: TlsServer,
    client: tuple[Path, Path],
    seconds: int,
    core: int,
    app_pids: list[int],
    app_on_core: bool,
    clients: int = 1,
) -> dict[str, Any]:
    """Full mutual-TLS handshakes per second against `server`, each with one request, and
    the CPU its processes spent per connection, read from /proc around the run as the
    request cells are. `app_on_core`: the app shares the client's core (load core %);
    `clients`: s_time processes at once."""
    argv = s_time_argv(server.port, *client, server.ca_cert, seconds, "/small")
    cpu0, app0, busy0, load0 = (
        cpu_seconds(server.pids),
        cpu_seconds(app_pids),
        machine_busy_seconds(),
        children_cpu_seconds(),
    )
    t0 = time.monotonic()
    n = run_s_time(harness, name, argv, seconds, core, clients)
    wall = time.monotonic() - t0
    busy = machine_busy_seconds() - busy0
    cpu, app_cpu = cpu_seconds(server.pids) - cpu0, cpu_seconds(app_pids) - app0
    client_cpu = children_cpu_seconds() - load0
    for proc in server.procs:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} died during the handshakes:\n{proc.log_tail()}")
    return {
        "connections": n,
        "per_s": n / wall,
        "cpu_us": cpu * 1e6 / n,
        "proxy_core_pct": 100 * cpu / wall,
        "load_core_pct": 100 * (client_cpu + (app_cpu if app_on_core else 0.0)) / wall,
        "others_pct": max(0.0, 100 * (busy - cpu - app_cpu - client_cpu) / wall),
    }
