"""The Connect API: the built-in CA (roots and leaf certificates), authorize, and intentions.

``/v1/agent/connect/ca/roots`` and ``/v1/connect/ca/roots`` (``?pem``), the leaf of a service
``/v1/agent/connect/ca/leaf/<service>``, ``POST /v1/agent/connect/authorize``, and intentions by
name: ``/v1/connect/intentions`` (list), ``/exact`` (GET, PUT, DELETE), ``/match`` and ``/check``.

Rules of this file:

- The certificates are real (``cryptography``): an EC P-256 root per CA generation with a
  signing intermediate under it, like Consul's built-in provider; leaves are signed by the
  intermediate and ``CertPEM`` carries it after the leaf. The trust domain is
  ``<cluster id>.consul``; a leaf's only SAN is ``spiffe://<trust domain>/ns/default/dc/dc1/svc/<name>``.
- A root rotation (:meth:`ConnectAPI.rotate_root`) makes a new root and intermediate, cross-signs
  the new root with the old root's key (the cross-signed certificate follows the intermediate in
  ``IntermediateCerts`` and in every new leaf's ``CertPEM``), keeps the old root in ``Roots``
  (inactive) for twice the leaf TTL, and re-issues every cached leaf: roots first, then leaves,
  each write with its own index, so a client never sees a leaf before the root that signs it.
- Leaves are cached per service and answered again until they are due for renewal, at a random
  point between 60% and 90% of the TTL they were issued with, or until the active root changed
  or they expired. Every issue is a write (Consul's CA provider bumps its state in Raft), so it
  takes a new index. A blocking leaf query returns when a new certificate is issued.
- Intentions are Consul's L4 intentions in namespace ``default`` (CE): precedence 9 (exact
  source, exact destination), 8 (``*`` source), 6 (``*`` destination), 5 (``*`` to ``*``), ties
  broken by (SourceNS, SourceName, DestinationNS, DestinationName). ``/match`` answers in that
  order, and its index moves only when an intention it could list changes (Consul suppresses
  wakeups whose answer did not change).
- ACLs as Consul enforces them: a leaf needs ``service:write`` on the service, authorize
  ``service:write`` on the target, check ``service:read`` on the destination, match
  ``intentions:read`` on each name, exact writes ``intentions:write`` on the destination, reads and
  lists ``intentions:read`` on the source or the destination. With no matching intention the
  answer is the agent's ``default_intention_policy`` if set, else the ACL default (allow with ACLs
  off or a management token, else the ACL default policy).
- Not implemented: the legacy intention endpoints by ID (``POST /v1/connect/intentions``,
  ``/v1/connect/intentions/<id>``), the CA configuration endpoints and ``/v1/connect/ca/sign``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import math
import random
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .core import DEFAULT_WAIT, MAX_WAIT, AgentCore, Authz, Result, Route
from .protocol import ConsulError, Fields, _json, _parse_go_bool, parse_duration

LEAF_CERT_TTL = 72 * 3600.0  # Consul's LeafCertTTL default
ROOT_CERT_TTL = 10 * 365 * 86400.0  # RootCertTTL, 87600h
INTERMEDIATE_CERT_TTL = 365 * 86400.0  # IntermediateCertTTL, 8760h
BACKDATE = 60.0  # Consul backdates NotBefore by a minute for clock skew
RENEW_WINDOW = (0.6, 0.9)
PRUNE_INTERVAL = 0.5
WILDCARD = "*"
NAMESPACE = "default"

_SERVICE_URI = re.compile(r"spiffe://([^/]+)(?:/ap/[^/]+)?/ns/([^/]+)/dc/([^/]+)/svc/([^/]+)")


def _utc(epoch: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC)


def _rfc3339(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _colon_hex(data: bytes) -> str:
    return ":".join(f"{b:02x}" for b in data)


def _serial_hex(serial: int) -> str:
    """Consul's EncodeSerialNumber: the big-endian bytes of the serial, colon-separated hex."""
    return _colon_hex(serial.to_bytes(max(1, (serial.bit_length() + 7) // 8), "big"))


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _key_id(key: ec.EllipticCurvePublicKey) -> x509.SubjectKeyIdentifier:
    point = key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return x509.SubjectKeyIdentifier(hashlib.sha256(point).digest())


def _ca_cert(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    serial: int,
    trust_domain: str,
    not_before: float,
    not_after: float,
    path_length: int | None,
) -> x509.Certificate:
    issuer_ski = _key_id(issuer_key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(_utc(not_before))
        .not_valid_after(_utc(not_after))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(_key_id(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )


def _cn(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


@dataclass
class CARoot:
    """One CA generation: the root, the intermediate that signs leaves, and what goes with them."""

    id: str
    serial: int
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    signing_key: ec.EllipticCurvePrivateKey
    signing_cert: x509.Certificate
    intermediates: list[x509.Certificate]  # the signing intermediate first, then cross-signed roots
    external_trust_domain: str
    active: bool = True
    rotated_out_at: float | None = None
    create_index: int = 0
    modify_index: int = 0

    def to_json(self) -> dict[str, Any]:
        ski = self.signing_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return {
            "ID": self.id,
            "Name": "Consul CA Primary Cert",
            "SerialNumber": self.serial,
            "SigningKeyID": _colon_hex(ski.digest),
            "ExternalTrustDomain": self.external_trust_domain,
            "NotBefore": _rfc3339(self.cert.not_valid_before_utc.timestamp()),
            "NotAfter": _rfc3339(self.cert.not_valid_after_utc.timestamp()),
            "RootCert": _pem(self.cert),
            "IntermediateCerts": [_pem(c) for c in self.intermediates] or None,
            "Active": self.active,
            "PrivateKeyType": "ec",
            "PrivateKeyBits": 256,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass
class Leaf:
    """A service's cached leaf certificate (``structs.IssuedCert``)."""

    service: str
    service_uri: str
    serial: int
    cert_pem: str  # the leaf, then the active root's intermediates
    key_pem: str
    valid_after: float
    valid_before: float
    renew_at: float
    root_id: str
    create_index: int = 0
    modify_index: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "SerialNumber": _serial_hex(self.serial),
            "CertPEM": self.cert_pem,
            "PrivateKeyPEM": self.key_pem,
            "Service": self.service,
            "ServiceURI": self.service_uri,
            "ValidAfter": _rfc3339(self.valid_after),
            "ValidBefore": _rfc3339(self.valid_before),
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass
class Intention:
    """An intention made by name (no ID, as ``/exact`` makes them)."""

    source: str
    destination: str
    action: str
    description: str = ""
    permissions: list[Any] = field(default_factory=list)
    source_type: str = "consul"
    create_index: int = 0
    modify_index: int = 0

    @property
    def precedence(self) -> int:
        # Consul's UpdatePrecedence with exact namespaces (CE has only "default").
        highest = 9 if self.destination != WILDCARD else 6
        return highest - (0 if self.source != WILDCARD else 1)

    def sort_key(self) -> tuple[int, str, str, str, str]:
        return (-self.precedence, NAMESPACE, self.source, NAMESPACE, self.destination)

    def describe(self) -> str:
        """``Intention.String()``: ``default/web => default/db (Precedence: 9, Action: ALLOW)``."""
        detail = (
            f"Permissions: {len(self.permissions)}" if self.permissions else f"Action: {self.action.upper()}"
        )
        return (
            f"{NAMESPACE}/{self.source} => {NAMESPACE}/{self.destination} "
            f"(Precedence: {self.precedence}, {detail})"
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "Description": self.description,
            "SourceNS": NAMESPACE,
            "SourceName": self.source,
            "DestinationNS": NAMESPACE,
            "DestinationName": self.destination,
            "SourceType": self.source_type,
            "Action": self.action,
            "Meta": {},
            "Precedence": self.precedence,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }
        if self.permissions:
            out["Permissions"] = self.permissions
        return out


def parse_service_uri(uri: str) -> tuple[str, str]:
    """(namespace, service) of a service SPIFFE ID; ValueError for anything else."""
    match = _SERVICE_URI.fullmatch(uri)
    if not match:
        raise ValueError(uri)
    return match.group(2), match.group(4)


def _acl_default_allow(authz: Authz) -> bool:
    """``authz.IntentionDefaultAllow``: allow with ACLs off or a management token, else the ACL
    default policy of the agent (deny)."""
    if not authz.enabled:
        return True
    return authz.token is not None and authz.token.management


class ConnectAPI(AgentCore):
    """The Connect CA, authorize and intentions, and the CA's fault switches (used by faults.py)."""

    def __init__(self, *, leaf_cert_ttl: float = LEAF_CERT_TTL, **options: Any) -> None:
        if not (math.isfinite(leaf_cert_ttl) and leaf_cert_ttl > 0):
            raise ValueError("leaf_cert_ttl must be a positive number of seconds")
        self.leaf_cert_ttl = leaf_cert_ttl
        super().__init__(**options)

    # -- state ------------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        super()._reset_state()
        # A restarted dev agent has a new cluster, so a new CA and trust domain, and no intentions.
        self.cluster_id = str(uuid.uuid4())
        self._ca_serial = 0
        self._roots: list[CARoot] = []
        self._roots_index = 0
        self._leaves: dict[str, Leaf] = {}
        self._intentions: dict[tuple[str, str], Intention] = {}
        self._intentions_index = 0
        # (side, name) -> index of the last write of an intention with that source/destination
        self._intention_touched: dict[tuple[str, str], int] = {}

    def _bootstrap(self) -> None:
        super()._bootstrap()
        index = self._next_index()
        self._roots.append(self._new_root(index))
        self._roots_index = index
        self._notify()

    @property
    def trust_domain(self) -> str:
        return f"{self.cluster_id}.consul"

    def _next_serial(self) -> int:
        self._ca_serial += 1
        return self._ca_serial

    def _active_root(self) -> CARoot:
        return next(r for r in reversed(self._roots) if r.active)

    def _new_root(self, index: int) -> CARoot:
        now = time.time()
        key = ec.generate_private_key(ec.SECP256R1())
        short = self.cluster_id[:8]
        name = _cn(f"pri-{secrets.token_hex(4)}.consul.ca.{short}.consul")
        serial = self._next_serial()
        cert = _ca_cert(
            name,
            key.public_key(),
            name,
            key,
            serial=serial,
            trust_domain=self.trust_domain,
            not_before=now - BACKDATE,
            not_after=now + ROOT_CERT_TTL,
            path_length=None,
        )
        signing_key = ec.generate_private_key(ec.SECP256R1())
        signing_cert = _ca_cert(
            _cn(f"int-{secrets.token_hex(4)}.consul.ca.{short}.consul"),
            signing_key.public_key(),
            name,
            key,
            serial=self._next_serial(),
            trust_domain=self.trust_domain,
            not_before=now - BACKDATE,
            not_after=now + INTERMEDIATE_CERT_TTL,
            path_length=0,
        )
        return CARoot(
            id=_colon_hex(cert.fingerprint(hashes.SHA1())),  # Consul: the SHA-1 fingerprint
            serial=serial,
            key=key,
            cert=cert,
            signing_key=signing_key,
            signing_cert=signing_cert,
            intermediates=[signing_cert],
            external_trust_domain=self.cluster_id,
            create_index=index,
            modify_index=index,
        )

    def _issue_leaf(self, service: str) -> Leaf:
        root = self._active_root()
        index = self._next_index()
        serial = self._next_serial()
        now = time.time()
        ttl = self.leaf_cert_ttl
        key = ec.generate_private_key(ec.SECP256R1())
        uri = f"spiffe://{self.trust_domain}/ns/{NAMESPACE}/dc/{self.datacenter}/svc/{service}"
        # X.509 times are whole seconds: round NotAfter up so a short TTL is not cut short.
        not_after = min(float(math.ceil(now + ttl)), root.signing_cert.not_valid_after_utc.timestamp())
        cn = re.sub(r"[^a-z0-9-]", "", service.lower())[:40] or "svc"
        cert = (
            x509.CertificateBuilder()
            .subject_name(_cn(f"{cn}.svc.{NAMESPACE}.{self.cluster_id[:8]}.consul"))
            .issuer_name(root.signing_cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(_utc(now - BACKDATE))
            .not_valid_after(_utc(not_after))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False,
            )
            .add_extension(_key_id(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                    _key_id(root.signing_key.public_key())
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
            .sign(root.signing_key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,  # "EC PRIVATE KEY", as Consul sends it
            serialization.NoEncryption(),
        ).decode()
        old = self._leaves.get(service)
        leaf = Leaf(
            service=service,
            service_uri=uri,
            serial=serial,
            cert_pem=_pem(cert) + "".join(_pem(c) for c in root.intermediates),
            key_pem=key_pem,
            valid_after=now - BACKDATE,
            valid_before=not_after,
            renew_at=now + (not_after - now) * random.uniform(*RENEW_WINDOW),
            root_id=root.id,
            create_index=old.create_index if old else index,
            modify_index=index,
        )
        self._leaves[service] = leaf
        return leaf

    def _current_leaf(self, service: str) -> Leaf:
        """The cached leaf of `service`, issued again when it is due, expired or not signed under
        the active root."""
        leaf = self._leaves.get(service)
        now = time.time()
        if leaf is None or now >= leaf.renew_at or leaf.root_id != self._active_root().id:
            leaf = self._issue_leaf(service)
            self._notify()
        return leaf

    def _roots_json(self) -> dict[str, Any]:
        return {
            "ActiveRootID": self._active_root().id,
            "TrustDomain": self.trust_domain,
            "Roots": [r.to_json() for r in self._roots],
        }

    # -- fault switches (faults.py) and test helpers --------------------------------------------

    def rotate_root(self) -> None:
        """A new active root (and intermediate), cross-signed by the old root; the old root stays in
        ``Roots`` for twice the leaf TTL; every cached leaf is issued again under the new root."""
        old = self._active_root()
        index = self._next_index()
        new = self._new_root(index)
        cross = _ca_cert(
            new.cert.subject,
            new.key.public_key(),
            old.cert.subject,
            old.key,
            serial=self._next_serial(),
            trust_domain=self.trust_domain,
            not_before=time.time() - BACKDATE,
            not_after=old.cert.not_valid_after_utc.timestamp(),
            path_length=None,
        )
        new.intermediates.append(cross)
        for root in self._roots:
            if root.active:
                root.active = False
                root.rotated_out_at = time.time()
                root.modify_index = index
        self._roots.append(new)
        self._roots_index = index
        self._notify()
        for service in list(self._leaves):
            self._issue_leaf(service)
        self._notify()

    def set_leaf_ttl(self, seconds: float) -> None:
        """Set the CA's LeafCertTTL. Cached leaves that would outlive it are issued again at once
        (a deviation: Consul lets them run to their renewal time), so a test sees the change."""
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError("leaf_ttl must be a positive number of seconds")
        self.leaf_cert_ttl = seconds
        now = time.time()
        changed = False
        for service, leaf in list(self._leaves.items()):
            if leaf.valid_before > now + seconds + 1:
                self._issue_leaf(service)
                changed = True
        if changed:
            self._notify()

    def _prune_roots(self) -> None:
        now = time.time()
        keep = [
            r
            for r in self._roots
            if r.active or r.rotated_out_at is None or now - r.rotated_out_at < 2 * self.leaf_cert_ttl
        ]
        if len(keep) != len(self._roots):
            self._roots = keep
            self._roots_index = self._next_index()
            self._notify()

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_INTERVAL)
            self._prune_roots()

    async def start(self) -> None:
        await super().start()
        task = asyncio.get_running_loop().create_task(self._prune_loop())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _restamp_connect(self, base: int) -> None:
        """For the ``reset_index`` fault: every CA and intention record gets the low index."""
        for entity in (*self._roots, *self._leaves.values(), *self._intentions.values()):
            entity.create_index = base
            entity.modify_index = base
        self._roots_index = base
        self._intentions_index = base
        for key in self._intention_touched:
            self._intention_touched[key] = base

    def roots_pem(self) -> str:
        """Every root certificate, PEM, for test code."""
        return "".join(_pem(r.cert) for r in self._roots)

    # -- the CA endpoints -----------------------------------------------------------------------

    async def h_ca_roots(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        # No ACL: Consul answers the roots to any caller, even one with an unknown token.
        pem = request.path == "/v1/connect/ca/roots" and _parse_go_bool(request.query.get("pem", "")) is True

        def compute() -> Result:
            if pem:
                chain = "".join(_pem(r.cert) + "".join(_pem(c) for c in r.intermediates) for r in self._roots)
                return Result(
                    self._roots_index,
                    raw=chain.encode(),
                    headers={"Content-Type": "application/pem-certificate-chain"},
                )
            return Result(self._roots_index, self._roots_json())

        return await self._query(request, compute)

    async def h_ca_leaf(self, request: web.BaseRequest, service: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        if not service or "/" in service:
            raise ConsulError(
                400, "Missing service name" if not service else f"Invalid service name {service!r}"
            )
        authz, _secret = self._authz(request)
        authz.require("service", "write", service)
        min_index, wait = _blocking(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait + random.uniform(0, wait / 16)
        epoch = self._epoch
        while True:
            changed = self._changed
            leaf = self._current_leaf(service)
            if min_index == 0 or leaf.modify_index > min_index or self._epoch != epoch:
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            until_renewal = max(0.0, leaf.renew_at - time.time()) + 0.001
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(remaining, until_renewal))
        return _json(leaf.to_json(), headers=self._meta_headers(leaf.modify_index))

    async def h_authorize(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        authz, _secret = self._authz(request)
        f = Fields(await self._body(request), "ConnectAuthorizeRequest")
        target = f.text("Target")
        if not target:
            raise ConsulError(400, "Target service must be specified")
        uri = f.text("ClientCertURI")
        if not uri.startswith("spiffe://"):
            raise ConsulError(400, "ClientCertURI not a valid Connect identifier")
        try:
            namespace, source = parse_service_uri(uri)
        except ValueError:
            raise ConsulError(400, "ClientCertURI not a valid Service identifier") from None
        authz.require("service", "write", target)
        allowed, reason = self._decide(source, namespace, target, authz)
        return _json({"Authorized": allowed, "Reason": reason})

    # -- intentions -------------------------------------------------------------------------------

    def _matches(self, by: str, name: str) -> list[Intention]:
        """Consul's IntentionMatch for one entry: the intentions whose `by` side is `name` or
        ``*``, in evaluation order."""
        found = [
            ixn
            for ixn in self._intentions.values()
            if (ixn.destination if by == "destination" else ixn.source) in (name, WILDCARD)
        ]
        return sorted(found, key=Intention.sort_key)

    def _decide(self, source: str, source_ns: str, destination: str, authz: Authz) -> tuple[bool, str]:
        for ixn in self._matches("destination", destination):
            if ixn.source in (source, WILDCARD) and source_ns == NAMESPACE:
                if ixn.permissions:  # authorize and check are L4: an L7 intention denies
                    return False, f"Matched L7 intention: {ixn.describe()}"
                return ixn.action == "allow", f"Matched L4 intention: {ixn.describe()}"
        if self.default_intention_policy:
            return self.default_intention_policy == "allow", "Default intention policy"
        return _acl_default_allow(authz), "Default behavior configured by ACLs"

    def _touch_intention(self, ixn: Intention, index: int) -> None:
        self._intentions_index = index
        self._intention_touched[("source", ixn.source)] = index
        self._intention_touched[("destination", ixn.destination)] = index

    def _match_index(self, by: str, names: list[str]) -> int:
        touched = [self._intention_touched.get((by, n), 0) for n in (*names, WILDCARD)]
        return max(touched) or self._intentions_index

    @staticmethod
    def _can_read(authz: Authz, ixn: Intention) -> bool:
        return authz.allowed("intention", "read", ixn.source) or authz.allowed(
            "intention", "read", ixn.destination
        )

    async def h_intentions(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        authz, secret = self._authz(request)
        filt = self._filter(request)

        def compute() -> Result:
            every = [i.to_json() for i in sorted(self._intentions.values(), key=Intention.sort_key)]
            if filt is not None:
                every = [i for i in every if filt.matches(i)]
            visible = [
                i
                for i in every
                if authz.allowed("intention", "read", i["SourceName"])
                or authz.allowed("intention", "read", i["DestinationName"])
            ]
            return Result(
                self._intentions_index, visible, empty=not visible, filtered=len(visible) != len(every)
            )

        return await self._query(request, compute, secret)

    async def h_intention_exact(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        authz, secret = self._authz(request)
        source, destination = _exact_names(request)
        key = (source, destination)
        if request.method == "GET":

            def compute() -> Result:
                ixn = self._intentions.get(key)
                if ixn is None:
                    raise ConsulError(404, "Intention not found")
                if not self._can_read(authz, ixn):
                    raise ConsulError(403, "Permission denied")
                return Result(self._intentions_index, ixn.to_json())

            return await self._query(request, compute, secret)
        if not authz.allowed("intention", "write", destination):
            raise ConsulError(403, "Permission denied")
        if request.method == "DELETE":
            ixn = self._intentions.pop(key, None)
            if ixn is not None:  # by-name deletions are idempotent
                self._touch_intention(ixn, self._next_index())
                self._notify()
            return _json(True)
        f = Fields(await self._body(request), "Intention")
        if f.text("ID"):
            raise ConsulError(500, "ID must not be specified")
        if f.get("Meta"):
            raise ConsulError(500, "Meta must not be specified")
        source_type = f.text("SourceType") or "consul"
        if source_type != "consul":
            raise ConsulError(500, "SourceType must be set to 'consul'")
        permissions = f.get("Permissions") or []
        if not isinstance(permissions, list):
            raise ConsulError(400, "Request decode failed: Permissions must be a list")
        action = f.text("Action").lower()
        if permissions and action:
            raise ConsulError(500, "Sources[0].Action must be omitted if Permissions are specified")
        if not permissions and action not in ("allow", "deny"):
            raise ConsulError(500, "Sources[0].Action must be set to 'allow' or 'deny'")
        old = self._intentions.get(key)
        index = self._next_index()
        ixn = Intention(
            source,
            destination,
            action,
            f.text("Description"),
            permissions,
            source_type,
            create_index=old.create_index if old else index,
            modify_index=index,
        )
        self._intentions[key] = ixn
        self._touch_intention(ixn, index)
        self._notify()
        return _json(True)

    async def h_intention_match(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        authz, secret = self._authz(request)
        by_values = request.query.getall("by", [])
        if len(by_values) != 1:
            raise ConsulError(500, "required query parameter 'by' not set")
        by = by_values[0]
        if by not in ("source", "destination"):
            raise ConsulError(500, "'by' parameter must be one of 'source' or 'destination'")
        raw_names = request.query.getall("name", [])
        if not raw_names:
            raise ConsulError(500, "required query parameter 'name' not set")
        names = [_intention_name(n, f"name {n!r} is invalid") for n in raw_names]
        for name in names:
            if name:
                authz.require("intention", "read", name)

        def compute() -> Result:
            answer = {
                raw: [i.to_json() for i in self._matches(by, name)] for raw, name in zip(raw_names, names)
            }
            return Result(self._match_index(by, names), answer, empty=not any(answer.values()))

        return await self._query(request, compute, secret)

    async def h_intention_check(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        authz, _secret = self._authz(request)
        if request.query.get("source-type", "consul") != "consul":
            raise ConsulError(500, f"unsupported SourceType: {request.query['source-type']!r}")
        sources = request.query.getall("source", [])
        if len(sources) != 1:
            raise ConsulError(500, "required query parameter 'source' not set")
        destinations = request.query.getall("destination", [])
        if len(destinations) != 1:
            raise ConsulError(500, "required query parameter 'destination' not set")
        source = _intention_name(sources[0], f"source {sources[0]!r} is invalid")
        destination = _intention_name(destinations[0], f"destination {destinations[0]!r} is invalid")
        authz.require("service", "read", destination)
        allowed, _reason = self._decide(source, NAMESPACE, destination, authz)
        return _json({"Allowed": allowed})

    def routes(self) -> list[Route]:
        return [
            *super().routes(),
            Route("/v1/agent/connect/ca/roots", ("GET",), self.h_ca_roots),
            Route("/v1/connect/ca/roots", ("GET",), self.h_ca_roots),
            Route("/v1/agent/connect/ca/leaf/", ("GET",), self.h_ca_leaf, prefix=True),
            Route("/v1/agent/connect/authorize", ("POST",), self.h_authorize),
            Route("/v1/connect/intentions", ("GET",), self.h_intentions),
            Route("/v1/connect/intentions/exact", ("GET", "PUT", "DELETE"), self.h_intention_exact),
            Route("/v1/connect/intentions/match", ("GET",), self.h_intention_match),
            Route("/v1/connect/intentions/check", ("GET",), self.h_intention_check),
        ]


def _blocking(request: web.BaseRequest) -> tuple[int, float]:
    """``?index=`` and ``?wait=`` as core's blocking queries read them."""
    query = request.query
    wait = DEFAULT_WAIT
    if query.get("wait"):
        try:
            wait = parse_duration(query["wait"])
        except ValueError:
            raise ConsulError(400, "Invalid wait time") from None
    min_index = 0
    if query.get("index"):
        if not query["index"].isdigit():
            raise ConsulError(400, "Invalid index")
        min_index = int(query["index"])
    return min_index, min(max(wait, 0.0), MAX_WAIT) or DEFAULT_WAIT


def _intention_name(raw: str, what: str) -> str:
    """A service name from Consul's naming convention (``name`` or ``namespace/name``); CE knows
    the namespace ``default`` only."""
    parts = raw.split("/")
    if len(parts) > 2:
        raise ConsulError(500, f"{what}: input can contain at most two '/'")
    if raw.startswith("peer:"):
        raise ConsulError(500, f"{what}: cannot specify a peer here")
    if len(parts) == 2:
        if parts[0] not in (NAMESPACE, ""):
            raise ConsulError(
                500, f'Invalid namespace "{parts[0]}": Namespaces are a Consul Enterprise feature'
            )
        return parts[1]
    return raw


def _exact_names(request: web.BaseRequest) -> tuple[str, str]:
    sources = request.query.getall("source", [])
    if len(sources) != 1 or not sources[0]:
        raise ConsulError(500, "required query parameter 'source' not set")
    destinations = request.query.getall("destination", [])
    if len(destinations) != 1 or not destinations[0]:
        raise ConsulError(500, "required query parameter 'destination' not set")
    source = _intention_name(sources[0], f"source {sources[0]!r} is invalid")
    destination = _intention_name(destinations[0], f"destination {destinations[0]!r} is invalid")
    for side, name in (("SourceName", source), ("DestinationName", destination)):
        if name != WILDCARD and WILDCARD in name:
            raise ConsulError(500, f"{side}: wildcard character '*' cannot be used with partial values")
    return source, destination
