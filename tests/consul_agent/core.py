"""A Consul test agent: a stateful stand-in for ``consul agent -dev`` speaking Consul's HTTP API.

Rules of this file:

- It is a test fixture, not product code. It follows Consul's HTTP API documentation and, where the
  documentation is silent, what Consul's own source does (status codes, plain-text error bodies,
  the index rules of blocking queries) for the subset micro-sidecar and py-consul use.
- One agent is one node that is also the only server of datacenter ``dc1``, like ``-dev`` mode:
  the agent's local services and checks *are* that node's catalog entries (anti-entropy is
  instantaneous).
- All state lives on the agent's event loop. Other threads go through :class:`BackgroundAgent`.
- It never dials anything but loopback: HTTP and TCP checks against other hosts fail.
- Deliberate deviations from Consul, each because a test fixture needs it:
  * ``DeregisterCriticalServiceAfter`` has no one-minute floor and the reaper runs every 100 ms
    (Consul: >= 1 m, reaped every 30 s), so tests can watch it happen.
  * Interval checks (HTTP, TCP, script) run once right away, then on their interval
    (Consul staggers the first run randomly within the interval).
  * Check output is synced to the catalog at once (Consul defers output-only changes by
    ``check_update_interval``, 5 m by default).
  * Sessions, transactions, prepared queries, config entries, snapshots and ACL administration
    endpoints are not implemented (404). Limited ACL tokens are made with :meth:`add_token`.

Faults (see :meth:`ConsulTestAgent.set_fault`): ``refuse`` closes the listening socket and drops
open connections (clients get "connection refused"), ``error500`` answers every API call with a
plain-text 500, ``hang`` accepts requests and never answers them while the fault lasts, ``wipe``
forgets all state like a restarted dev agent (the index keeps rising), ``reset_index`` moves the
Raft index back to a low value (like a snapshot restore: blocked queries return at once with the
lower index), ``none`` (or ``clear``) ends ``refuse``/``error500``/``hang``.

Run it alone with ``python -m tests.consul_agent --port 8500 [--acl-token T] [--control-port N]``;
the control port (never affected by faults) takes ``PUT /fault/<mode>``, ``PUT /tokens`` and
``GET /state``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import json
import random
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aiohttp import web

VERSION = "1.22.0"
DATACENTER = "dc1"
SERVER_ADDR = "127.0.0.1:8300"
ANONYMOUS_ACCESSOR = "00000000-0000-0000-0000-000000000002"
FAULTS = ("none", "refuse", "error500", "hang")
ONE_SHOT_FAULTS = ("wipe", "reset_index")
ERROR500_BODY = "No cluster leader"
DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0
REAP_INTERVAL = 0.1
RESET_INDEX_BASE = 2
KV_MAX_VALUE = 512 * 1024
OUTPUT_MAX = 4096
SERVICE_MAINT_PREFIX = "_service_maintenance:"
NODE_MAINT_ID = "_node_maintenance"
DEFAULT_SERVICE_MAINT_REASON = (
    "Maintenance mode is enabled for this service, but no reason was provided. This is a default message."
)
DEFAULT_NODE_MAINT_REASON = (
    "Maintenance mode is enabled for this node, but no reason was provided. This is a default message."
)
PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
STATUSES = (PASSING, WARNING, CRITICAL)
LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "err", "error", "off")
AGENT_TOKEN_TYPES = (
    "default",
    "agent",
    "agent_recovery",
    "agent_master",
    "replication",
    "acl_token",
    "acl_agent_token",
    "acl_agent_master_token",
    "acl_replication_token",
    "config_file_service_registration",
    "dns",
)


class ConsulError(Exception):
    """An error answered to the client: an HTTP status and Consul's plain-text body."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


# ---------------------------------------------------------------------------------------------
# Go durations


_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)?")


def parse_duration(value: Any) -> float:
    """Seconds from a Go duration string ("1m30s", "500ms") or a number of nanoseconds."""
    if isinstance(value, bool):
        raise ValueError(f"time: invalid duration {value!r}")
    if isinstance(value, int | float):
        return float(value) / 1e9
    if not isinstance(value, str):
        raise ValueError(f"time: invalid duration {value!r}")
    text = value
    sign = 1.0
    if text[:1] in ("+", "-"):
        sign = -1.0 if text[0] == "-" else 1.0
        text = text[1:]
    if text == "0":
        return 0.0
    if not text:
        raise ValueError(f'time: invalid duration "{value}"')
    total, pos = 0.0, 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if not match or match.end() == pos:
            raise ValueError(f'time: invalid duration "{value}"')
        if match.group(2) is None:
            if match.end() == len(text):
                raise ValueError(f'time: missing unit in duration "{value}"')
            unit_end = match.end()
            while unit_end < len(text) and not (text[unit_end].isdigit() or text[unit_end] == "."):
                unit_end += 1
            raise ValueError(f'time: unknown unit "{text[match.end() : unit_end]}" in duration "{value}"')
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return sign * total


