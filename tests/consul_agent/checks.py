"""Running the agent's checks: TTL timers and their updates, HTTP, TCP and script probes.

A check's record is :class:`~.model.Check`, what it does is its :class:`~.model.CheckSpec`. The
probes only ever dial loopback (or an address in ``self_aliases``). Stopping a runner and the
reaper of ``DeregisterCriticalServiceAfter`` are in core.py: dropping a check, wiping the state
or stopping the agent stop runners too.
"""

from __future__ import annotations

import asyncio
import ipaddress
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from .core import AgentCore
from .model import Check, CheckSpec
from .protocol import CRITICAL, PASSING, WARNING, ConsulError


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class CheckRunners(AgentCore):
    """Starts a check's runner when the agent API adds the check; updates TTL checks."""

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
