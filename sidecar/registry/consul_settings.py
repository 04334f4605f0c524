"""Where and how to reach the Consul agent: `ConsulSettings`, read from the flags and from
the environment variables Consul's own CLI reads (CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN,
CONSUL_HTTP_TOKEN_FILE, CONSUL_HTTP_SSL, CONSUL_HTTP_SSL_VERIFY, CONSUL_CACERT,
CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY), flags first, parsed as Consul parses them; and
the TLS context for an https agent.

Bad settings raise ValueError with a message that names the flag or variable, never the
token's value. No I/O here but reading the token and certificate files, so the command
line can check its flags without importing the HTTP client (consul.py).
"""

from __future__ import annotations

import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.registry.base import join_host_port

DEFAULT_ADDR = "127.0.0.1:8500"

# Go's strconv.ParseBool, which Consul uses for CONSUL_HTTP_SSL and CONSUL_HTTP_SSL_VERIFY.
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _parse_bool(value: str, label: str) -> bool:
    if value.strip() in _TRUE:
        return True
    if value.strip() in _FALSE:
        return False
    raise ValueError(f"{label}: expected true or false, got {value!r}")


def _split_addr(addr: str, label: str) -> tuple[str, str, int]:
    """`host:port` or `scheme://host[:port]` -> (scheme, host, port), as Consul reads it.

    Without a scheme the address is plain HTTP; a URL without a port uses the scheme's
    default port, as Consul's Go client does.
    """
    text = addr.strip()
    if not text:
        raise ValueError(f"{label}: empty address")
    has_scheme = "://" in text
    parts = urllib.parse.urlsplit(text if has_scheme else f"http://{text}")
    scheme = parts.scheme.lower()
    if scheme == "unix":
        raise ValueError(f"{label}: unix sockets are not supported, use host:port")
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"{label}: unsupported scheme {parts.scheme!r} (use http or https)")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"{label}: expected host:port or scheme://host:port, got {addr!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{label}: bad port in {addr!r} (expected 1-65535)") from None
    if port == 0:
        raise ValueError(f"{label}: bad port in {addr!r} (expected 1-65535)")
    host = parts.hostname
    if not host:
        raise ValueError(f"{label}: missing host in {addr!r}")
    if port is None:
        if not has_scheme and text.endswith(":"):
            raise ValueError(f"{label}: bad port in {addr!r} (expected 1-65535)")
        port = _DEFAULT_PORTS[scheme]
    return scheme, host, port


def _check_token(token: str, label: str) -> None:
    # Never echo the value: the message names only the source.
    if not token or any(ch.isspace() or not ch.isprintable() for ch in token):
        raise ValueError(f"{label}: the token is empty or contains whitespace or control characters")


