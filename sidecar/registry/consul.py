"""The Consul registry backend: a local Consul agent over its HTTP API, through py-consul.

Rules of this file:
- I/O and translation only. Retries, TTL refresh timing, caching, fail-static and the
  panic rule (routing to critical instances when none passes) live in
  `sidecar.registration` and `sidecar.discovery`.
- Discovery reads `/v1/health/service/<name>` without `?passing` and classifies each entry
  itself, as Consul's `?passing` filter would: passing when every check in its `Checks`
  (the node's and the service's) is "passing"; otherwise (warning or critical) it is a
  critical instance. An instance is live while Consul lists it (Consul removes it after
  DeregisterCriticalServiceAfter).
- Every HTTP call goes through `ConsulRegistry._request`, the one place where transport
  failures and status codes become `RegistryUnavailable`, `RegistryDenied` or
  `RegistryError`; 404 is handed back to the caller, whose meaning depends on the call.
- Other Consul-backed parts (the Connect identity, intentions) call the agent's HTTP API
  through `api_request` / `api_get`: the same client session, the same `_request`, so the
  same timeouts, error translation and token scrubbing.
- The ACL token travels only in the `X-Consul-Token` header (py-consul's
  `prepare_headers`). It never appears in a URL, a log line, an exception message,
  `repr()` or `describe()`; text that comes from outside (Consul's error bodies, aiohttp's
  messages) is scrubbed of it anyway.

py-consul 1.8.0 provides the client (`consul.aio.Consul`: URL building, the token header)
but three of its defaults do not fit, so we adjust them here:
- its aiohttp transport builds `TCPConnector(verify_ssl=..., ssl_context=...)`, deprecated
  in aiohttp 3.x, drops the client certificate when verification is off, and must be
  constructed inside a running loop: `_AgentHTTPClient` builds the connector with `ssl=`
  and is created in `open()`;
- its `_request` does not release the response when cancelled (a blocking query cut by a
  timeout): ours uses `async with`;
- `consul.base.Consul` lets `CONSUL_HTTP_TOKEN` from the process environment override an
  explicit token: we set the token from `ConsulSettings` after construction, so the
  settings are the only source.
We call its low-level `http.get/put` rather than `agent.service.register` and friends
because those hide what we must see: status 404 (`CB.boolean` turns it into False), the
response headers (`X-Consul-Results-Filtered-By-ACLs`), and the check update endpoint
(`/v1/agent/check/update/:id`, which py-consul lacks).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import ssl
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import consul.aio
import consul.base

from sidecar.registry.base import (
    CheckSpec,
    Instance,
    QueryResult,
    RegistrationLost,
    Registry,
    RegistryDenied,
    RegistryError,
    RegistryUnavailable,
    Status,
)
from sidecar.registry.consul_settings import ConsulSettings, ssl_context

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0


def _go_duration(seconds: float) -> str:
    """Seconds -> a Go duration string that Consul accepts: 15 -> "15s", 1.5 -> "1500ms"."""
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"duration must be a positive number of seconds, got {seconds!r}")
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


class _AgentHTTPClient(consul.aio.HTTPClient):
    """py-consul's aiohttp transport, with the connector built the aiohttp 3.14 way."""

    def __init__(self, host: str, port: int, scheme: str, ssl_arg: ssl.SSLContext | bool) -> None:
        # Skip consul.aio.HTTPClient.__init__: it builds a connector with deprecated arguments.
        consul.base.HTTPClient.__init__(self, host, port, scheme, verify=ssl_arg is not False)
        # limit=0: blocking queries hold a connection for up to `wait`; a pool limit would let
        # many watches starve the TTL updates that keep this instance alive.
        connector = aiohttp.TCPConnector(ssl=ssl_arg, limit=0)
        # No session-wide timeout: every call is bounded by ConsulRegistry._request.
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))

    async def _request(
        self,
        callback: Any,
        method: str,
        uri: str,
        headers: dict[str, str] | None,
        data: Any = None,
        connections_timeout: float | None = None,
        raw: bool = False,
    ) -> Any:
        async with self._session.request(method, uri, headers=headers, data=data) as resp:
            body = await resp.read() if raw else await resp.text(encoding="utf-8", errors="replace")
        return callback(consul.base.Response(resp.status, resp.headers, body))