def _fraction(value: int, unit: int) -> str:
    whole, rest = divmod(value, unit)
    if not rest:
        return str(whole)
    digits = str(rest).rjust(len(str(unit)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}"


def format_duration(seconds: float) -> str:
    """Go's ``time.Duration.String()``: "10s", "1m30s", "100ms", "1h0m0s"."""
    nanos = round(seconds * 1e9)
    if nanos == 0:
        return "0s"
    sign = "-" if nanos < 0 else ""
    nanos = abs(nanos)
    if nanos < 1_000:
        return f"{sign}{nanos}ns"
    if nanos < 1_000_000:
        return f"{sign}{_fraction(nanos, 1_000)}\u00b5s"
    if nanos < 1_000_000_000:
        return f"{sign}{_fraction(nanos, 1_000_000)}ms"
    hours, rest = divmod(nanos, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    text = f"{hours}h" if hours else ""
    if hours or minutes:
        text += f"{minutes}m"
    return f"{sign}{text}{_fraction(rest, 1_000_000_000)}s"


# ---------------------------------------------------------------------------------------------
# Request bodies: Go decodes JSON keys case-insensitively and Consul also accepts snake_case.


def _canon(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


class Fields:
    """A JSON object looked up by canonical key, with Go-like type checks."""

    def __init__(self, raw: Any, what: str) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise _decode_error(what, "map[string]interface {}", raw)
        self.what = what
        self.raw = raw
        self.values = {_canon(k): v for k, v in raw.items()}

    def has(self, *names: str) -> bool:
        return any(self.values.get(_canon(n)) is not None for n in names)

    def get(self, *names: str) -> Any:
        for name in names:
            value = self.values.get(_canon(name))
            if value is not None:
                return value
        return None

    def text(self, *names: str, default: str = "") -> str:
        value = self.get(*names)
        if value is None:
            return default
        if not isinstance(value, str):
            raise _decode_error(f"{self.what}.{names[0]}", "string", value)
        return value

    def integer(self, *names: str, default: int = 0) -> int:
        value = self.get(*names)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise _decode_error(f"{self.what}.{names[0]}", "int", value)
        return int(value)

    def flag(self, *names: str, default: bool = False) -> bool:
        value = self.get(*names)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise _decode_error(f"{self.what}.{names[0]}", "bool", value)
        return value

    def str_list(self, *names: str) -> list[str]:
        value = self.get(*names)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _decode_error(f"{self.what}.{names[0]}", "[]string", value)
        return list(value)

    def str_map(self, *names: str) -> dict[str, str]:
        value = self.get(*names)
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise _decode_error(f"{self.what}.{names[0]}", "map[string]string", value)
        return dict(value)

    def duration(self, *names: str) -> float:
        value = self.get(*names)
        if value is None or value == "":
            return 0.0
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise ConsulError(400, f"Request decode failed: {exc}") from None


def _go_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "[]interface {}"
    if isinstance(value, dict):
        return "map[string]interface {}"
    return "<nil>"


def _decode_error(field_name: str, want: str, got: Any) -> ConsulError:
    return ConsulError(
        400,
        f"Request decode failed: 1 error(s) decoding:\n\n* '{field_name}' expected type '{want}', "
        f"got unconvertible type '{_go_type(got)}'",
    )


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# Filter expressions (go-bexpr, the ?filter= language), the subset Consul's docs show.


class FilterError(ValueError):
    pass


_FILTER_TOKEN = re.compile(
    r"""\s*(?:
        (?P<lparen>\() | (?P<rparen>\)) | (?P<op>==|!=) |
        "(?P<dq>(?:[^"\\]|\\.)*)" | `(?P<bq>[^`]*)` |
        (?P<word>[A-Za-z0-9_\-.:/\[\]"]+)
    )""",
    re.VERBOSE,
)
_MISSING = object()


def _filter_tokens(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _FILTER_TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise FilterError(f"1:{pos + 1}: invalid input {text[pos:].strip()[:1]!r}")
        kind = match.lastgroup or ""
        value = match.group(kind)
        if kind == "dq":
            value = bytes(value, "utf-8").decode("unicode_escape")
            kind = "str"
        elif kind == "bq":
            kind = "str"
        tokens.append((kind, value))
        pos = match.end()
    return tokens


class Filter:
    """A parsed filter expression: ``Filter(text).matches(item)``."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _filter_tokens(text)
        self.pos = 0
        if not self.tokens:
            raise FilterError("1:1: no match found, expected: expression")
        self.tree = self._or()
        if self.pos != len(self.tokens):
            raise FilterError(f"1:1: unexpected {self.tokens[self.pos][1]!r}")

    def _peek(self, offset: int = 0) -> tuple[str, str] | None:
        index = self.pos + offset
        return self.tokens[index] if index < len(self.tokens) else None

    def _word(self, offset: int = 0) -> str | None:
        token = self._peek(offset)
        return token[1].lower() if token and token[0] == "word" else None

    def _take(self) -> tuple[str, str]:
        token = self._peek()
        if token is None:
            raise FilterError("1:1: unexpected end of expression")
        self.pos += 1
        return token

    def _or(self) -> Any:
        node = self._and()
        while self._word() == "or":
            self.pos += 1
            node = ("or", node, self._and())
        return node

    def _and(self) -> Any:
        node = self._not()
        while self._word() == "and":
            self.pos += 1
            node = ("and", node, self._not())
        return node

    def _not(self) -> Any:
        if self._word() == "not":
            self.pos += 1
            return ("not", self._not())
        token = self._peek()
        if token and token[0] == "lparen":
            self.pos += 1
            node = self._or()
            if self._take()[0] != "rparen":
                raise FilterError("1:1: expected ')'")
            return node
        return self._match()

    def _value(self) -> str:
        kind, value = self._take()
        if kind not in ("str", "word"):
            raise FilterError(f"1:1: expected a value, got {value!r}")
        return value

    def _selector(self) -> list[str]:
        kind, value = self._take()
        if kind != "word" or not re.match(r"[A-Za-z_]", value):
            raise FilterError(f"1:1: invalid selector {value!r}")
        parts: list[str] = []
        for piece in re.finditer(r'\[\s*"([^"]*)"\s*\]|\[([^\]]*)\]|([^.\[]+)', value):
            parts.append(next(g for g in piece.groups() if g is not None))
        return parts

    def _match(self) -> Any:
        token = self._peek()
        if token is None:
            raise FilterError("1:1: unexpected end of expression")
        second = self._word(1)
        if token[0] == "str" or second in ("in", "not"):
            value = self._value()
            negate = False
            if self._word() == "not":
                self.pos += 1
                negate = True
            if self._word() != "in":
                raise FilterError(f'1:1: expected "in" after {value!r}')
            self.pos += 1
            return ("in", self._selector(), value, negate)
        selector = self._selector()
        kind, op = self._take()
        op = op.lower() if kind == "word" else op
        if kind == "op":
            return (op, selector, self._value())
        if op == "is":
            negate = self._word() == "not"
            if negate:
                self.pos += 1
            if self._word() != "empty":
                raise FilterError('1:1: expected "empty"')
            self.pos += 1
            return ("empty", selector, negate)
        negate = False
        if op == "not":
            negate = True
            op = self._take()[1].lower()
        if op in ("contains", "matches"):
            value = self._value()
            if op == "matches":
                try:
                    re.compile(value)
                except re.error as exc:
                    raise FilterError(f"1:1: invalid regular expression: {exc}") from None
            return (op, selector, value, negate)
        raise FilterError(f"1:1: unexpected {op!r}")

    def matches(self, item: Any) -> bool:
        return self._eval(self.tree, item)

    def _eval(self, node: Any, item: Any) -> bool:
        op = node[0]
        if op == "or":
            return self._eval(node[1], item) or self._eval(node[2], item)
        if op == "and":
            return self._eval(node[1], item) and self._eval(node[2], item)
        if op == "not":
            return not self._eval(node[1], item)
        target = _select(item, node[1])
        if op in ("==", "!="):
            equal = _filter_equal(target, node[2])
            return equal if op == "==" else not equal
        if op == "empty":
            empty = target is _MISSING or target is None or (hasattr(target, "__len__") and len(target) == 0)
            return not empty if node[2] else empty
        if op == "in" or op == "contains":
            found = _filter_contains(target, node[2])
            return not found if node[3] else found
        if op == "matches":
            found = isinstance(target, str) and re.search(node[2], target) is not None
            return not found if node[3] else found
        raise FilterError(f"unknown operator {op}")


def _select(item: Any, path: list[str]) -> Any:
    current = item
    for part in path:
        if isinstance(current, list):
            current = [_select(x, [part]) for x in current]
            current = [x for x in current if x is not _MISSING]
            continue
        if not isinstance(current, dict):
            return _MISSING
        if part in current:
            current = current[part]
            continue
        lowered = {k.lower(): k for k in current}
        if part.lower() not in lowered:
            return _MISSING
        current = current[lowered[part.lower()]]
    return current


def _filter_equal(target: Any, value: str) -> bool:
    if target is _MISSING or target is None:
        return value == ""
    if isinstance(target, bool):
        return value.lower() == str(target).lower()
    if isinstance(target, int | float):
        try:
            return float(value) == float(target)
        except ValueError:
            return False
    if isinstance(target, str):
        return target == value
    return False


def _filter_contains(target: Any, value: str) -> bool:
    if isinstance(target, dict):
        return value in target
    if isinstance(target, list):
        return any(_filter_equal(x, value) for x in target)
    if isinstance(target, str):
        return value in target
    return False


# ---------------------------------------------------------------------------------------------
# ACLs


LEVELS = {"deny": 0, "read": 1, "list": 1, "write": 2}
NAMED_RESOURCES = ("service", "node", "key", "agent", "session", "event", "query")
UNNAMED_RESOURCES = ("operator", "acl", "keyring", "mesh", "peering")


@dataclass
class Token:
    accessor_id: str
    secret_id: str
    description: str = ""
    management: bool = False
    # resource -> list of (name, is_prefix, level)
    rules: dict[str, list[tuple[str, bool, str]]] = field(default_factory=dict)


def parse_policy(policy: Any) -> tuple[bool, dict[str, list[tuple[str, bool, str]]]]:
    """Rules for :meth:`ConsulTestAgent.add_token`.

    ``"management"`` allows everything. A dict takes either the short form
    ``{"service_write": ["web"], "service_read": ["*"], "node_read": True, "key_read": ["app/*"]}``
    (a name ending in ``*`` is a prefix, ``"*"`` or ``True`` means all) or Consul's JSON rule form
    ``{"service_prefix": {"": {"policy": "read"}}, "key": {"cfg": {"policy": "write"}}, "operator": "read"}``.
    """
    if policy == "management":
        return True, {}
    if policy is None:
        return False, {}
    if not isinstance(policy, dict):
        raise ValueError("policy must be 'management' or a dict")
    rules: dict[str, list[tuple[str, bool, str]]] = {}

    def add(resource: str, name: str, prefix: bool, level: str) -> None:
        if level not in LEVELS:
            raise ValueError(f"unknown access level {level!r}")
        rules.setdefault(resource, []).append((name, prefix, level))

    for key, value in policy.items():
        short = re.fullmatch(r"(\w+?)_(read|write|deny|list)", key)
        if short and short.group(1) not in NAMED_RESOURCES + UNNAMED_RESOURCES:
            short = None
        if short:
            resource, level = short.group(1), short.group(2)
            if value is False:
                names = []
            elif value is True or resource in UNNAMED_RESOURCES:
                names = ["*"]
            else:
                names = value
            if isinstance(names, str):
                names = [names]
            for name in names:
                if name == "*":
                    add(resource, "", True, level)
                elif name.endswith("*"):
                    add(resource, name[:-1], True, level)
                else:
                    add(resource, name, False, level)
            continue
        if key in UNNAMED_RESOURCES:
            add(key, "", True, value if isinstance(value, str) else value.get("policy", "deny"))
            continue
        prefix = key.endswith("_prefix")
        resource = key.removesuffix("_prefix")
        if not isinstance(value, dict):
            raise ValueError(f"rule {key!r} must map names to {{'policy': level}}")
        for name, spec in value.items():
            add(resource, name, prefix, spec if isinstance(spec, str) else spec.get("policy", "deny"))
    return False, rules


class Authz:
    """The resolved permissions of one request."""

    def __init__(self, enabled: bool, token: Token | None) -> None:
        self.enabled = enabled
        self.token = token
        self.anonymous = token is None

    def allowed(self, resource: str, level: str, name: str = "") -> bool:
        if not self.enabled or (self.token is not None and self.token.management):
            return True
        rules = self.token.rules.get(resource, []) if self.token else []
        best: tuple[int, str] | None = None  # (specificity, level)
        for rule_name, prefix, rule_level in rules:
            if prefix and name.startswith(rule_name):
                rank = len(rule_name)
            elif not prefix and name == rule_name:
                rank = 1 << 30
            else:
                continue
            if best is None or rank > best[0] or (rank == best[0] and LEVELS[rule_level] > LEVELS[best[1]]):
                best = (rank, rule_level)
        if best is None or best[1] == "deny":
            return False
        return LEVELS[best[1]] >= LEVELS[level]

    def require(self, resource: str, level: str, name: str | None = None) -> None:
        if self.allowed(resource, level, name or ""):
            return
        if self.anonymous:
            who = "anonymous token"
        else:
            assert self.token is not None
            who = f"token with AccessorID '{self.token.accessor_id}'"
        text = f"Permission denied: {who} lacks permission '{resource}:{level}'"
        if name:
            text += f' on "{name}"'
        if self.anonymous:
            text += ". The anonymous token is used implicitly when a request does not specify a token."
        raise ConsulError(403, text)

    def can_read_service(self, name: str) -> bool:
        return self.allowed("service", "read", name)

    def can_read_node(self, name: str) -> bool:
        return self.allowed("node", "read", name)


# ---------------------------------------------------------------------------------------------
# State


@dataclass
class Node:
    id: str
    name: str
    address: str
    datacenter: str = DATACENTER
    tagged_addresses: dict[str, str] | None = None
    meta: dict[str, str] | None = None
    create_index: int = 0
    modify_index: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Node": self.name,
            "Address": self.address,
            "Datacenter": self.datacenter,
            "TaggedAddresses": self.tagged_addresses,
            "Meta": self.meta,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


def _default_proxy() -> dict[str, Any]:
    return {"Mode": "", "MeshGateway": {}, "Expose": {}}


@dataclass
class Service:
    node: str
    id: str
    name: str
    tags: list[str] = field(default_factory=list)
    address: str = ""
    port: int = 0
    meta: dict[str, str] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=lambda: {"Passing": 1, "Warning": 1})
    enable_tag_override: bool = False
    tagged_addresses: dict[str, dict[str, Any]] = field(default_factory=dict)
    kind: str = ""
    proxy: dict[str, Any] | None = None
    connect: dict[str, Any] = field(default_factory=dict)
    locality: dict[str, str] | None = None
    socket_path: str = ""
    local: bool = False  # registered through the agent API (shown by /v1/agent/services)
    sidecar_of: str = ""
    create_index: int = 0
    modify_index: int = 0

    def same_as(self, other: Service) -> bool:
        mine = dict(self.__dict__, create_index=0, modify_index=0)
        theirs = dict(other.__dict__, create_index=0, modify_index=0)
        return mine == theirs

    def agent_json(self, datacenter: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.kind:
            out["Kind"] = self.kind
        out.update(
            {
                "ID": self.id,
                "Service": self.name,
                "Tags": list(self.tags),
                "Meta": dict(self.meta),
                "Port": self.port,
                "Address": self.address,
            }
        )
        if self.socket_path:
            out["SocketPath"] = self.socket_path
        if self.tagged_addresses:
            out["TaggedAddresses"] = {k: dict(v) for k, v in self.tagged_addresses.items()}
        out["Weights"] = dict(self.weights)
        out["EnableTagOverride"] = self.enable_tag_override
        if self.kind and self.proxy is not None:
            out["Proxy"] = dict(self.proxy)
        if self.connect.get("Native"):
            out["Connect"] = {"Native": True}
        out["Datacenter"] = datacenter
        if self.locality:
            out["Locality"] = dict(self.locality)
        return out

    def catalog_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.kind:
            out["Kind"] = self.kind
        out.update(
            {
                "ID": self.id,
                "Service": self.name,
                "Tags": list(self.tags),
                "Address": self.address,
            }
        )
        if self.tagged_addresses:
            out["TaggedAddresses"] = {k: dict(v) for k, v in self.tagged_addresses.items()}
        out.update(
            {
                "Meta": dict(self.meta),
                "Port": self.port,
                "Weights": dict(self.weights),
                "EnableTagOverride": self.enable_tag_override,
                "Proxy": dict(self.proxy) if self.proxy is not None else _default_proxy(),
                "Connect": dict(self.connect),
            }
        )
        if self.socket_path:
            out["SocketPath"] = self.socket_path
        if self.locality:
            out["Locality"] = dict(self.locality)
        out["CreateIndex"] = self.create_index
        out["ModifyIndex"] = self.modify_index
        return out

    def service_node_json(self, node: Node) -> dict[str, Any]:
        out = {
            "ID": node.id,
            "Node": node.name,
            "Address": node.address,
            "Datacenter": node.datacenter,
            "TaggedAddresses": node.tagged_addresses,
            "NodeMeta": node.meta,
            "ServiceKind": self.kind,
            "ServiceID": self.id,
            "ServiceName": self.name,
            "ServiceTags": list(self.tags),
            "ServiceAddress": self.address,
            "ServiceWeights": dict(self.weights),
            "ServiceMeta": dict(self.meta),
            "ServicePort": self.port,
            "ServiceSocketPath": self.socket_path,
            "ServiceEnableTagOverride": self.enable_tag_override,
            "ServiceProxy": dict(self.proxy) if self.proxy is not None else _default_proxy(),
            "ServiceConnect": dict(self.connect),
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }
        if self.tagged_addresses:
            out["ServiceTaggedAddresses"] = {k: dict(v) for k, v in self.tagged_addresses.items()}
        if self.locality:
            out["ServiceLocality"] = dict(self.locality)
        return out


@dataclass
class CheckSpec:
    """What a check does (Consul's CheckType / CheckDefinition)."""

    check_id: str = ""
    name: str = ""
    notes: str = ""
    status: str = ""
    service_id: str = ""
    ttl: float = 0.0
    interval: float = 0.0
    timeout: float = 0.0
    deregister_after: float = 0.0
    http: str = ""
    method: str = ""
    header: dict[str, list[str]] = field(default_factory=dict)
    body: str = ""
    disable_redirects: bool = False
    tls_skip_verify: bool = False
    tcp: str = ""
    udp: str = ""
    script_args: list[str] = field(default_factory=list)
    docker_container_id: str = ""
    shell: str = ""
    grpc: str = ""
    h2ping: str = ""
    os_service: str = ""
    alias_service: str = ""
    alias_node: str = ""
    output_max_size: int = OUTPUT_MAX

    @classmethod
    def parse(cls, raw: Any, what: str) -> CheckSpec:
        f = Fields(raw, what)
        header = f.get("Header") or {}
        if not isinstance(header, dict) or not all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) for v in header.values()
        ):
            raise _decode_error(f"{what}.Header", "map[string][]string", header)
        return cls(
            check_id=f.text("CheckID", "ID"),
            name=f.text("Name"),
            notes=f.text("Notes"),
            status=f.text("Status"),
            service_id=f.text("ServiceID"),
            ttl=f.duration("TTL"),
            interval=f.duration("Interval"),
            timeout=f.duration("Timeout"),
            deregister_after=f.duration("DeregisterCriticalServiceAfter"),
            http=f.text("HTTP"),
            method=f.text("Method"),
            header={k: list(v) for k, v in header.items()},
            body=f.text("Body"),
            disable_redirects=f.flag("DisableRedirects"),
            tls_skip_verify=f.flag("TLSSkipVerify"),
            tcp=f.text("TCP"),
            udp=f.text("UDP"),
            script_args=f.str_list("Args", "ScriptArgs"),
            docker_container_id=f.text("DockerContainerID"),
            shell=f.text("Shell"),
            grpc=f.text("GRPC"),
            h2ping=f.text("H2PING"),
            os_service=f.text("OSService"),
            alias_service=f.text("AliasService"),
            alias_node=f.text("AliasNode"),
            output_max_size=f.integer("OutputMaxSize", default=OUTPUT_MAX) or OUTPUT_MAX,
        )

    @property
    def kind(self) -> str:
        if self.grpc:
            return "grpc"
        if self.http:
            return "http"
        if self.tcp:
            return "tcp"
        if self.udp:
            return "udp"
        if self.script_args and not self.docker_container_id:
            return "script"
        if self.ttl > 0:
            return "ttl"
        if self.docker_container_id:
            return "docker"
        if self.alias_service or self.alias_node:
            return "alias"
        if self.h2ping:
            return "h2ping"
        if self.os_service:
            return "os_service"
        return ""

    def empty(self) -> bool:
        return self == CheckSpec()

    def validate(self) -> None:
        interval_check = bool(
            (self.script_args and not self.docker_container_id)
            or self.http
            or self.tcp
            or self.udp
            or self.grpc
            or self.h2ping
            or self.os_service
        )
        alias = bool(self.alias_service or self.alias_node)
        if self.interval > 0 and self.ttl > 0:
            raise ValueError("Interval and TTL cannot both be specified")
        if interval_check and self.interval <= 0:
            raise ValueError("Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks")
        if interval_check and alias:
            raise ValueError("Interval cannot be set for Alias checks")
        if alias and self.ttl > 0:
            raise ValueError("TTL must be not set for Alias checks")
        if not interval_check and not alias and self.ttl <= 0:
            raise ValueError("TTL must be > 0 for TTL checks")
        if self.status and self.status not in STATUSES:
            raise ValueError("Status for checks must 'passing', 'warning', 'critical'")

    def definition(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in (
            ("HTTP", self.http),
            ("Header", self.header or None),
            ("Method", self.method),
            ("Body", self.body),
            ("DisableRedirects", self.disable_redirects),
            ("TLSSkipVerify", self.tls_skip_verify),
            ("TCP", self.tcp),
            ("UDP", self.udp),
            ("GRPC", self.grpc),
            ("H2PING", self.h2ping),
            ("OSService", self.os_service),
            ("ScriptArgs", self.script_args or None),
            ("DockerContainerID", self.docker_container_id),
            ("Shell", self.shell),
            ("AliasNode", self.alias_node),
            ("AliasService", self.alias_service),
        ):
            if value:
                out[key] = value
        out["Interval"] = format_duration(self.interval)
        out["Timeout"] = format_duration(self.timeout)
        out["DeregisterCriticalServiceAfter"] = format_duration(self.deregister_after)
        if self.ttl:
            out["TTL"] = format_duration(self.ttl)
        return out


@dataclass
class Check:
    node: str
    check_id: str
    name: str
    status: str = CRITICAL
    notes: str = ""
    output: str = ""
    service_id: str = ""
    service_name: str = ""
    service_tags: list[str] = field(default_factory=list)
    type: str = ""
    spec: CheckSpec | None = None
    local: bool = False
    critical_since: float | None = None
    last_output: str = ""  # a TTL check's last update, kept for "TTL expired (...)"
    runner: Any = None  # asyncio.Task or TimerHandle
    create_index: int = 0
    modify_index: int = 0

    def to_json(self, agent_view: bool = False) -> dict[str, Any]:
        spec = self.spec
        interval = format_duration(spec.interval) if spec and spec.interval else ""
        timeout = format_duration(spec.timeout) if spec and spec.timeout else ""
        return {
            "Node": self.node,
            "CheckID": self.check_id,
            "Name": self.name,
            "Status": self.status,
            "Notes": self.notes,
            "Output": self.output,
            "ServiceID": self.service_id,
            "ServiceName": self.service_name,
            "ServiceTags": list(self.service_tags),
            "Type": self.type,
            "Interval": interval,
            "Timeout": timeout,
            "ExposedPort": 0,
            "Definition": spec.definition() if spec else {},
            "CreateIndex": 0 if agent_view else self.create_index,
            "ModifyIndex": 0 if agent_view else self.modify_index,
        }


@dataclass
class KVEntry:
    key: str
    value: bytes
    flags: int = 0
    create_index: int = 0
    modify_index: int = 0
    lock_index: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "LockIndex": self.lock_index,
            "Key": self.key,
            "Flags": self.flags,
            "Value": base64.b64encode(self.value).decode("ascii") if self.value else None,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass
class Result:
    """One evaluation of a read endpoint."""

    index: int
    data: Any = None
    status: int = 200
    raw: bytes | None = None
    empty: bool = False
    filtered: bool = False
    headers: dict[str, str] = field(default_factory=dict)


class _Listener:
    """The API socket. Closing it really refuses connections and drops the open ones."""

    def __init__(self, server: web.Server, host: str, port: int) -> None:
        self.web_server = server
        self.host = host
        self.port = port
        self.server: asyncio.base_events.Server | None = None
        self.protocols: set[Any] = set()

    def _factory(self) -> Any:
        self.protocols = {p for p in self.protocols if getattr(p, "transport", None) is not None}
        protocol = self.web_server()
        self.protocols.add(protocol)
        return protocol

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        for attempt in range(50):
            try:
                self.server = await loop.create_server(
                    self._factory, self.host, self.port, reuse_address=True
                )
                break
            except OSError:
                if self.port == 0 or attempt == 49:
                    raise
                await asyncio.sleep(0.05)
        assert self.server is not None
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def is_open(self) -> bool:
        return self.server is not None

    async def close(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.close()
        for protocol in list(self.protocols):
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.abort()
            with contextlib.suppress(Exception):
                protocol.force_close()
        self.protocols.clear()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1)


Handler = Callable[[web.BaseRequest, str], Awaitable[web.StreamResponse]]
Route = tuple[tuple[str, ...], Handler]


class ConsulTestAgent:
    """The agent. Create and use it on one event loop; ``await start()`` then ``await stop()``."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        acl_token: str | None = None,
        node_name: str = "consul-test-agent",
        enable_script_checks: bool = False,
        self_aliases: Iterable[str] = (),
    ) -> None:
        self.host = host
        self.requested_port = port
        self.node_name = node_name
        self.node_id = str(uuid.uuid4())
        self.datacenter = DATACENTER
        self.acl_enabled = acl_token is not None
        self.management_token = acl_token
        self.enable_script_checks = enable_script_checks
        self.self_aliases = {a.lower() for a in self_aliases}
        self.fault = "none"
        self.tokens: dict[str, Token] = {}
        if acl_token is not None:
            self.tokens[acl_token] = Token(str(uuid.uuid4()), acl_token, "Initial Management Token", True)
        self.agent_tokens: dict[str, str] = {}
        self.left = asyncio.Event()
        self._listener: _Listener | None = None
        self._control: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._fault_changed = asyncio.Event()
        self._changed = asyncio.Event()
        self._epoch = 0
        self._background: set[asyncio.Task[Any]] = set()
        self._routes = self._build_routes()
        self._reset_state()
        self._bootstrap()

    def __repr__(self) -> str:
        services = sum(1 for s in self._services.values() if s.local)
        return (
            f"<ConsulTestAgent {self.host}:{self.port} [index {self._index}, {services} services, "
            f"{len(self._kv)} keys, fault {self.fault}, acl {'on' if self.acl_enabled else 'off'}]>"
        )

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._listener.port if self._listener else self.requested_port

    @property
    def index(self) -> int:
        return self._index

    async def start(self) -> None:
        server = web.Server(self._dispatch, handler_cancellation=True)
        self._listener = _Listener(server, self.host, self.requested_port)
        await self._listener.open()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(family=socket.AF_INET, force_close=True),
            auto_decompress=True,
        )
        self._reaper = asyncio.create_task(self._reap_loop())

    async def start_control(self, port: int = 0) -> int:
        """Serve the out-of-band control API (never affected by faults); returns its port."""
        app = web.Application()
        app.router.add_get("/state", self._control_state)
        app.router.add_put("/fault/{mode}", self._control_fault)
        app.router.add_put("/tokens", self._control_token)
        app.router.add_get("/health/{name}", self._control_health)
        self._control = web.AppRunner(app)
        await self._control.setup()
        site = web.TCPSite(self._control, self.host, port)
        await site.start()
        return int(self._control.addresses[0][1])

    async def stop(self) -> None:
        # Release hung requests first; their connections are dropped with the listener below.
        self.fault = "none"
        event, self._fault_changed = self._fault_changed, asyncio.Event()
        event.set()
        for check in self._checks.values():
            self._stop_runner(check)
        if self._reaper:
            self._reaper.cancel()
        for task in list(self._background):
            task.cancel()
        if self._listener:
            await self._listener.close()
            with contextlib.suppress(Exception):
                await self._listener.web_server.shutdown(0.1)
        if self._control:
            await self._control.cleanup()
        if self._session:
            await self._session.close()

    # -- faults -----------------------------------------------------------------------------

    async def set_fault(self, mode: str) -> None:
        """Switch a fault on (``refuse``, ``error500``, ``hang``), run one (``wipe``,
        ``reset_index``) or go back to normal (``none`` / ``clear``)."""
        if mode == "clear":
            mode = "none"
        if mode == "wipe":
            self.wipe()
            return
        if mode == "reset_index":
            self.reset_index()
            return
        if mode not in FAULTS:
            raise ValueError(f"unknown fault {mode!r}; expected one of {FAULTS + ONE_SHOT_FAULTS}")
        assert self._listener is not None
        self.fault = mode
        event, self._fault_changed = self._fault_changed, asyncio.Event()
        event.set()
        if mode == "refuse":
            await self._listener.close()
        elif not self._listener.is_open:
            self.left.clear()
            await self._listener.open()

    def wipe(self) -> None:
        """Forget services, checks, catalog entries and KV, as a restarted dev agent would.
        Tokens added with :meth:`add_token` stay. The index keeps rising."""
        for check in self._checks.values():
            self._stop_runner(check)
        index = self._index
        self._reset_state()
        self._index = index
        self._bootstrap()

    def reset_index(self) -> None:
        """Move the Raft index back to a low value, like restoring an old snapshot: every entity
        is re-stamped with the low index and blocked queries return at once."""
        base = RESET_INDEX_BASE
        self._index = base
        for entity in (
            *self._nodes.values(),
            *self._services.values(),
            *self._checks.values(),
            *self._kv.values(),
        ):
            entity.create_index = base
            entity.modify_index = base
        for name in self._tables:
            self._tables[name] = base
        for name in self._service_index:
            self._service_index[name] = base
        for key in self._tombstones:
            self._tombstones[key] = base
        self._epoch += 1
        self._notify()

    def add_token(self, secret: str | None = None, policy: Any = None, *, description: str = "") -> str:
        """Create an ACL token; returns its AccessorID. See :func:`parse_policy` for ``policy``."""
        management, rules = parse_policy(policy)
        secret = secret or str(uuid.uuid4())
        token = Token(str(uuid.uuid4()), secret, description, management, rules)
        self.tokens[secret] = token
        return token.accessor_id

    def remove_token(self, secret: str) -> None:
        self.tokens.pop(secret, None)

    # -- state ------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        self._index = 10
        self._tables = {"nodes": 0, "services": 0, "checks": 0, "kvs": 0, "tombstones": 0}
        self._service_index: dict[str, int] = {}
        self._nodes: dict[str, Node] = {}
        self._services: dict[tuple[str, str], Service] = {}
        self._checks: dict[tuple[str, str], Check] = {}
        self._kv: dict[str, KVEntry] = {}
        self._tombstones: dict[str, int] = {}

    def _bootstrap(self) -> None:
        index = self._next_index()
        lan = {"lan": "127.0.0.1", "lan_ipv4": "127.0.0.1", "wan": "127.0.0.1", "wan_ipv4": "127.0.0.1"}
        meta = {"consul-network-segment": "", "consul-version": VERSION}
        self._put_node(Node(self.node_id, self.node_name, "127.0.0.1", self.datacenter, lan, meta), index)
        consul = Service(
            node=self.node_name,
            id="consul",
            name="consul",
            port=8300,
            meta={
                "grpc_port": "8502",
                "grpc_tls_port": "8503",
                "non_voter": "false",
                "raft_version": "3",
                "read_replica": "false",
                "serf_protocol_current": "2",
                "serf_protocol_max": "5",
                "serf_protocol_min": "1",
                "version": VERSION,
            },
        )
        self._put_service(consul, index)
        serf = Check(
            node=self.node_name,
            check_id="serfHealth",
            name="Serf Health Status",
            status=PASSING,
            output="Agent alive and reachable",
        )
        self._put_check(serf, index)
        self._notify()

    def _next_index(self) -> int:
        self._index += 1
        return self._index

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def _touch_service(self, name: str, index: int) -> None:
        self._service_index[name] = index

    def _touch_node_services(self, node: str, index: int) -> None:
        for svc in self._services.values():
            if svc.node == node:
                self._touch_service(svc.name, index)

    def _put_node(self, node: Node, index: int) -> None:
        old = self._nodes.get(node.name)
        node.create_index = old.create_index if old else index
        node.modify_index = index
        self._nodes[node.name] = node
        self._tables["nodes"] = index
        self._touch_node_services(node.name, index)

    def _put_service(self, svc: Service, index: int) -> bool:
        key = (svc.node, svc.id)
        old = self._services.get(key)
        if old is not None and old.same_as(svc):
            return False
        svc.create_index = old.create_index if old else index
        svc.modify_index = index
        self._services[key] = svc
        self._tables["services"] = index
        self._touch_service(svc.name, index)
        if old is not None and old.name != svc.name:
            self._touch_service(old.name, index)
        for check in self._checks.values():
            if check.node == svc.node and check.service_id == svc.id:
                check.service_name = svc.name
                check.service_tags = list(svc.tags)
        return True

    def _put_check(self, check: Check, index: int) -> None:
        key = (check.node, check.check_id)
        old = self._checks.get(key)
        check.create_index = old.create_index if old else index
        check.modify_index = index
        if check.status == CRITICAL:
            check.critical_since = old.critical_since if old and old.critical_since else time.monotonic()
        else:
            check.critical_since = None
        self._checks[key] = check
        self._tables["checks"] = index
        self._touch_check_services(check, index)

    def _touch_check_services(self, check: Check, index: int) -> None:
        if check.service_id:
            svc = self._services.get((check.node, check.service_id))
            if svc:
                self._touch_service(svc.name, index)
        else:
            self._touch_node_services(check.node, index)

    def _delete_check(self, key: tuple[str, str], index: int) -> None:
        check = self._checks.pop(key, None)
        if check is None:
            return
        self._stop_runner(check)
        self._tables["checks"] = index
        self._touch_check_services(check, index)

    def _delete_service(self, key: tuple[str, str], index: int) -> None:
        svc = self._services.pop(key, None)
        if svc is None:
            return
        for check_key, check in list(self._checks.items()):
            if check.node == svc.node and check.service_id == svc.id:
                self._delete_check(check_key, index)
        self._tables["services"] = index
        self._touch_service(svc.name, index)

    def _set_status(self, check: Check, status: str, output: str) -> None:
        """A check result: writes (and bumps indexes) only when status or output changed."""
        if check.status == status and check.output == output:
            return
        key = (check.node, check.check_id)
        if self._checks.get(key) is not check:
            return
        check.status = status
        check.output = output
        index = self._next_index()
        self._put_check(check, index)
        self._notify()

    def local_services(self) -> dict[str, Service]:
        return {s.id: s for s in self._services.values() if s.local and s.node == self.node_name}

    def local_checks(self) -> dict[str, Check]:
        return {c.check_id: c for c in self._checks.values() if c.local and c.node == self.node_name}

    def node_checks(self, node: str) -> list[Check]:
        return sorted(
            (c for c in self._checks.values() if c.node == node and not c.service_id),
            key=lambda c: c.check_id,
        )

    def service_checks(self, svc: Service) -> list[Check]:
        return sorted(
            (c for c in self._checks.values() if c.node == svc.node and c.service_id == svc.id),
            key=lambda c: c.check_id,
        )

    def instances(self, name: str) -> list[Service]:
        return sorted((s for s in self._services.values() if s.name == name), key=lambda s: (s.node, s.id))

    def service_entry(self, svc: Service) -> dict[str, Any]:
        checks = self.node_checks(svc.node) + self.service_checks(svc)
        return {
            "Node": self._nodes[svc.node].to_json(),
            "Service": svc.catalog_json(),
            "Checks": [c.to_json() for c in checks],
        }

    # Plain views for test code (no ACLs, no faults).

    def services_view(self) -> dict[str, Any]:
        return {sid: svc.agent_json(self.datacenter) for sid, svc in sorted(self.local_services().items())}

    def checks_view(self) -> dict[str, Any]:
        return {cid: c.to_json(agent_view=True) for cid, c in sorted(self.local_checks().items())}

    def health_view(self, name: str, passing: bool = False) -> list[dict[str, Any]]:
        entries = [self.service_entry(s) for s in self.instances(name)]
        if passing:
            entries = [e for e in entries if all(c["Status"] == PASSING for c in e["Checks"])]
        return entries

    def kv_view(self) -> dict[str, bytes]:
        return {k: e.value for k, e in sorted(self._kv.items())}

    # -- check runners -----------------------------------------------------------------------

    def _start_runner(self, check: Check) -> None:
        self._stop_runner(check)
        spec = check.spec
        if spec is None:
            return
        key = (check.node, check.check_id)
        loop = asyncio.get_running_loop()
        if spec.kind == "ttl":
            check.runner = loop.call_later(spec.ttl, self._ttl_expired, key, check)
        elif spec.kind in ("http", "tcp") or (spec.kind == "script" and self.enable_script_checks):
            check.runner = loop.create_task(self._interval_loop(key, check))

    @staticmethod
    def _stop_runner(check: Check) -> None:
        if check.runner is not None:
            check.runner.cancel()
            check.runner = None

    def _ttl_expired(self, key: tuple[str, str], check: Check) -> None:
        check.runner = None
        if self._checks.get(key) is not check:
            return
        output = "TTL expired"
        if check.last_output:
            output += f" (last output before timeout follows): {check.last_output}"
        self._set_status(check, CRITICAL, output)

    def update_ttl(self, check_id: str, status: str, output: str) -> None:
        check = self.local_checks().get(check_id)
        if check is None or check.spec is None or check.spec.kind != "ttl":
            raise ConsulError(500, f'CheckID "{check_id}" does not have associated TTL')
        limit = check.spec.output_max_size
        if len(output) > limit:
            output = f"{output[:limit]} ... (captured {limit} of {len(output)} bytes)"
        check.last_output = output
        self._stop_runner(check)
        self._set_status(check, status, output)
        check.runner = asyncio.get_running_loop().call_later(
            check.spec.ttl, self._ttl_expired, (check.node, check.check_id), check
        )

    async def _interval_loop(self, key: tuple[str, str], check: Check) -> None:
        spec = check.spec
        assert spec is not None
        interval = max(spec.interval, 0.01)
        while self._checks.get(key) is check:
            if spec.kind == "http":
                status, output = await self._probe_http(spec)
            elif spec.kind == "tcp":
                status, output = await self._probe_tcp(spec)
            else:
                status, output = await self._probe_script(spec)
            if self._checks.get(key) is not check:
                return
            self._set_status(check, status, output)
            await asyncio.sleep(interval)

    def _resolve_target(self, host: str, port: int) -> tuple[str, int] | None:
        if f"{host}:{port}".lower() in self.self_aliases:
            return "127.0.0.1", self.port
        if _is_loopback(host):
            return ("127.0.0.1" if host.lower() == "localhost" else host.strip("[]")), port
        return None

    async def _probe_http(self, spec: CheckSpec) -> tuple[str, str]:
        method = spec.method or "GET"
        url = spec.http
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            host = parts.hostname or ""
        except ValueError as exc:
            return CRITICAL, f"{method} {url}: {exc}"
        target = self._resolve_target(host, port)
        if target is None:
            return CRITICAL, (
                f'{method} "{url}": dial tcp {host}:{port}: '
                "the Consul test agent only dials loopback addresses"
            )
        actual = urlunsplit((parts.scheme, f"{target[0]}:{target[1]}", parts.path, parts.query, ""))
        headers = {"User-Agent": "Consul Health Check", "Accept": "text/plain, text/*, */*"}
        for name, values in spec.header.items():
            if values:
                headers[name] = values[0]
        timeout = aiohttp.ClientTimeout(total=spec.timeout or 10.0)
        assert self._session is not None
        try:
            async with self._session.request(
                method,
                actual,
                headers=headers,
                data=spec.body or None,
                timeout=timeout,
                allow_redirects=not spec.disable_redirects,
                ssl=False if spec.tls_skip_verify else None,
            ) as resp:
                body = await resp.content.read(spec.output_max_size)
                text = body.decode("utf-8", "replace")
                output = f"HTTP {method} {url}: {resp.status} {resp.reason} Output: {text}"
                if 200 <= resp.status < 300:
                    return PASSING, output
                if resp.status == 429:
                    return WARNING, output
                return CRITICAL, output
        except TimeoutError:
            return CRITICAL, (
                f'{method} "{url}": context deadline exceeded '
                "(Client.Timeout exceeded while awaiting headers)"
            )
        except aiohttp.ClientConnectorError:
            return CRITICAL, f'{method} "{url}": dial tcp {host}:{port}: connect: connection refused'
        except (aiohttp.ClientError, OSError) as exc:
            return CRITICAL, f'{method} "{url}": {exc or type(exc).__name__}'

    async def _probe_tcp(self, spec: CheckSpec) -> tuple[str, str]:
        host, _, port_text = spec.tcp.rpartition(":")
        try:
            port = int(port_text)
        except ValueError:
            return CRITICAL, f"dial tcp: address {spec.tcp}: missing port in address"
        target = self._resolve_target(host, port)
        if target is None:
            return CRITICAL, f"dial tcp {spec.tcp}: the Consul test agent only dials loopback addresses"
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(*target), spec.timeout or 10.0)
        except TimeoutError:
            return CRITICAL, f"dial tcp {spec.tcp}: i/o timeout"
        except OSError:
            return CRITICAL, f"dial tcp {spec.tcp}: connect: connection refused"
        writer.close()
        return PASSING, f"TCP connect {spec.tcp}: Success"

    async def _probe_script(self, spec: CheckSpec) -> tuple[str, str]:
        try:
            proc = await asyncio.create_subprocess_exec(
                *spec.script_args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
        except OSError as exc:
            return CRITICAL, f"Failed to exec: {exc}"
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), spec.timeout or 30.0)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return CRITICAL, "Timed out running check"
        text = out[: spec.output_max_size].decode("utf-8", "replace")
        if proc.returncode == 0:
            return PASSING, text
        if proc.returncode == 1:
            return WARNING, text
        return CRITICAL, text

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            now = time.monotonic()
            for check in list(self.local_checks().values()):
                spec = check.spec
                if not (spec and spec.deregister_after and check.service_id):
                    continue
                if check.status == CRITICAL and check.critical_since is not None:
                    if now - check.critical_since >= spec.deregister_after:
                        self.deregister_service(check.service_id)

    # -- agent operations (shared by HTTP handlers and tests) ------------------------------------

    def deregister_service(self, service_id: str) -> bool:
        svc = self.local_services().get(service_id)
        if svc is None:
            return False
        index = self._next_index()
        for sidecar in [s for s in self.local_services().values() if s.sidecar_of == service_id]:
            self._delete_service((sidecar.node, sidecar.id), index)
        self._delete_service((svc.node, svc.id), index)
        self._notify()
        return True

    # -- HTTP plumbing ---------------------------------------------------------------------------

    def _build_routes(self) -> tuple[dict[str, Route], list[tuple[str, tuple[str, ...], Handler]]]:
        exact: dict[str, Route] = {
            "/v1/agent/self": (("GET",), self.h_agent_self),
            "/v1/agent/members": (("GET",), self.h_agent_members),
            "/v1/agent/services": (("GET",), self.h_agent_services),
            "/v1/agent/checks": (("GET",), self.h_agent_checks),
            "/v1/agent/service/register": (("PUT",), self.h_service_register),
            "/v1/agent/check/register": (("PUT",), self.h_check_register),
            "/v1/agent/maintenance": (("PUT",), self.h_node_maintenance),
            "/v1/agent/reload": (("PUT",), self.h_agent_reload),
            "/v1/agent/leave": (("PUT",), self.h_agent_leave),
            "/v1/agent/metrics": (("GET",), self.h_agent_metrics),
            "/v1/agent/monitor": (("GET",), self.h_agent_monitor),
            "/v1/agent/host": (("GET",), self.h_agent_host),
            "/v1/catalog/register": (("PUT",), self.h_catalog_register),
            "/v1/catalog/deregister": (("PUT",), self.h_catalog_deregister),
            "/v1/catalog/datacenters": (("GET",), self.h_catalog_datacenters),
            "/v1/catalog/nodes": (("GET",), self.h_catalog_nodes),
            "/v1/catalog/services": (("GET",), self.h_catalog_services),
            "/v1/status/leader": (("GET",), self.h_status_leader),
            "/v1/status/peers": (("GET",), self.h_status_peers),
            "/v1/acl/token/self": (("GET",), self.h_acl_token_self),
            "/": (("GET",), self.h_root),
            "/ui/": (("GET",), self.h_ui),
        }
        prefixes: list[tuple[str, tuple[str, ...], Handler]] = [
            ("/v1/agent/service/deregister/", ("PUT",), self.h_service_deregister),
            ("/v1/agent/service/maintenance/", ("PUT",), self.h_service_maintenance),
            ("/v1/agent/service/", ("GET",), self.h_agent_service),
            ("/v1/agent/check/deregister/", ("PUT",), self.h_check_deregister),
            ("/v1/agent/check/pass/", ("PUT",), self.h_check_pass),
            ("/v1/agent/check/warn/", ("PUT",), self.h_check_warn),
            ("/v1/agent/check/fail/", ("PUT",), self.h_check_fail),
            ("/v1/agent/check/update/", ("PUT",), self.h_check_update),
            ("/v1/agent/health/service/id/", ("GET",), self.h_agent_health_id),
            ("/v1/agent/health/service/name/", ("GET",), self.h_agent_health_name),
            ("/v1/agent/force-leave/", ("PUT",), self.h_force_leave),
            ("/v1/agent/token/", ("PUT",), self.h_agent_token),
            ("/v1/catalog/service/", ("GET",), self.h_catalog_service),
            ("/v1/catalog/connect/", ("GET",), self.h_catalog_connect),
            ("/v1/catalog/node/", ("GET",), self.h_catalog_node),
            ("/v1/catalog/gateway-services/", ("GET",), self.h_catalog_gateway_services),
            ("/v1/health/service/", ("GET",), self.h_health_service),
            ("/v1/health/connect/", ("GET",), self.h_health_connect),
            ("/v1/health/ingress/", ("GET",), self.h_health_ingress),
            ("/v1/health/checks/", ("GET",), self.h_health_checks),
            ("/v1/health/node/", ("GET",), self.h_health_node),
            ("/v1/health/state/", ("GET",), self.h_health_state),
            ("/v1/kv/", ("GET", "PUT", "DELETE"), self.h_kv),
            ("/ui/", ("GET",), self.h_ui),
        ]
        return exact, prefixes

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.fault == "hang":
            while self.fault == "hang":
                await self._fault_changed.wait()
        if self.fault == "error500":
            return _text(500, ERROR500_BODY)
        exact, prefixes = self._routes
        path = request.path
        route = exact.get(path)
        rest = ""
        if route is None:
            for prefix, methods, handler in prefixes:
                if path.startswith(prefix):
                    route, rest = (methods, handler), path[len(prefix) :]
                    break
        if route is None:
            return _text(404, "404 page not found\n")
        methods, handler = route
        if request.method == "OPTIONS":
            return web.Response(status=200, headers={"Allow": ",".join((*methods, "OPTIONS"))})
        if request.method not in methods:
            return _text(405, f"method {request.method} not allowed")
        try:
            return await handler(request, rest)
        except ConsulError as exc:
            return _text(exc.status, exc.text)

    def _authz(self, request: web.BaseRequest) -> tuple[Authz, str]:
        secret = request.query.get("token", "") or request.headers.get("X-Consul-Token", "")
        if not secret:
            parts = request.headers.get("Authorization", "").split(" ")
            if len(parts) > 1 and parts[0] == "Bearer":
                secret = " ".join(parts[1:]).strip().split(" ")[0]
        if not self.acl_enabled:
            return Authz(False, None), secret
        if not secret or secret == "anonymous":
            return Authz(True, None), ""
        token = self.tokens.get(secret)
        if token is None:
            raise ConsulError(403, "ACL not found")
        return Authz(True, token), secret

    def _check_dc(self, dc: str | None) -> None:
        if dc and dc != self.datacenter:
            raise ConsulError(500, "No path to datacenter")

    async def _body(self, request: web.BaseRequest, *, required: bool = True) -> Any:
        raw = await request.read()
        if not raw.strip():
            if required:
                raise ConsulError(400, "Request decode failed: EOF")
            return None
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ConsulError(400, f"Request decode failed: {exc}") from None

    def _filter(self, request: web.BaseRequest, *, agent_local: bool = False) -> Filter | None:
        text = request.query.get("filter", "")
        if not text:
            return None
        try:
            return Filter(text)
        except FilterError as exc:
            if agent_local:
                raise ConsulError(500, f"Failed to create boolean expression evaluator: {exc}") from None
            raise ConsulError(400, f"Failed to create boolean expression evaluator: {exc}") from None

    def _meta_headers(self, index: int, filtered: bool = False, token: str = "") -> dict[str, str]:
        headers = {
            "X-Consul-Index": str(max(1, index)),
            "X-Consul-KnownLeader": "true",
            "X-Consul-LastContact": "0",
            "X-Consul-Effective-Consistency": "leader",
        }
        if self.acl_enabled:
            headers["X-Consul-Default-ACL-Policy"] = "deny"
        else:
            headers["X-Consul-Default-ACL-Policy"] = "allow"
        if token and filtered:
            headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
        return headers

    async def _query(
        self, request: web.BaseRequest, compute: Callable[[], Result], token: str = ""
    ) -> web.StreamResponse:
        """Run a read endpoint as a Consul blocking query (``?index=`` + ``?wait=``)."""
        query = request.query
        if "stale" in query and "consistent" in query:
            raise ConsulError(400, "Cannot specify ?stale with ?consistent, conflicting semantics.")
        wait = DEFAULT_WAIT
        if query.get("wait"):
            try:
                wait = parse_duration(query["wait"])
            except ValueError:
                raise ConsulError(400, "Invalid wait time") from None
        min_index = 0
        if query.get("index"):
            try:
                min_index = int(query["index"])
                if min_index < 0:
                    raise ValueError
            except ValueError:
                raise ConsulError(400, "Invalid index") from None
        wait = min(max(wait, 0.0), MAX_WAIT) or DEFAULT_WAIT
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait + random.uniform(0, wait / 16)
        epoch = self._epoch
        seen_empty = False
        while True:
            changed = self._changed
            result = compute()
            if min_index == 0 or self._epoch != epoch:
                break
            if result.empty:
                if seen_empty:
                    min_index = max(min_index, result.index)
                seen_empty = True
            if result.index > min_index:
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                result = compute()
                break
        headers = self._meta_headers(result.index, result.filtered, token)
        headers.update(result.headers)
        if result.raw is not None:
            return web.Response(status=result.status, body=result.raw, headers=headers)
        if result.status == 404:
            return web.Response(status=404, headers=headers)
        return _json(result.data, headers=headers, status=result.status)

    # -- /v1/agent ------------------------------------------------------------------------------

    def _member(self, wan: bool = False) -> dict[str, Any]:
        return {
            "Name": f"{self.node_name}.{self.datacenter}" if wan else self.node_name,
            "Addr": "127.0.0.1",
            "Port": 8302 if wan else 8301,
            "Tags": {
                "acls": "1" if self.acl_enabled else "0",
                "build": f"{VERSION}:00000000",
                "dc": self.datacenter,
                "ft_fs": "1",
                "ft_si": "1",
                "grpc_port": "8502",
                "id": self.node_id,
                "port": "8300",
                "raft_vsn": "3",
                "role": "consul",
                "segment": "",
                "vsn": "2",
                "vsn_max": "3",
                "vsn_min": "2",
                "wan_join_port": "8302",
            },
            "Status": 1,
            "ProtocolMin": 1,
            "ProtocolMax": 5,
            "ProtocolCur": 2,
            "DelegateMin": 2,
            "DelegateMax": 5,
            "DelegateCur": 4,
        }

    async def h_agent_self(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        authz, _secret = self._authz(request)
        authz.require("agent", "read", self.node_name)
        body = {
            "Config": {
                "Datacenter": self.datacenter,
                "PrimaryDatacenter": self.datacenter,
                "NodeName": self.node_name,
                "NodeID": self.node_id,
                "Revision": "00000000",
                "Server": True,
                "Version": VERSION,
                "BuildDate": "2025-01-01T00:00:00Z",
            },
            "DebugConfig": {
                "ACLsEnabled": self.acl_enabled,
                "Datacenter": self.datacenter,
                "DevMode": True,
                "EnableScriptChecks": self.enable_script_checks,
                "NodeName": self.node_name,
                "ServerMode": True,
                "Version": VERSION,
            },
            "Coord": {"Vec": [0.0] * 8, "Error": 1.5, "Adjustment": 0.0, "Height": 1e-05},
            "Member": self._member(),
            "Stats": {
                "agent": {
                    "check_monitors": "0",
                    "check_ttls": str(sum(1 for c in self.local_checks().values() if c.type == "ttl")),
                    "checks": str(len(self.local_checks())),
                    "services": str(len(self.local_services())),
                },
                "build": {"prerelease": "", "revision": "00000000", "version": VERSION},
                "consul": {
                    "acl": "enabled" if self.acl_enabled else "disabled",
                    "bootstrap": "true",
                    "known_datacenters": "1",
                    "leader": "true",
                    "leader_addr": SERVER_ADDR,
                    "server": "true",
                },
                "raft": {
                    "applied_index": str(self._index),
                    "commit_index": str(self._index),
                    "state": "Leader",
                },
                "runtime": {"arch": "amd64", "os": "linux", "version": "go1.23"},
                "serf_lan": {"members": "1"},
                "serf_wan": {"members": "1"},
            },
            "Meta": {"consul-network-segment": "", "consul-version": VERSION},
            "xDS": {
                "SupportedProxies": {"envoy": ["1.33.0", "1.32.3"]},
                "Port": 8502,
                "Ports": {"Plaintext": 8502, "TLS": -1},
            },
        }
        return _json(body)

    async def h_agent_members(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        authz, secret = self._authz(request)
        wan = bool(request.query.get("wan"))
        if wan and request.query.get("segment", "") not in ("", "_all"):
            raise ConsulError(400, "Cannot provide a segment with wan=true")
        members = [self._member(wan)]
        visible = [m for m in members if authz.allowed("node", "read", self.node_name)]
        headers = {}
        if secret and len(visible) != len(members):
            headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
        return _json(visible, headers=headers)

    async def h_agent_services(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        authz, secret = self._authz(request)
        filt = self._filter(request, agent_local=True)
        services = self.services_view()
        if filt:
            services = {k: v for k, v in services.items() if filt.matches(v)}
        visible = {k: v for k, v in services.items() if authz.can_read_service(v["Service"])}
        headers = {}
        if secret and len(visible) != len(services):
            headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
        return _json(visible, headers=headers)

    async def h_agent_service(self, request: web.BaseRequest, service_id: str) -> web.StreamResponse:
        authz, _secret = self._authz(request)
        wait = DEFAULT_WAIT
        if request.query.get("wait"):
            try:
                wait = min(parse_duration(request.query["wait"]), MAX_WAIT)
            except ValueError:
                raise ConsulError(400, "Invalid wait time") from None
        want = request.query.get("hash", "")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait + random.uniform(0, wait / 16)
        while True:
            changed = self._changed
            svc = self.local_services().get(service_id)
            if svc is None:
                raise ConsulError(404, f"unknown service ID: {service_id}")
            authz.require("service", "read", svc.name)
            body = svc.agent_json(self.datacenter)
            digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
            body["ContentHash"] = digest
            remaining = deadline - loop.time()
            if not want or want != digest or remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        return _json(body, headers={"X-Consul-ContentHash": digest})

    async def h_agent_checks(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        authz, secret = self._authz(request)
        filt = self._filter(request, agent_local=True)
        checks = self.checks_view()
        if filt:
            checks = {k: v for k, v in checks.items() if filt.matches(v)}
        visible = {
            k: v
            for k, v in checks.items()
            if (
                authz.can_read_service(v["ServiceName"]) if v["ServiceID"] else authz.can_read_node(v["Node"])
            )
        }
        headers = {}
        if secret and len(visible) != len(checks):
            headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
        return _json(visible, headers=headers)

    def _parse_service(self, raw: Any) -> tuple[Service, list[CheckSpec], dict[str, Any] | None]:
        f = Fields(raw, "ServiceDefinition")
        name = f.text("Name")
        if not name:
            raise ConsulError(400, "Missing service name")
        address = f.text("Address")
        if address in ("0.0.0.0", "::", "[::]"):
            raise ConsulError(400, "Invalid service address")
        tagged: dict[str, dict[str, Any]] = {}
        raw_tagged = f.get("TaggedAddresses") or {}
        if not isinstance(raw_tagged, dict):
            raise _decode_error(
                "ServiceDefinition.TaggedAddresses", "map[string]structs.ServiceAddress", raw_tagged
            )
        for tag, value in raw_tagged.items():
            tf = Fields(value, f"ServiceDefinition.TaggedAddresses[{tag}]")
            tagged[tag] = {"Address": tf.text("Address"), "Port": tf.integer("Port")}
        weights = {"Passing": 1, "Warning": 1}
        if f.get("Weights") is not None:
            wf = Fields(f.get("Weights"), "ServiceDefinition.Weights")
            weights = {"Passing": wf.integer("Passing"), "Warning": wf.integer("Warning")}
            if weights["Passing"] <= 0:
                raise ConsulError(400, "Invalid Weights: Passing must be greater than 0")
        meta = f.str_map("Meta")
        _validate_meta(meta)
        kind = f.text("Kind")
        proxy = None
        if f.get("Proxy") is not None or kind:
            pf = Fields(f.get("Proxy"), "ServiceDefinition.Proxy")
            proxy = _default_proxy()
            proxy.update(
                {
                    "DestinationServiceName": pf.text("DestinationServiceName"),
                    "DestinationServiceID": pf.text("DestinationServiceID"),
                    "LocalServiceAddress": pf.text("LocalServiceAddress"),
                    "LocalServicePort": pf.integer("LocalServicePort"),
                }
            )
            for key, value in pf.raw.items():
                if _canon(key) not in {_canon(k) for k in proxy}:
                    proxy[key] = value
            proxy = {k: v for k, v in proxy.items() if v not in ("", 0) or k in ("Mode",)}
        connect_raw = f.get("Connect")
        connect: dict[str, Any] = {}
        sidecar: dict[str, Any] | None = None
        if connect_raw is not None:
            cf = Fields(connect_raw, "ServiceDefinition.Connect")
            if cf.flag("Native"):
                connect["Native"] = True
            if cf.get("SidecarService") is not None:
                sidecar = cf.get("SidecarService")
                if not isinstance(sidecar, dict):
                    raise _decode_error(
                        "ServiceDefinition.Connect.SidecarService", "structs.ServiceDefinition", sidecar
                    )
        locality = None
        if f.get("Locality") is not None:
            lf = Fields(f.get("Locality"), "ServiceDefinition.Locality")
            locality = {"Region": lf.text("Region"), "Zone": lf.text("Zone")}
        svc = Service(
            node=self.node_name,
            id=f.text("ID") or name,
            name=name,
            tags=f.str_list("Tags"),
            address=address,
            port=f.integer("Port"),
            meta=meta,
            weights=weights,
            enable_tag_override=f.flag("EnableTagOverride"),
            tagged_addresses=tagged,
            kind=kind,
            proxy=proxy,
            connect=connect,
            locality=locality,
            socket_path=f.text("SocketPath"),
            local=True,
        )
        if kind == "connect-proxy":
            if not svc.port and not svc.socket_path:
                raise ConsulError(
                    400, "Validation failed: Port or SocketPath must be set for a connect-proxy"
                )
            if not (proxy or {}).get("DestinationServiceName"):
                raise ConsulError(400, "Validation failed: Proxy.DestinationServiceName must be set")
        specs: list[CheckSpec] = []
        raw_checks: list[Any] = []
        if f.get("Check") is not None:
            raw_checks.append(f.get("Check"))
        extra = f.get("Checks")
        if extra is not None:
            if not isinstance(extra, list):
                raise _decode_error("ServiceDefinition.Checks", "structs.CheckTypes", extra)
            raw_checks.extend(extra)
        for i, raw_check in enumerate(raw_checks):
            spec = CheckSpec.parse(raw_check, f"ServiceDefinition.Checks[{i}]")
            if spec.empty():
                continue
            try:
                spec.validate()
            except ValueError as exc:
                if "Status for checks" in str(exc):
                    raise ConsulError(400, str(exc)) from None
                raise ConsulError(400, f"Invalid check: {exc}") from None
            specs.append(spec)
        return svc, specs, sidecar

    async def h_service_register(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        raw = await self._body(request)
        authz, _secret = self._authz(request)
        svc, specs, sidecar_raw = self._parse_service(raw)
        authz.require("service", "write", svc.name)
        existing = self.local_services().get(svc.id)
        if existing is not None and existing.name != svc.name:
            authz.require("service", "write", existing.name)
        if any(s.script_args for s in specs) and not self.enable_script_checks:
            raise ConsulError(
                500, "Scripts are disabled on this agent; to enable, configure 'enable_script_checks' to true"
            )
        sidecar = None
        if sidecar_raw is not None:
            sidecar = self._sidecar_for(svc, sidecar_raw)
            authz.require("service", "write", sidecar[0].name)
        replace = request.query.get("replace-existing-checks")
        self.register_service(
            svc,
            specs,
            replace_existing_checks="replace-existing-checks" in request.query and replace in ("", "true"),
        )
        if sidecar is not None:
            self.register_service(sidecar[0], sidecar[1], replace_existing_checks=False)
        return _empty()

    def _sidecar_for(self, parent: Service, raw: dict[str, Any]) -> tuple[Service, list[CheckSpec]]:
        defaults = {"Name": f"{parent.name}-sidecar-proxy", "ID": f"{parent.id}-sidecar-proxy"}
        merged = {**defaults, **{k: v for k, v in raw.items()}}
        f = Fields(merged, "SidecarService")
        port = f.integer("Port")
        if not port:
            used = {s.port for s in self._services.values() if s.node == self.node_name}
            port = next(p for p in range(21000, 21256) if p not in used)
        merged.setdefault("Kind", "connect-proxy")
        merged["Port"] = port
        proxy = dict(Fields(merged.get("Proxy"), "Proxy").raw)
        proxy.setdefault("DestinationServiceName", parent.name)
        proxy.setdefault("DestinationServiceID", parent.id)
        proxy.setdefault("LocalServiceAddress", "127.0.0.1")
        if parent.port:
            proxy.setdefault("LocalServicePort", parent.port)
        merged["Proxy"] = proxy
        if not f.has("Tags"):
            merged["Tags"] = list(parent.tags)
        if not f.has("Meta"):
            merged["Meta"] = dict(parent.meta)
        svc, specs, _ = self._parse_service(merged)
        svc.sidecar_of = parent.id
        if not specs:
            specs = [
                CheckSpec(name="Connect Sidecar Listening", tcp=f"127.0.0.1:{port}", interval=10.0),
                CheckSpec(name="Connect Sidecar Aliasing " + parent.id, alias_service=parent.id),
            ]
        return svc, specs

    def register_service(
        self, svc: Service, specs: list[CheckSpec], *, replace_existing_checks: bool = False
    ) -> None:
        index = self._next_index()
        self._put_service(svc, index)
        wanted: set[str] = set()
        for i, spec in enumerate(specs):
            check_id = spec.check_id
            if not check_id:
                check_id = f"service:{svc.id}"
                if len(specs) > 1:
                    check_id += f":{i + 1}"
            wanted.add(check_id)
            check = Check(
                node=self.node_name,
                check_id=check_id,
                name=spec.name or f"Service '{svc.name}' check",
                status=spec.status or CRITICAL,
                notes=spec.notes,
                service_id=svc.id,
                service_name=svc.name,
                service_tags=list(svc.tags),
                type=spec.kind,
                spec=spec,
                local=True,
            )
            self._add_check(check, index)
        if replace_existing_checks:
            for key, check in list(self._checks.items()):
                if (
                    check.node == self.node_name
                    and check.service_id == svc.id
                    and check.check_id not in wanted
                    and not check.check_id.startswith(SERVICE_MAINT_PREFIX)
                ):
                    self._delete_check(key, index)
        self._notify()

    def _add_check(self, check: Check, index: int) -> None:
        """Add or replace a local check, keeping the status and output of one it replaces."""
        key = (check.node, check.check_id)
        old = self._checks.get(key)
        if old is not None:
            self._stop_runner(old)
            check.status, check.output = old.status, old.output
            check.last_output = old.last_output
        self._put_check(check, index)
        self._start_runner(check)

    async def h_service_deregister(self, request: web.BaseRequest, service_id: str) -> web.StreamResponse:
        authz, _secret = self._authz(request)
        svc = self.local_services().get(service_id)
        if svc is None:
            raise ConsulError(
                404,
                f'Unknown service ID "{service_id}". '
                "Ensure that the service ID is passed, not the service name.",
            )
        authz.require("service", "write", svc.name)
        self.deregister_service(service_id)
        return _empty()

    def _enable_param(self, request: web.BaseRequest) -> bool:
        if "enable" not in request.query:
            raise ConsulError(400, "Missing value for enable")
        raw = request.query["enable"]
        value = _parse_go_bool(raw)
        if value is None:
            raise ConsulError(400, f'Invalid value for enable: "{raw}"')
        return value

    async def h_service_maintenance(self, request: web.BaseRequest, service_id: str) -> web.StreamResponse:
        if not service_id:
            raise ConsulError(400, "Missing service ID")
        enable = self._enable_param(request)
        authz, _secret = self._authz(request)
        svc = self.local_services().get(service_id)
        if svc is None:
            raise ConsulError(404, f'No service registered with ID "{service_id}"')
        authz.require("service", "write", svc.name)
        check_id = SERVICE_MAINT_PREFIX + service_id
        key = (self.node_name, check_id)
        if enable and key not in self._checks:
            check = Check(
                node=self.node_name,
                check_id=check_id,
                name="Service Maintenance Mode",
                status=CRITICAL,
                notes=request.query.get("reason") or DEFAULT_SERVICE_MAINT_REASON,
                service_id=svc.id,
                service_name=svc.name,
                service_tags=list(svc.tags),
                type="maintenance",
                local=True,
            )
            self._put_check(check, self._next_index())
            self._notify()
        elif not enable and key in self._checks:
            self._delete_check(key, self._next_index())
            self._notify()
        return _empty()

    async def h_node_maintenance(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        enable = self._enable_param(request)
        authz, _secret = self._authz(request)
        authz.require("node", "write", self.node_name)
        key = (self.node_name, NODE_MAINT_ID)
        if enable and key not in self._checks:
            check = Check(
                node=self.node_name,
                check_id=NODE_MAINT_ID,
                name="Node Maintenance Mode",
                status=CRITICAL,
                notes=request.query.get("reason") or DEFAULT_NODE_MAINT_REASON,
                type="maintenance",
                local=True,
            )
            self._put_check(check, self._next_index())
            self._notify()
        elif not enable and key in self._checks:
            self._delete_check(key, self._next_index())
            self._notify()
        return _empty()

    async def h_check_register(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        raw = await self._body(request)
        spec = CheckSpec.parse(raw, "CheckDefinition")
        if not spec.name:
            raise ConsulError(400, "Missing check name")
        if spec.status and spec.status not in STATUSES:
            raise ConsulError(400, "Bad check status")
        authz, _secret = self._authz(request)
        try:
            spec.validate()
        except ValueError as exc:
            raise ConsulError(400, f"Invalid check: {exc}") from None
        svc = None
        if spec.service_id:
            svc = self.local_services().get(spec.service_id)
            if svc is None:
                raise ConsulError(404, f'ServiceID "{spec.service_id}" does not exist')
            authz.require("service", "write", svc.name)
        else:
            authz.require("node", "write", self.node_name)
        if spec.script_args and not self.enable_script_checks:
            raise ConsulError(
                500, "Scripts are disabled on this agent; to enable, configure 'enable_script_checks' to true"
            )
        check = Check(
            node=self.node_name,
            check_id=spec.check_id or spec.name,
            name=spec.name,
            status=spec.status or CRITICAL,
            notes=spec.notes,
            service_id=svc.id if svc else "",
            service_name=svc.name if svc else "",
            service_tags=list(svc.tags) if svc else [],
            type=spec.kind,
            spec=spec,
            local=True,
        )
        self._add_check(check, self._next_index())
        self._notify()
        return _empty()

    def _vet_check_update(self, authz: Authz, check_id: str) -> Check:
        check = self.local_checks().get(check_id)
        if check is None:
            raise ConsulError(
                404, f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.'
            )
        if check.service_id:
            authz.require("service", "write", check.service_name)
        else:
            authz.require("node", "write", self.node_name)
        return check

    async def h_check_deregister(self, request: web.BaseRequest, check_id: str) -> web.StreamResponse:
        authz, _secret = self._authz(request)
        check = self._vet_check_update(authz, check_id)
        self._delete_check((check.node, check.check_id), self._next_index())
        self._notify()
        return _empty()

    async def _ttl_update(
        self, request: web.BaseRequest, check_id: str, status: str, output: str
    ) -> web.Response:
        authz, _secret = self._authz(request)
        self._vet_check_update(authz, check_id)
        self.update_ttl(check_id, status, output)
        return _empty()

    async def h_check_pass(self, request: web.BaseRequest, check_id: str) -> web.StreamResponse:
        return await self._ttl_update(request, check_id, PASSING, request.query.get("note", ""))

    async def h_check_warn(self, request: web.BaseRequest, check_id: str) -> web.StreamResponse:
        return await self._ttl_update(request, check_id, WARNING, request.query.get("note", ""))

    async def h_check_fail(self, request: web.BaseRequest, check_id: str) -> web.StreamResponse:
        return await self._ttl_update(request, check_id, CRITICAL, request.query.get("note", ""))

    async def h_check_update(self, request: web.BaseRequest, check_id: str) -> web.StreamResponse:
        f = Fields(await self._body(request), "checkUpdate")
        status = f.text("Status")
        if status not in STATUSES:
            raise ConsulError(400, f"Invalid check status: '{status}'")
        return await self._ttl_update(request, check_id, status, f.text("Output"))

    def _agent_health(self, svc: Service) -> tuple[int, str, dict[str, Any]]:
        checks = [c.to_json(agent_view=True) for c in self.service_checks(svc)]
        statuses = {c["Status"] for c in checks}
        status = CRITICAL if CRITICAL in statuses else WARNING if WARNING in statuses else PASSING
        code = {PASSING: 200, WARNING: 429, CRITICAL: 503}[status]
        info = {"AggregatedStatus": status, "Service": svc.agent_json(self.datacenter), "Checks": checks}
        return code, status, info

    async def h_agent_health_id(self, request: web.BaseRequest, service_id: str) -> web.StreamResponse:
        if not service_id:
            raise ConsulError(400, "Missing serviceID")
        authz, _secret = self._authz(request)
        text = (
            request.headers.get("Accept", "").startswith("text/plain")
            or request.query.get("format") == "text"
        )
        svc = self.local_services().get(service_id)
        if svc is None:
            reason = f"ServiceId {service_id} not found"
            if text:
                return _text(404, reason)
            return _json({"AggregatedStatus": CRITICAL, "Service": None, "Checks": None}, status=404)
        authz.require("service", "read", svc.name)
        code, status, info = self._agent_health(svc)
        if text:
            return _text(code, status)
        return _json(info, status=code)

    async def h_agent_health_name(self, request: web.BaseRequest, name: str) -> web.StreamResponse:
        if not name:
            raise ConsulError(400, "Missing service Name")
        authz, _secret = self._authz(request)
        authz.require("service", "read", name)
        code, status, infos = 404, f"ServiceName {name} Not Found", []
        for svc in sorted(self.local_services().values(), key=lambda s: s.id):
            if svc.name != name:
                continue
            scode, sstatus, info = self._agent_health(svc)
            infos.append(info)
            if code == 404 or scode > code:
                code, status = scode, sstatus
        if (
            request.headers.get("Accept", "").startswith("text/plain")
            or request.query.get("format") == "text"
        ):
            return _text(code, status)
        return _json(infos, status=code)

    async def h_agent_reload(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        authz, _secret = self._authz(request)
        authz.require("agent", "write", self.node_name)
        return _empty()

    async def h_agent_leave(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        authz, _secret = self._authz(request)
        authz.require("agent", "write", self.node_name)

        async def leave() -> None:
            await asyncio.sleep(0.05)
            self.left.set()
            self.fault = "refuse"
            if self._listener:
                await self._listener.close()

        task = asyncio.get_running_loop().create_task(leave())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return _empty()

    async def h_force_leave(self, request: web.BaseRequest, node: str) -> web.StreamResponse:
        authz, _secret = self._authz(request)
        authz.require("operator", "write")
        if node != self.node_name:
            raise ConsulError(500, f"agent: No node found with name '{node}'")
        return _empty()

    async def h_agent_metrics(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        authz, _secret = self._authz(request)
        authz.require("agent", "read", self.node_name)
        accept = request.headers.get("Accept", "")
        if request.query.get("format") == "prometheus" or "openmetrics" in accept:
            # Consul without telemetry.prometheus_retention_time: an empty 200 and a reason header.
            return web.Response(
                status=200,
                headers={
                    "X-Consul-Reason": "Prometheus is not enabled since its retention time is not positive"
                },
            )
        now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S +0000 UTC")
        gauges = [
            {"Name": "consul.runtime.num_goroutines", "Value": 100.0, "Labels": {}},
            {"Name": "consul.catalog.services", "Value": float(len(self._services)), "Labels": {}},
        ]
        return _json({"Timestamp": now, "Gauges": gauges, "Points": [], "Counters": [], "Samples": []})

    async def h_agent_monitor(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        authz, _secret = self._authz(request)
        authz.require("agent", "read", self.node_name)
        level = request.query.get("loglevel", "info")
        if level.lower() not in LOG_LEVELS:
            raise ConsulError(400, f"Unknown log level: {level}")
        response = web.StreamResponse(status=200, headers={"Content-Type": "text/plain; charset=utf-8"})
        await response.prepare(request)  # type: ignore[arg-type]
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        await response.write(f"{stamp} [INFO]  agent: consul test agent monitor attached\n".encode())
        await self.left.wait()
        return response

    async def h_agent_host(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        authz, _secret = self._authz(request)
        authz.require("operator", "read")
        return _json({"Host": {"hostname": self.node_name, "os": "linux"}, "CollectionTime": time.time_ns()})

    async def h_agent_token(self, request: web.BaseRequest, kind: str) -> web.StreamResponse:
        if not self.acl_enabled:
            raise ConsulError(401, "ACL support disabled")
        authz, _secret = self._authz(request)
        authz.require("acl", "write")
        if kind not in AGENT_TOKEN_TYPES:
            raise ConsulError(404, f'Token "{kind}" is unknown')
        f = Fields(await self._body(request), "AgentToken")
        self.agent_tokens[kind] = f.text("Token")
        return _empty()

    async def h_acl_token_self(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        if not self.acl_enabled:
            raise ConsulError(401, "ACL support disabled")
        authz, _secret = self._authz(request)
        token = authz.token
        if token is None:
            raise ConsulError(403, "ACL not found")
        policies = [{"ID": "00000000-0000-0000-0000-000000000001", "Name": "global-management"}]
        return _json(
            {
                "AccessorID": token.accessor_id,
                "SecretID": token.secret_id,
                "Description": token.description,
                "Policies": policies if token.management else [],
                "Local": False,
                "CreateIndex": 1,
                "ModifyIndex": 1,
            }
        )

    async def h_root(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        return web.Response(status=301, headers={"Location": "/ui/"})

    async def h_ui(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        return web.Response(
            text="<!doctype html><title>Consul by HashiCorp</title>\n", content_type="text/html"
        )

    # -- /v1/status --------------------------------------------------------------------------

    async def h_status_leader(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        return _json(SERVER_ADDR)

    async def h_status_peers(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        return _json([SERVER_ADDR])

    # -- /v1/catalog ---------------------------------------------------------------------------

    def _node_meta_ok(self, request: web.BaseRequest, node: Node) -> bool:
        for pair in request.query.getall("node-meta", []):
            key, _, value = pair.partition(":")
            if (node.meta or {}).get(key) != value:
                return False
        return True

    async def h_catalog_datacenters(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        return _json([self.datacenter])

    async def h_catalog_register(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        raw = await self._body(request)
        authz, _secret = self._authz(request)
        f = Fields(raw, "RegisterRequest")
        self._check_dc(f.text("Datacenter"))
        node_name = f.text("Node")
        if not node_name:
            raise ConsulError(400, "Missing node name")
        existing = self._nodes.get(node_name)
        skip = f.flag("SkipNodeUpdate") and existing is not None
        address = f.text("Address")
        if not address and not skip:
            raise ConsulError(400, "Missing node address")
        if address in ("0.0.0.0", "::") and not skip:
            raise ConsulError(400, "Invalid node address")
        svc = None
        if f.get("Service") is not None:
            sf = Fields(f.get("Service"), "RegisterRequest.Service")
            name = sf.text("Service", "Name")
            if not name:
                raise ConsulError(500, "Must provide service name (Service.Service) with ID (Service.ID)")
            tagged: dict[str, dict[str, Any]] = {}
            for tag, value in (sf.get("TaggedAddresses") or {}).items():
                tf = Fields(value, "ServiceAddress")
                tagged[tag] = {"Address": tf.text("Address"), "Port": tf.integer("Port")}
            svc = Service(
                node=node_name,
                id=sf.text("ID") or name,
                name=name,
                tags=sf.str_list("Tags"),
                address=sf.text("Address"),
                port=sf.integer("Port"),
                meta=sf.str_map("Meta"),
                enable_tag_override=sf.flag("EnableTagOverride"),
                tagged_addresses=tagged,
                kind=sf.text("Kind"),
            )
            if sf.get("Weights") is not None:
                wf = Fields(sf.get("Weights"), "Weights")
                svc.weights = {"Passing": wf.integer("Passing"), "Warning": wf.integer("Warning")}
        raw_checks = []
        if f.get("Check") is not None:
            raw_checks.append(f.get("Check"))
        for item in f.get("Checks") or []:
            raw_checks.append(item)
        authz.require("node", "write", node_name)
        if svc is not None:
            authz.require("service", "write", svc.name)
        index = self._next_index()
        if not skip:
            tagged_node = f.get("TaggedAddresses")
            node = Node(
                id=f.text("ID") or (existing.id if existing else str(uuid.uuid4())),
                name=node_name,
                address=address,
                datacenter=self.datacenter,
                tagged_addresses=dict(tagged_node) if isinstance(tagged_node, dict) else None,
                meta=f.str_map("NodeMeta") or None,
            )
            if existing is None or _node_fields(existing) != _node_fields(node):
                self._put_node(node, index)
        if svc is not None:
            self._put_service(svc, index)
        for raw_check in raw_checks:
            cf = Fields(raw_check, "HealthCheck")
            check_id = cf.text("CheckID") or cf.text("Name")
            service_id = cf.text("ServiceID")
            owner = self._services.get((node_name, service_id)) if service_id else None
            if service_id and owner is None:
                raise ConsulError(500, "Missing service registration")
            status = cf.text("Status") or CRITICAL
            if status not in STATUSES:
                raise ConsulError(500, f"Invalid check status: '{status}'")
            check = Check(
                node=node_name,
                check_id=check_id,
                name=cf.text("Name"),
                status=status,
                notes=cf.text("Notes"),
                output=cf.text("Output"),
                service_id=service_id,
                service_name=owner.name if owner else "",
                service_tags=list(owner.tags) if owner else [],
                type=cf.text("Type"),
            )
            if owner is not None:
                authz.require("service", "write", owner.name)
            self._put_check(check, index)
        self._notify()
        return _json(True)

    async def h_catalog_deregister(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        raw = await self._body(request)
        authz, _secret = self._authz(request)
        f = Fields(raw, "DeregisterRequest")
        self._check_dc(f.text("Datacenter"))
        node_name = f.text("Node")
        if not node_name:
            raise ConsulError(400, "Missing node name")
        service_id, check_id = f.text("ServiceID"), f.text("CheckID")
        index = self._next_index()
        if service_id:
            svc = self._services.get((node_name, service_id))
            if svc is not None:
                authz.require("service", "write", svc.name)
                self._delete_service((node_name, service_id), index)
        elif check_id:
            check = self._checks.get((node_name, check_id))
            if check is not None:
                if check.service_id:
                    authz.require("service", "write", check.service_name)
                else:
                    authz.require("node", "write", node_name)
                self._delete_check((node_name, check_id), index)
        else:
            authz.require("node", "write", node_name)
            if node_name in self._nodes:
                for key in [k for k in self._services if k[0] == node_name]:
                    self._delete_service(key, index)
                for key in [k for k in self._checks if k[0] == node_name]:
                    self._delete_check(key, index)
                del self._nodes[node_name]
                self._tables["nodes"] = index
        self._notify()
        return _json(True)

    async def h_catalog_nodes(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        authz, secret = self._authz(request)
        filt = self._filter(request)

        def compute() -> Result:
            nodes = [n.to_json() for n in sorted(self._nodes.values(), key=lambda n: n.name)]
            nodes = [n for n in nodes if self._node_meta_ok(request, self._nodes[n["Node"]])]
            if filt:
                nodes = [n for n in nodes if filt.matches(n)]
            visible = [n for n in nodes if authz.can_read_node(n["Node"])]
            return Result(self._tables["nodes"], visible, filtered=len(visible) != len(nodes))

        return await self._query(request, compute, secret)

    async def h_catalog_services(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        authz, secret = self._authz(request)
        filt = self._filter(request)

        def compute() -> Result:
            grouped: dict[str, set[str]] = {}
            filtered = False
            for svc in sorted(self._services.values(), key=lambda s: (s.name, s.node, s.id)):
                node = self._nodes[svc.node]
                if not self._node_meta_ok(request, node):
                    continue
                if filt and not filt.matches(svc.service_node_json(node)):
                    continue
                if not (authz.can_read_service(svc.name) and authz.can_read_node(svc.node)):
                    filtered = True
                    continue
                grouped.setdefault(svc.name, set()).update(svc.tags)
            data = {name: sorted(tags) for name, tags in sorted(grouped.items())}
            return Result(self._tables["services"], data, filtered=filtered)

        return await self._query(request, compute, secret)

    def _service_index_for(self, name: str, with_checks: bool) -> int:
        if any(s.name == name for s in self._services.values()):
            return self._service_index.get(name, self._tables["services"])
        tables = ["nodes", "services"] + (["checks"] if with_checks else [])
        return max(self._tables[t] for t in tables)

    def _tags_ok(self, request: web.BaseRequest, svc: Service) -> bool:
        lowered = {t.lower() for t in svc.tags}
        return all(tag.lower() in lowered for tag in request.query.getall("tag", []))

    async def h_catalog_service(self, request: web.BaseRequest, name: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        authz, secret = self._authz(request)
        filt = self._filter(request)
        peer = request.query.get("peer", "")

        def compute() -> Result:
            items, filtered = [], False
            if not peer:
                for svc in self.instances(name):
                    node = self._nodes[svc.node]
                    if not (self._tags_ok(request, svc) and self._node_meta_ok(request, node)):
                        continue
                    item = svc.service_node_json(node)
                    if filt and not filt.matches(item):
                        continue
                    if not (authz.can_read_service(svc.name) and authz.can_read_node(svc.node)):
                        filtered = True
                        continue
                    items.append(item)
            return Result(self._service_index_for(name, False), items, empty=not items, filtered=filtered)

        return await self._query(request, compute, secret)

    def _connect_instances(self, name: str) -> list[Service]:
        out = []
        for svc in sorted(self._services.values(), key=lambda s: (s.node, s.id)):
            if svc.kind == "connect-proxy" and (svc.proxy or {}).get("DestinationServiceName") == name:
                out.append(svc)
            elif svc.name == name and svc.connect.get("Native"):
                out.append(svc)
        return out

    async def h_catalog_connect(self, request: web.BaseRequest, name: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        authz, secret = self._authz(request)
        filt = self._filter(request)
        peer = request.query.get("peer", "")

        def compute() -> Result:
            items = []
            for svc in [] if peer else self._connect_instances(name):
                item = svc.service_node_json(self._nodes[svc.node])
                if filt and not filt.matches(item):
                    continue
                if authz.can_read_service(svc.name) and authz.can_read_node(svc.node):
                    items.append(item)
            return Result(self._service_index_for(name, False), items, empty=not items)

        return await self._query(request, compute, secret)

    async def h_catalog_gateway_services(self, request: web.BaseRequest, name: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        _authz, secret = self._authz(request)
        return await self._query(request, lambda: Result(self._tables["services"], [], empty=True), secret)

    async def h_catalog_node(self, request: web.BaseRequest, name: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        authz, secret = self._authz(request)
        filt = self._filter(request)

        def compute() -> Result:
            index = max(self._tables["nodes"], self._tables["services"])
            node = self._nodes.get(name)
            if node is None or not authz.can_read_node(name):
                return Result(index, None, empty=True, filtered=node is not None)
            services = {}
            for svc in sorted(self._services.values(), key=lambda s: s.id):
                if svc.node != name:
                    continue
                item = svc.catalog_json()
                if filt and not filt.matches(item):
                    continue
                if authz.can_read_service(svc.name):
                    services[svc.id] = item
            return Result(index, {"Node": node.to_json(), "Services": services})

        return await self._query(request, compute, secret)

    # -- /v1/health ------------------------------------------------------------------------------

    def _passing_param(self, request: web.BaseRequest) -> bool:
        if "passing" not in request.query:
            return False
        value = _parse_go_bool(request.query["passing"] or "true")
        if value is None:
            raise ConsulError(400, f"Invalid value for ?passing: {request.query['passing']!r}")
        return value

    def _entries(
        self, request: web.BaseRequest, services: list[Service], authz: Authz, filt: Filter | None
    ) -> tuple[list[dict[str, Any]], bool]:
        passing = self._passing_param(request)
        entries, filtered = [], False
        for svc in services:
            node = self._nodes[svc.node]
            if not (self._tags_ok(request, svc) and self._node_meta_ok(request, node)):
                continue
            entry = self.service_entry(svc)
            if passing and any(c["Status"] != PASSING for c in entry["Checks"]):
                continue
            if filt and not filt.matches(entry):
                continue
            if not (authz.can_read_service(svc.name) and authz.can_read_node(svc.node)):
                filtered = True
                continue
            entries.append(entry)
        return entries, filtered

    async def h_health_service(self, request: web.BaseRequest, name: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        authz, secret = self._authz(request)
        filt = self._filter(request)
        self._passing_param(request)
        peer = request.query.get("peer", "")

        def compute() -> Result:
            services = [] if peer else self.instances(name)
            entries, filtered = self._entries(request, services, authz, filt)
            return Result(self._service_index_for(name, True), entries, empty=not entries, filtered=filtered)

        return await self._query(request, compute, secret)

    async def h_health_connect(self, request: web.BaseRequest, name: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        authz, secret = self._authz(request)
        filt = self._filter(request)
        peer = request.query.get("peer", "")

        def compute() -> Result:
            services = [] if peer else self._connect_instances(name)
            entries, filtered = self._entries(request, services, authz, filt)
            return Result(self._service_index_for(name, True), entries, empty=not entries, filtered=filtered)

        return await self._query(request, compute, secret)

    async def h_health_ingress(self, request: web.BaseRequest, name: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        _authz, secret = self._authz(request)
        self._filter(request)
        return await self._query(
            request, lambda: Result(self._service_index_for(name, True), [], empty=True), secret
        )

    def _check_list(
        self, checks: Iterable[Check], authz: Authz, filt: Filter | None
    ) -> tuple[list[dict[str, Any]], bool]:
        out, filtered = [], False
        for check in sorted(checks, key=lambda c: (c.node, c.check_id)):
            item = check.to_json()
            if filt and not filt.matches(item):
                continue
            readable = authz.can_read_node(check.node) and (
                not check.service_id or authz.can_read_service(check.service_name)
            )
            if not readable:
                filtered = True
                continue
            out.append(item)
        return out, filtered

    async def h_health_checks(self, request: web.BaseRequest, name: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        authz, secret = self._authz(request)
        filt = self._filter(request)

        def compute() -> Result:
            checks = [c for c in self._checks.values() if c.service_id and c.service_name == name]
            checks = [c for c in checks if self._node_meta_ok(request, self._nodes[c.node])]
            items, filtered = self._check_list(checks, authz, filt)
            return Result(self._tables["checks"], items, empty=not items, filtered=filtered)

        return await self._query(request, compute, secret)

    async def h_health_node(self, request: web.BaseRequest, node: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        authz, secret = self._authz(request)
        filt = self._filter(request)

        def compute() -> Result:
            items, filtered = self._check_list(
                (c for c in self._checks.values() if c.node == node), authz, filt
            )
            return Result(self._tables["checks"], items, empty=not items, filtered=filtered)

        return await self._query(request, compute, secret)

    async def h_health_state(self, request: web.BaseRequest, state: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        if state not in (*STATUSES, "any"):
            raise ConsulError(400, "Invalid state")
        authz, secret = self._authz(request)
        filt = self._filter(request)

        def compute() -> Result:
            checks = [c for c in self._checks.values() if state == "any" or c.status == state]
            checks = [c for c in checks if self._node_meta_ok(request, self._nodes[c.node])]
            items, filtered = self._check_list(checks, authz, filt)
            return Result(self._tables["checks"], items, empty=not items, filtered=filtered)

        return await self._query(request, compute, secret)

    # -- /v1/kv --------------------------------------------------------------------------------

    def _kv_table_index(self) -> int:
        return max(self._tables["kvs"], self._tables["tombstones"])

    def _kv_prefix_index(self, prefix: str, entries: list[KVEntry]) -> int:
        index = max((e.modify_index for e in entries), default=0)
        index = max(index, max((i for k, i in self._tombstones.items() if k.startswith(prefix)), default=0))
        return index or self._kv_table_index()

    async def h_kv(self, request: web.BaseRequest, key: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        if request.method == "GET":
            return await self._kv_get(request, key)
        if request.method == "PUT":
            return await self._kv_put(request, key)
        return await self._kv_delete(request, key)

    async def _kv_get(self, request: web.BaseRequest, key: str) -> web.StreamResponse:
        authz, secret = self._authz(request)
        query = request.query
        if "keys" in query:
            separator = query.get("separator", "")

            def compute_keys() -> Result:
                entries = [e for k, e in sorted(self._kv.items()) if k.startswith(key)]
                readable = [e for e in entries if authz.allowed("key", "read", e.key)]
                keys: list[str] = []
                for entry in readable:
                    name = entry.key
                    after = name[len(key) :]
                    if separator and separator in after:
                        name = key + after[: after.index(separator) + len(separator)]
                    if not keys or keys[-1] != name:
                        keys.append(name)
                index = self._kv_prefix_index(key, entries)
                filtered = len(readable) != len(entries)
                if not keys and key:  # Consul answers the root listing with [] rather than 404
                    return Result(index, None, status=404, empty=True, filtered=filtered)
                return Result(index, keys, empty=not keys, filtered=filtered)

            return await self._query(request, compute_keys, secret)
        if "recurse" in query:

            def compute_tree() -> Result:
                entries = [e for k, e in sorted(self._kv.items()) if k.startswith(key)]
                readable = [e for e in entries if authz.allowed("key", "read", e.key)]
                index = self._kv_prefix_index(key, entries)
                if not readable:
                    return Result(index, None, status=404, empty=True, filtered=bool(entries))
                return Result(index, [e.to_json() for e in readable], filtered=len(readable) != len(entries))

            return await self._query(request, compute_tree, secret)
        if not key:
            raise ConsulError(400, "Missing key name")
        authz.require("key", "read", key)
        raw = "raw" in query

        def compute_one() -> Result:
            entry = self._kv.get(key)
            if entry is None:
                return Result(self._kv_table_index(), None, status=404, empty=True)
            if raw:
                return Result(
                    entry.modify_index,
                    raw=entry.value,
                    headers={
                        "Content-Type": "text/plain",
                        "X-Content-Type-Options": "nosniff",
                        "Content-Security-Policy": "sandbox",
                    },
                )
            return Result(entry.modify_index, [entry.to_json()])

        return await self._query(request, compute_one, secret)

    async def _kv_put(self, request: web.BaseRequest, key: str) -> web.StreamResponse:
        authz, _secret = self._authz(request)
        if not key:
            raise ConsulError(400, "Missing key name")
        query = request.query
        _conflicting_flags(request, "cas", "acquire", "release")
        if "acquire" in query or "release" in query:
            session = query.get("acquire") or query.get("release") or ""
            raise ConsulError(500, f'invalid session "{session}"')
        flags = _parse_uint(query["flags"]) if "flags" in query else 0
        cas = _parse_uint(query["cas"]) if "cas" in query else None
        authz.require("key", "write", key)
        value = await request.read()
        if len(value) > KV_MAX_VALUE:
            raise ConsulError(
                413, f"Request body({len(value)} bytes) too large, max size: {KV_MAX_VALUE} bytes."
            )
        existing = self._kv.get(key)
        if cas is not None:
            if (cas == 0 and existing is not None) or (
                cas != 0 and (existing is None or existing.modify_index != cas)
            ):
                return _json(False)
        index = self._next_index()
        entry = KVEntry(key, value, flags, existing.create_index if existing else index, index)
        self._kv[key] = entry
        self._tombstones.pop(key, None)
        self._tables["kvs"] = index
        self._notify()
        return _json(True)

    async def _kv_delete(self, request: web.BaseRequest, key: str) -> web.StreamResponse:
        authz, _secret = self._authz(request)
        query = request.query
        _conflicting_flags(request, "recurse", "cas")
        recurse = "recurse" in query
        if not key and not recurse:
            raise ConsulError(400, "Missing key name")
        if recurse:
            targets = [k for k in self._kv if k.startswith(key)]
            authz.require("key", "write", key)
        else:
            authz.require("key", "write", key)
            targets = [key] if key in self._kv else []
            if "cas" in query:
                cas = _parse_uint(query["cas"])
                entry = self._kv.get(key)
                if entry is None or entry.modify_index != cas:
                    return _json(False)
        if targets:
            index = self._next_index()
            for target in targets:
                del self._kv[target]
                self._tombstones[target] = index
            self._tables["tombstones"] = index
            self._notify()
        return _json(True)

    # -- control API (separate port) -------------------------------------------------------------

    async def _control_state(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "fault": self.fault,
                "index": self._index,
                "port": self.port,
                "services": self.services_view(),
                "checks": self.checks_view(),
            }
        )

    async def _control_fault(self, request: web.Request) -> web.Response:
        try:
            await self.set_fault(request.match_info["mode"])
        except ValueError as exc:
            return web.Response(status=400, text=str(exc))
        return web.json_response({"fault": self.fault, "index": self._index})

    async def _control_token(self, request: web.Request) -> web.Response:
        body = await request.json()
        try:
            accessor = self.add_token(
                body.get("SecretID"), body.get("Policy"), description=body.get("Description", "")
            )
        except ValueError as exc:
            return web.Response(status=400, text=str(exc))
        return web.json_response({"AccessorID": accessor})

    async def _control_health(self, request: web.Request) -> web.Response:
        passing = "passing" in request.query
        return web.json_response(self.health_view(request.match_info["name"], passing))


def _node_fields(node: Node) -> dict[str, Any]:
    return dict(node.to_json(), CreateIndex=0, ModifyIndex=0)


def _validate_meta(meta: dict[str, str]) -> None:
    if len(meta) > 64:
        raise ConsulError(
            400, "Invalid Service Meta: Node metadata cannot contain more than 64 key/value pairs"
        )
    for key, value in meta.items():
        if not key:
            raise ConsulError(400, "Invalid Service Meta: Key cannot be blank")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            raise ConsulError(
                400,
                f"Invalid Service Meta: Key contains invalid characters. Valid characters include all "
                f"alpha-numerics and dashes: {key!r}",
            )
        if len(key) > 128:
            raise ConsulError(400, f"Invalid Service Meta: Key is too long (limit: 128 characters): {key!r}")
        if key.startswith("consul-"):
            raise ConsulError(
                400, f"Invalid Service Meta: Key prefix 'consul-' is reserved for internal use: {key!r}"
            )
        if len(value) > 512:
            raise ConsulError(
                400, f"Invalid Service Meta: Value is too long (limit: 512 characters): {key!r}"
            )


def _conflicting_flags(request: web.BaseRequest, *flags: str) -> None:
    if sum(1 for flag in flags if flag in request.query) > 1:
        raise ConsulError(400, f"Conflicting flags: {request.query_string}\n")


def _parse_uint(text: str) -> int:
    if not text.isdigit():
        raise ConsulError(500, f'strconv.ParseUint: parsing "{text}": invalid syntax')
    return int(text)


def _parse_go_bool(text: str) -> bool | None:
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    return None


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/plain", charset="utf-8")


def _json(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(data, separators=(",", ":")).encode(),
        content_type="application/json",
        headers=headers,
    )


def _empty() -> web.Response:
    return web.Response(status=200)


# ---------------------------------------------------------------------------------------------
# Running the agent on its own thread, for sync and async tests alike


class BackgroundAgent:
    """A :class:`ConsulTestAgent` on a private event loop in a daemon thread.

    Every method is thread-safe and blocks until done, so plain tests, tests that block on
    ``time.sleep`` or subprocesses, and async tests on another loop can all use it.
    """

    call_timeout = 10.0

    def __init__(
        self, *, acl_token: str | None = None, host: str = "127.0.0.1", port: int = 0, **options: Any
    ):
        self._options = dict(options, acl_token=acl_token, host=host, port=port)
        self.token = acl_token
        self.host = host
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.agent: ConsulTestAgent | None = None

    def __repr__(self) -> str:
        return f"<BackgroundAgent {self.agent!r}>"

    def start(self) -> BackgroundAgent:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="consul-test-agent", daemon=True)
        self._thread.start()

        async def create() -> ConsulTestAgent:
            agent = ConsulTestAgent(**self._options)
            await agent.start()
            return agent

        try:
            self.agent = self._submit(create())
        except BaseException:
            self._shutdown_loop()
            raise
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        if self.agent is not None:
            with contextlib.suppress(Exception):
                self._submit(self.agent.stop())
        self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return

        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(drain(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        if not loop.is_running():
            loop.close()

    def __enter__(self) -> BackgroundAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _submit(self, coro: Awaitable[Any]) -> Any:
        if self._loop is None:
            raise RuntimeError("the Consul test agent is not running")
        if threading.current_thread() is self._thread:
            raise RuntimeError("call the ConsulTestAgent directly from its own loop")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self.call_timeout)  # type: ignore[arg-type]

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        async def call() -> Any:
            return fn(*args, **kwargs)

        return self._submit(call())

    @property
    def _agent(self) -> ConsulTestAgent:
        if self.agent is None:
            raise RuntimeError("the Consul test agent is not running")
        return self.agent

    @property
    def port(self) -> int:
        return self._agent.port

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.addr}"

    @property
    def node_name(self) -> str:
        return self._agent.node_name

    @property
    def index(self) -> int:
        return self._call(lambda: self._agent.index)

    @property
    def fault(self) -> str:
        return self._agent.fault

    def set_fault(self, mode: str) -> None:
        self._submit(self._agent.set_fault(mode))

    def clear_fault(self) -> None:
        self.set_fault("none")

    def wipe(self) -> None:
        self._call(self._agent.wipe)

    def reset_index(self) -> None:
        self._call(self._agent.reset_index)

    def services(self) -> dict[str, Any]:
        return self._call(self._agent.services_view)

    def checks(self) -> dict[str, Any]:
        return self._call(self._agent.checks_view)

    def health(self, name: str, passing: bool = False) -> list[dict[str, Any]]:
        return self._call(self._agent.health_view, name, passing)

    def kv(self) -> dict[str, bytes]:
        return self._call(self._agent.kv_view)

    def add_token(self, secret: str | None = None, policy: Any = None, *, description: str = "") -> str:
        return self._call(self._agent.add_token, secret, policy, description=description)

    def remove_token(self, secret: str) -> None:
        self._call(self._agent.remove_token, secret)

    def wait_for(self, predicate: Callable[[BackgroundAgent], Any], timeout: float = 5.0) -> Any:
        """Poll ``predicate(self)`` until it returns something truthy; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate(self)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout}s on {self!r}")
            time.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.consul_agent", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument(
        "--acl-token", default=None, help="turn ACLs on (default deny); this is the management token"
    )
    parser.add_argument(
        "--control-port", type=int, default=None, help="serve the fault/token control API here"
    )
    parser.add_argument("--node-name", default="consul-test-agent")
    parser.add_argument("--enable-script-checks", action="store_true")
    parser.add_argument(
        "--self-alias", action="append", default=[], help="HOST:PORT that checks should treat as this agent"
    )
    args = parser.parse_args(argv)

    async def run() -> None:
        agent = ConsulTestAgent(
            host=args.host,
            port=args.port,
            acl_token=args.acl_token,
            node_name=args.node_name,
            enable_script_checks=args.enable_script_checks,
            self_aliases=args.self_alias,
        )
        await agent.start()
        print(f"consul test agent listening on {args.host}:{agent.port}", flush=True)
        if args.control_port is not None:
            control = await agent.start_control(args.control_port)
            print(f"consul test agent control on {args.host}:{control}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        left = asyncio.ensure_future(agent.left.wait())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([left, stopped], return_when=asyncio.FIRST_COMPLETED)
        left.cancel()
        stopped.cancel()
        await agent.stop()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