@dataclass(frozen=True, repr=False)
class ConsulSettings:
    """How to reach the Consul agent: address, ACL token and TLS.

    `addr` is `host:port` or `http(s)://host[:port]`. Build it from flags and the
    environment with `from_sources`, which follows Consul's own conventions.
    """

    addr: str = DEFAULT_ADDR
    token: str | None = None
    cacert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    verify: bool = True
    datacenter: str | None = None

    def __post_init__(self) -> None:
        _split_addr(self.addr, "consul addr")
        if self.token is not None:
            _check_token(self.token, "consul token")
        if self.client_key and not self.client_cert:
            raise ValueError("consul client key: given without a client certificate")
        if self.datacenter is not None and not self.datacenter.strip():
            raise ValueError("datacenter: empty name")

    @property
    def scheme(self) -> str:
        return _split_addr(self.addr, "consul addr")[0]

    @property
    def host(self) -> str:
        return _split_addr(self.addr, "consul addr")[1]

    @property
    def port(self) -> int:
        return _split_addr(self.addr, "consul addr")[2]

    @property
    def hostport(self) -> str:
        """`host:port` with IPv6 hosts in brackets, for URLs and messages."""
        return join_host_port(self.host, self.port)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.hostport}"

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    def __repr__(self) -> str:
        token = "<set>" if self.token else None
        return (
            f"ConsulSettings(addr={self.url!r}, token={token}, cacert={self.cacert!r}, "
            f"client_cert={self.client_cert!r}, client_key={self.client_key!r}, verify={self.verify}, "
            f"datacenter={self.datacenter!r})"
        )

    __str__ = __repr__

    @classmethod
    def from_sources(cls, flags: Mapping[str, str | None], env: Mapping[str, str]) -> ConsulSettings:
        """Settings from CLI flags (keys `consul_addr`, `consul_token`...) and the environment.

        A flag that is not None wins over its environment variable; an empty environment
        variable counts as unset, as in Consul. Environment: `CONSUL_HTTP_ADDR`,
        `CONSUL_HTTP_TOKEN`, `CONSUL_HTTP_TOKEN_FILE` (wins over `CONSUL_HTTP_TOKEN`, as in
        Consul's Go client), `CONSUL_CACERT`, `CONSUL_CLIENT_CERT`, `CONSUL_CLIENT_KEY`,
        `CONSUL_HTTP_SSL` (https when the address has no scheme), `CONSUL_HTTP_SSL_VERIFY`.
        Bad values raise ValueError naming the flag or variable, never the token.
        """

        def pick(key: str, var: str | None) -> tuple[str | None, str]:
            value = flags.get(key)
            if value is not None:
                return value, "--" + key.replace("_", "-")
            if var is not None and env.get(var):
                return env[var], var
            return None, "--" + key.replace("_", "-")

        addr, addr_label = pick("consul_addr", "CONSUL_HTTP_ADDR")
        if addr is None:
            addr = DEFAULT_ADDR
        _split_addr(addr, addr_label)
        # An address without a scheme, from the flag or the environment, follows
        # CONSUL_HTTP_SSL, as in Consul's CLI; an explicit scheme wins.
        if env.get("CONSUL_HTTP_SSL") and _parse_bool(env["CONSUL_HTTP_SSL"], "CONSUL_HTTP_SSL"):
            if "://" not in addr:
                addr = f"https://{addr.strip()}"

        token = _token_from(flags, env)

        verify_text, verify_label = pick("consul_ssl_verify", "CONSUL_HTTP_SSL_VERIFY")
        verify = True if verify_text is None else _parse_bool(verify_text, verify_label)

        paths: dict[str, str | None] = {}
        for key, var in (
            ("consul_cacert", "CONSUL_CACERT"),
            ("consul_client_cert", "CONSUL_CLIENT_CERT"),
            ("consul_client_key", "CONSUL_CLIENT_KEY"),
        ):
            path, label = pick(key, var)
            if path is not None:
                if not path.strip():
                    raise ValueError(f"{label}: empty path")
                try:
                    with open(path, "rb"):
                        pass
                except OSError as exc:
                    raise ValueError(f"{label}: cannot read {path}: {exc.strerror or exc}") from None
            paths[key] = path
        if paths["consul_client_key"] and not paths["consul_client_cert"]:
            raise ValueError(
                "--consul-client-key: given without --consul-client-cert (or CONSUL_CLIENT_CERT)"
            )

        datacenter = flags.get("datacenter")
        if datacenter is not None and not datacenter.strip():
            raise ValueError("--datacenter: empty name")

        return cls(
            addr=addr.strip(),
            token=token,
            cacert=paths["consul_cacert"],
            client_cert=paths["consul_client_cert"],
            client_key=paths["consul_client_key"],
            verify=verify,
            datacenter=datacenter.strip() if datacenter else None,
        )


def _token_from(flags: Mapping[str, str | None], env: Mapping[str, str]) -> str | None:
    flag_token, flag_file = flags.get("consul_token"), flags.get("consul_token_file")
    if flag_token is not None and flag_file is not None:
        raise ValueError("--consul-token: give either --consul-token or --consul-token-file, not both")
    if flag_token is not None:
        _check_token(flag_token, "--consul-token")
        return flag_token
    if flag_file is not None:
        return _read_token_file(flag_file, "--consul-token-file")
    if env.get("CONSUL_HTTP_TOKEN_FILE"):
        return _read_token_file(env["CONSUL_HTTP_TOKEN_FILE"], "CONSUL_HTTP_TOKEN_FILE")
    if env.get("CONSUL_HTTP_TOKEN"):
        token = env["CONSUL_HTTP_TOKEN"].strip()
        _check_token(token, "CONSUL_HTTP_TOKEN")
        return token
    return None


def _read_token_file(path: str, label: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise ValueError(f"{label}: cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{label}: {path} is not UTF-8 text") from None
    if not token:
        raise ValueError(f"{label}: {path} is empty")
    _check_token(token, label)
    return token


def ssl_context(settings: ConsulSettings) -> ssl.SSLContext | bool:
    """The `ssl=` argument for aiohttp: True (plain default) for http, a context for https."""
    if not settings.tls:
        return True
    try:
        ctx = ssl.create_default_context(cafile=settings.cacert)
        if not settings.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if settings.client_cert:
            ctx.load_cert_chain(settings.client_cert, settings.client_key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"consul TLS settings: cannot load the CA or client certificate: {exc}") from None
    return ctx