class _AgentClient(consul.aio.Consul):
    def __init__(self, settings: ConsulSettings, ssl_arg: ssl.SSLContext | bool) -> None:
        self._ssl_arg = ssl_arg
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        super().__init__(
            host=host,
            port=settings.port,
            scheme=settings.scheme,
            token=settings.token,
            dc=settings.datacenter,
            verify=settings.verify,
        )
        # consul.base.Consul lets CONSUL_HTTP_TOKEN override the explicit token: undo that.
        self.token = settings.token

    def http_connect(
        self, host: str, port: int, scheme: str, verify: bool | str = True, cert: Any = None
    ) -> _AgentHTTPClient:
        return _AgentHTTPClient(host, port, scheme, self._ssl_arg)


def _raw(response: consul.base.Response) -> consul.base.Response:
    return response


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No garbage collection while a large answer is parsed: JSON makes no reference
    cycles, and a 10,000-instance answer is some 200,000 new objects, which would trigger
    several collections for nothing (a fifth of the parse time)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass(frozen=True, slots=True)
class AgentAnswer:
    """One answer of the agent's HTTP API: a 2xx or a 404 (`status`), the JSON body (None when
    the body is empty or the status is 404), `X-Consul-Index` (0 when absent) and the headers."""

    status: int
    body: Any
    index: int
    headers: Mapping[str, str]


class ConsulRegistry(Registry):
    """A `Registry` on a Consul agent: one TTL check per instance, health via blocking queries.

    `timeout` bounds every call except the hold time of a blocking query. With
    `connect_native` the instances are registered as Connect-native services
    (`"Connect": {"Native": true}`), so Consul's own sidecars may dial them over mTLS.
    """

    kind = "consul"

    def __init__(
        self, settings: ConsulSettings, *, timeout: float = DEFAULT_TIMEOUT, connect_native: bool = False
    ) -> None:
        self._settings = settings
        self._timeout = timeout
        self._connect_native = connect_native
        self._ssl_arg = ssl_context(settings)  # fails early on a bad CA or client certificate
        self._client: _AgentClient | None = None
        self._names: dict[str, str] = {}  # instance id -> service name, for ACL messages
        # service name -> instance id -> (what identifies its version, the Instance built)
        self._seen: dict[str, dict[str, tuple[object, Instance]]] = {}

    def __repr__(self) -> str:
        state = "open" if self._client is not None else "closed"
        token = "set" if self._settings.token else "unset"
        return (
            f"<ConsulRegistry {self._settings.url} dc={self._settings.datacenter} token={token} "
            f"{state} registered={len(self._names)}>"
        )

    async def open(self) -> None:
        """Create the HTTP client. Does not contact the agent, so it never fails on a down agent."""
        self._connect()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    def _connect(self) -> _AgentClient:
        if self._client is None:
            self._client = _AgentClient(self._settings, self._ssl_arg)
        return self._client

    async def register(self, instance: Instance, check: CheckSpec, status: Status, note: str) -> None:
        """Register (or replace) `instance` with one TTL check `service:<id>` in `status`.

        Consul's register cannot set a check's output, so an update with `note` follows.
        """
        op = f"registering {instance.name!r} ({instance.id})"
        payload = {
            "ID": instance.id,
            "Name": instance.name,
            "Address": instance.address,
            "Port": instance.port,
            "Tags": list(instance.tags),
            "Meta": dict(instance.meta),
            "Check": {
                "Name": "app health (micro-sidecar)",
                "Notes": "TTL check fed by micro-sidecar from its probes of the app",
                "TTL": _go_duration(check.ttl),
                "Status": status,
                "DeregisterCriticalServiceAfter": _go_duration(check.deregister_after),
            },
        }
        if self._connect_native:
            payload["Connect"] = {"Native": True}
        needs = f"service:write on {instance.name!r}"
        resp = await self._request(
            op,
            "PUT",
            "/v1/agent/service/register",
            params=[("replace-existing-checks", "true")],
            body=payload,
            needs=needs,
        )
        if resp.code == 404:
            raise RegistryError(f"consul at {self._settings.hostport} answered 404 to {op}")
        self._names[instance.id] = instance.name
        resp = await self._update_check(instance.id, status, note, f"{op}: setting the check output")
        if resp.code == 404:
            raise RegistryUnavailable(
                f"consul at {self._settings.hostport} lost check service:{instance.id} right after {op}"
            )

    async def report(self, instance_id: str, status: Status, note: str) -> None:
        """Set the TTL check's status and output, which also restarts its TTL.

        Raises RegistrationLost when the agent no longer knows the check (404).
        """
        op = f"updating check service:{instance_id}"
        resp = await self._update_check(instance_id, status, note, op)
        if resp.code == 404:
            raise RegistrationLost(
                f"consul at {self._settings.hostport} no longer knows check service:{instance_id} "
                f"(agent restarted or state wiped): register again"
            )

    async def deregister(self, instance_id: str) -> None:
        """Remove the instance and its check; an instance the agent does not know is fine."""
        await self._request(
            f"deregistering {instance_id}",
            "PUT",
            f"/v1/agent/service/deregister/{instance_id}",
            needs=self._write_permission(instance_id),
        )
        # A 404 means it is already gone, which is what we wanted.
        self._names.pop(instance_id, None)

    async def query(self, name: str, index: int, wait: float) -> QueryResult:
        """Passing and critical instances of `name` from `/v1/health/service/<name>`.

        Every listed instance is registered and live; it is passing when all of its checks
        pass (what `?passing` would keep), else critical. The catalog is asked only when
        the health answer lists none, to tell an unknown name from one with no instance.

        With `index` > 0 and `wait` > 0 this is a blocking query: the agent answers when the result
        changes or after `wait` seconds (plus up to wait/16 of jitter; the client-side
        timeout allows for that). The returned `index` is Consul's `X-Consul-Index` as is,
        even when it is lower than the one passed in (the agent restarted or its state was
        reset): the caller must then start again from 0. An index of 0 from Consul is
        returned as 1, as Consul's documentation advises, so the next call still blocks.
        """
        dc = self._settings.datacenter
        params: list[tuple[str, str]] = []
        if dc:
            params.append(("dc", dc))
        timeout = self._timeout
        if index > 0 and wait > 0:  # without a wait Consul would hold the call for 5 minutes
            params += [("index", str(index)), ("wait", _go_duration(wait))]
            timeout += wait + wait / 16
        op = f"querying instances of {name!r}"
        needs = f"service:read on {name!r} and node:read"
        resp = await self._request(
            op, "GET", f"/v1/health/service/{name}", params=params, timeout=timeout, needs=needs
        )
        if resp.code == 404:
            raise RegistryError(f"consul at {self._settings.hostport} answered 404 to {op}")
        new_index = self._index(resp, op)
        instances, critical = self.classified_instances(name, resp.body, op)
        if instances or critical:
            return QueryResult(index=new_index, known=True, instances=instances, critical=critical)
        if resp.headers.get("X-Consul-Results-Filtered-By-ACLs", "").lower() == "true":
            raise RegistryDenied(
                f"consul at {self._settings.hostport} hid the instances of {name!r}: "
                f"the ACL token lacks {needs}"
            )
        # No instance listed: tell "never heard of it" (404 upstream) from "none left" (503).
        catalog_params = [("dc", dc)] if dc else []
        cat = await self._request(
            f"looking up {name!r} in the catalog",
            "GET",
            f"/v1/catalog/service/{name}",
            params=catalog_params,
            needs=needs,
        )
        known = cat.code != 404 and bool(self._json_list(cat.body, f"looking up {name!r} in the catalog"))
        return QueryResult(index=new_index, known=known, instances=())

    def healthy_instances(self, name: str, body: str, op: str) -> tuple[Instance, ...]:
        """The passing instances in the body of a `/v1/health/service/<name>` answer."""
        return self.classified_instances(name, body, op)[0]

    def classified_instances(
        self, name: str, body: str, op: str
    ) -> tuple[tuple[Instance, ...], tuple[Instance, ...]]:
        """(passing, critical) instances in the body of a `/v1/health/service/<name>` answer."""
        with _gc_paused():
            return self._instances(name, self._json_list(body, op), op)

    def _instances(
        self, name: str, entries: list[Any], op: str
    ) -> tuple[tuple[Instance, ...], tuple[Instance, ...]]:
        """(passing, critical) instances from health entries, reusing the Instances whose
        Service.ModifyIndex (and node address) did not change since the last answer: a
        10,000-instance service changes a few entries at a time, and building every Instance
        again dominated the update. A check's status does not change Service.ModifyIndex, so
        an instance moving between the two sets keeps its Instance; the classification is
        made again from `Checks` for every entry."""
        previous = self._seen.get(name, {})
        current: dict[str, tuple[object, Instance]] = {}
        passing: list[Instance] = []
        critical: list[Instance] = []
        for entry in entries:
            try:
                service = entry["Service"]
                key = (service.get("ModifyIndex"), (entry.get("Node") or {}).get("Address"))
                seen = previous.get(service["ID"])
                # As Consul's ?passing filter: every check, the node's included, must pass
                # (an entry without checks passes). Anything else, warning too, is critical.
                ok = True
                for check in entry.get("Checks") or ():
                    if check["Status"] != "passing":
                        ok = False
                        break
            except (KeyError, TypeError, AttributeError):
                raise RegistryUnavailable(
                    f"consul at {self._settings.hostport} answered {op} with a malformed entry"
                ) from None
            if seen is not None and key[0] is not None and seen[0] == key:
                instance = seen[1]
            else:
                instance = self._instance(entry, name, op)
            current[instance.id] = (key, instance)
            (passing if ok else critical).append(instance)
        if current:
            self._seen[name] = current
        else:
            self._seen.pop(name, None)
        return tuple(passing), tuple(critical)

    def describe(self) -> dict[str, object]:
        s = self._settings
        return {
            "kind": self.kind,
            "addr": s.url,
            "datacenter": s.datacenter,
            "token": "set" if s.token else "unset",
            "connect_native": self._connect_native,
            "tls": {
                "enabled": s.tls,
                "verify": s.verify,
                "cacert": s.cacert,
                "client_cert": s.client_cert is not None,
            },
        }

    # -- the agent's HTTP API, for other Consul-backed parts --------------------------------

    async def api_request(
        self,
        method: str,
        path: str,
        params: Sequence[tuple[str, str]] = (),
        *,
        body: object = None,
        index: int = 0,
        wait: float = 0.0,
        op: str | None = None,
        needs: str = "the ACL permission this call takes",
    ) -> AgentAnswer:
        """One call to the agent's HTTP API (`path` starts with `/v1/`), answered as JSON.

        With `index` > 0 and `wait` > 0 it is a blocking query, as in `query`. Raises like
        every call of this backend: RegistryUnavailable (unreachable, timeout, 5xx, 429, a
        body that is not JSON), RegistryDenied (401/403, with `needs` in the message),
        RegistryError (other 4xx); a 404 is answered with `status` 404 and no body.
        """
        if not path.startswith("/v1/"):
            raise ValueError(f"not a Consul HTTP API path: {path!r}")
        if method not in ("GET", "PUT", "POST", "DELETE"):
            raise ValueError(f"unsupported method {method!r}")
        op = op or f"calling {method} {path}"
        query = list(params)
        dc = self._settings.datacenter
        if dc and not any(k == "dc" for k, _ in query):
            query.append(("dc", dc))
        timeout = self._timeout
        if index > 0 and wait > 0:
            query += [("index", str(index)), ("wait", _go_duration(wait))]
            timeout += wait + wait / 16
        resp = await self._request(op, method, path, params=query, body=body, timeout=timeout, needs=needs)
        raw_index = resp.headers.get("X-Consul-Index")
        new_index = int(raw_index) if raw_index and raw_index.isdigit() else 0
        if resp.code == 404:
            return AgentAnswer(404, None, new_index, resp.headers)
        text = resp.body if isinstance(resp.body, str) else ""
        data: Any = None
        if text.strip():
            try:
                data = json.loads(text)
            except ValueError:
                raise RegistryUnavailable(
                    f"consul at {self._settings.hostport} answered {op} with something other than JSON"
                ) from None
        return AgentAnswer(resp.code, data, new_index, resp.headers)

    async def api_get(
        self,
        path: str,
        params: Sequence[tuple[str, str]] = (),
        *,
        index: int = 0,
        wait: float = 0.0,
        op: str | None = None,
        needs: str = "the ACL permission this call takes",
    ) -> tuple[Any, int]:
        """(JSON body, X-Consul-Index) of a GET; a 404 is a RegistryError here. See `api_request`."""
        answer = await self.api_request("GET", path, params, index=index, wait=wait, op=op, needs=needs)
        if answer.status == 404:
            raise RegistryError(f"consul at {self._settings.hostport} answered 404 to {op or 'GET ' + path}")
        return answer.body, answer.index

    # -- helpers -------------------------------------------------------------------------

    def _write_permission(self, instance_id: str) -> str:
        name = self._names.get(instance_id)
        return f"service:write on {name!r}" if name else f"service:write on the service of {instance_id!r}"

    async def _update_check(
        self, instance_id: str, status: Status, note: str, op: str
    ) -> consul.base.Response:
        return await self._request(
            op,
            "PUT",
            f"/v1/agent/check/update/service:{instance_id}",
            body={"Status": status, "Output": note},
            needs=self._write_permission(instance_id),
        )

    def _scrub(self, text: str, limit: int = 300) -> str:
        text = " ".join(text.split())
        token = self._settings.token
        if token:
            text = text.replace(token, "<token>")
        return text if len(text) <= limit else text[: limit - 3] + "..."

    async def _request(
        self,
        op: str,
        method: str,
        path: str,
        *,
        needs: str,
        params: list[tuple[str, str]] | None = None,
        body: object = None,
        timeout: float | None = None,
    ) -> consul.base.Response:
        """One call to the agent. Returns 2xx and 404 answers; raises for everything else.

        `op` names the operation for messages ("updating check service:web-1"); `needs`
        names the ACL permission it takes, for the message of a 403.
        """
        client = self._connect()
        addr = self._settings.hostport
        limit = self._timeout if timeout is None else timeout
        headers = client.prepare_headers()
        started = time.monotonic()
        try:
            async with asyncio.timeout(limit):
                data = "" if body is None else json.dumps(body)
                if method == "GET":
                    resp = await client.http.get(_raw, path, params=params, headers=headers)
                elif method == "POST":
                    resp = await client.http.post(_raw, path, params=params, data=data, headers=headers)
                elif method == "DELETE":
                    resp = await client.http.delete(_raw, path, params=params, data=data, headers=headers)
                else:
                    resp = await client.http.put(_raw, path, params=params, data=data, headers=headers)
        except TimeoutError:
            raise RegistryUnavailable(f"consul at {addr} did not answer {op} within {limit:g}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            reason = self._scrub(str(exc) or type(exc).__name__)
            raise RegistryUnavailable(f"consul at {addr} unreachable while {op}: {reason}") from None
        elapsed_ms = (time.monotonic() - started) * 1000
        log.debug("consul %s %s -> %d in %.0f ms (%s)", method, path, resp.code, elapsed_ms, op)

        code = resp.code
        if 200 <= code < 300 or code == 404:
            return resp
        text = self._scrub(resp.body if isinstance(resp.body, str) else repr(resp.body))
        if code in (401, 403):
            if "acl not found" in text.lower():
                why = "the ACL token is not known to consul"
            elif not self._settings.token:
                why = f"no ACL token is set and the anonymous token lacks {needs}"
            else:
                why = f"the ACL token lacks {needs}"
            raise RegistryDenied(f"consul at {addr} denied {op}: {why} ({code} {text})")
        if code >= 500 or code == 429:
            raise RegistryUnavailable(f"consul at {addr} answered {code} to {op}: {text}")
        raise RegistryError(f"consul at {addr} rejected {op}: {code} {text}")

    def _index(self, resp: consul.base.Response, op: str) -> int:
        raw = resp.headers.get("X-Consul-Index")
        try:
            index = int(raw)
        except (TypeError, ValueError):
            raise RegistryUnavailable(
                f"consul at {self._settings.hostport} answered {op} without a valid X-Consul-Index"
            ) from None
        return max(index, 1)

    def _json_list(self, body: str, op: str) -> list[Any]:
        try:
            data = json.loads(body)
        except (TypeError, ValueError):
            data = None
        if data is None and body in ("null", ""):
            return []
        if not isinstance(data, list):
            raise RegistryUnavailable(
                f"consul at {self._settings.hostport} answered {op} with something other than a JSON list"
            )
        return data

    def _instance(self, entry: Any, name: str, op: str) -> Instance:
        try:
            service = entry["Service"]
            node = entry.get("Node") or {}
            return Instance(
                str(service["ID"]),
                str(service.get("Service") or name),
                str(service.get("Address") or node.get("Address") or ""),
                int(service.get("Port") or 0),
                tuple(map(str, service.get("Tags") or ())),
                {k: v if type(v) is str else str(v) for k, v in (service.get("Meta") or {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            raise RegistryUnavailable(
                f"consul at {self._settings.hostport} answered {op} with a malformed entry"
            ) from None
