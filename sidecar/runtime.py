"""Starts the parts in order, watches them, and shuts down in order.

Start: registry backend, health checker, listeners (inbound, outbound, admin), then the
registration loop, then (supervisor mode) the app. Stop, on the first SIGTERM/SIGINT,
POST /shutdown, the app exiting or a part crashing:
  1. mark this instance critical in the registry, so peers stop picking it;
  2. keep serving for the drain delay, while that news propagates;
  3. stop accepting inbound connections and let in-flight requests finish (grace period);
  4. stop the app (supervisor mode) and then the outbound listener;
  5. deregister, close pools, exit (0, the app's exit code, or 1 when a part crashed).
A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import time
from typing import Any

from . import __version__
from .accesslog import AccessLog
from .admin import Admin
from .balancer import make_balancer
from .config import Config, ConfigError
from .discovery import Discovery
from .forward import Forwarder
from .health import HealthChecker
from .http.client import Pool
from .http.listener import Listener
from .http.server import Handler, ServerLimits
from .identity.allow import AllowList
from .identity.base import Authorizer, IdentitySource
from .identity.keeper import IdentityKeeper
from .inbound import Inbound
from .metrics import Metrics
from .observe import Observer
from .outbound import Outbound, RetryPolicy
from .registration import Registration
from .registry.base import APP_PROTOCOL_META, H2_META, MTLS_META, CheckSpec, Instance, Registry, RegistryError
from .supervise import AppProcess, AppStartError
from .tracing import span_exporter
from .workers import Workers, watch_primary

log = logging.getLogger("sidecar")

EXIT_CRASH = 1
DUPLICATE_SIGNAL_WINDOW = 0.5
EXIT_APP_NOT_FOUND = 127


def make_registry(config: Config) -> Registry:
    if config.registry.kind == "consul":
        from .registry.consul import ConsulRegistry
        from .registry.consul_settings import ConsulSettings

        # Connect-native: Consul's own Envoy sidecars may then dial us over mutual TLS
        native = config.security.mtls != "off" and config.security.identity == "consul"
        settings = ConsulSettings.from_sources(config.registry.consul_flags, os.environ)
        return ConsulRegistry(settings, connect_native=native)
    from .registry.local import LocalRegistry

    return LocalRegistry(config.registry.path)


def make_identity(config: Config, registry: Registry) -> tuple[IdentityKeeper | None, Authorizer | None]:
    """The identity keeper and the caller authorizer, or (None, None) with --mtls off."""
    sec = config.security
    if sec.mtls == "off":
        return None, None
    name = config.service.name
    source: IdentitySource
    authorizer: Authorizer
    if sec.identity == "consul":
        from .identity.consul import ConsulIdentitySource
        from .identity.intentions import ConsulIntentions
        from .registry.consul import ConsulRegistry

        if not isinstance(registry, ConsulRegistry):
            why = "consul needs --registry consul (the agent issues the certificates)"
            raise ConfigError("--identity", why)
        source = ConsulIdentitySource(registry, name)
        authorizer = ConsulIntentions(registry, name)
        return IdentityKeeper(source), authorizer
    if sec.identity == "files":
        from .identity.files import FilesIdentitySource

        assert sec.tls_cert is not None and sec.tls_key is not None and sec.tls_ca is not None
        source = FilesIdentitySource(sec.tls_cert, sec.tls_key, sec.tls_ca)
    else:
        from .identity.local import LocalIdentitySource

        ca_dir = config.registry.path.parent
        source = LocalIdentitySource(ca_dir, name, trust_domain=sec.trust_domain, cert_ttl=sec.cert_ttl)
    keeper = IdentityKeeper(source)
    return keeper, AllowList(sec.allow_from, keeper.trust_domains())


class Sidecar:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_at = time.time()
        self.registry = make_registry(config)
        self.keeper, self.authorizer = make_identity(config, self.registry)
        self.health = HealthChecker(config.app)
        app_cfg, traffic, lim = config.app, config.traffic, config.limits
        self.inbound_forwarder, self.outbound_forwarder = (
            Forwarder(
                connect_timeout=traffic.connect_timeout,
                request_timeout=app_cfg.request_timeout,
                max_body=app_cfg.max_request_body,
                body_timeout=lim.body_timeout,
                write_timeout=lim.write_timeout,
                max_connections=lim.upstream_max_connections,
                max_pending=lim.upstream_max_pending,
                to_app=to_app,
                stream_idle_timeout=lim.tunnel_idle_timeout,
            )
            for to_app in (True, False)
        )
        self.discovery = Discovery(self.registry)
        self.metrics_registry = Metrics()
        self.metrics_registry.on_scrape(self._refresh_metrics)
        self.access_log = AccessLog(traffic.access_log)
        self.exporter = span_exporter(config.service.name)
        self.observer = Observer(self.metrics_registry, self.access_log, self.exporter)
        self.balancer = make_balancer(
            traffic.balancer,
            failures=traffic.outlier_failures,
            base_ejection=traffic.outlier_ejection_time,
            max_ejection_percent=traffic.max_ejection_percent,
            max_outstanding=traffic.max_outstanding,
            on_eject=self._on_eject,
        )
        name = config.service.name
        self.inbound = Inbound(
            name,
            app_cfg.host,
            app_cfg.port,
            self.health,
            self.inbound_forwarder,
            self.observer,
            app_cfg.request_timeout,
            connect_timeout=traffic.connect_timeout,
            tunnel_idle_timeout=lim.tunnel_idle_timeout,
            mtls=config.security.mtls,
            keeper=self.keeper,
            authorizer=self.authorizer,
            app_protocol=app_cfg.protocol,
        )
        policy = RetryPolicy(
            retries=traffic.retries,
            per_try_timeout=traffic.per_try_timeout,
            request_timeout=app_cfg.request_timeout,
            budget_ratio=traffic.retry_budget,
            budget_min_per_second=traffic.retry_min_per_second,
        )
        self.outbound = Outbound(
            name,
            self.discovery,
            self.outbound_forwarder,
            self.balancer,
            policy,
            self.observer,
            connect_timeout=traffic.connect_timeout,
            tunnel_idle_timeout=lim.tunnel_idle_timeout,
            mtls=config.security.mtls,
            keeper=self.keeper,
        )
        self.admin = Admin(
            ready=self.ready,
            status=self.status,
            metrics=self.metrics,
            shutdown=self.request_stop,
            name=config.service.name,
        )
        grace = config.lifecycle.grace_period
        listen = config.listen
        lim = config.limits
        server_limits = ServerLimits(
            header_timeout=lim.header_timeout,
            idle_timeout=lim.idle_timeout,
            max_connections=lim.max_connections,
            h2_max_streams=lim.h2_max_streams,
        )
        proxying: dict[str, tuple[Handler, str, int]] = {
            "inbound": (self.inbound.handle, listen.inbound_host, listen.inbound_port),
            "outbound": (self.outbound.handle, listen.outbound_host, listen.outbound_port),
        }
        for service, port in listen.upstreams:  # --upstream NAME=PORT: loopback, one service
            proxying[f"upstream {service}"] = (self.outbound.handler_for(service), listen.outbound_host, port)
        self.listeners = {
            part: Listener(
                part,
                handler,
                host,
                port,
                grace,
                limits=server_limits,
                sidecar_name=name,
                reuse_port=listen.workers > 1 or listen.worker_index > 0,
                tls=self.keeper if part == "inbound" else None,
            )
            for part, (handler, host, port) in proxying.items()
        }
        self.is_worker = listen.worker_index > 0
        if not self.is_worker:
            self.listeners["admin"] = Listener(
                "admin", self.admin.app(), listen.admin_host, listen.admin_port, 1.0
            )
        self.workers: Workers | None = None
        self.registration: Registration | None = None
        self.app: AppProcess | None = None
        self.stop_reason: str | None = None
        self.stopping = False
        self._stop = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Sidecar {self.config.service.name} stopping={self.stopping} {self.health!r}>"

    # -- state for the admin listener -------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "shutting down"
        if not self.health.healthy:
            return False, f"app unhealthy: {self.health.state.output}"
        if self.registration is None or not self.registration.registered:
            error = self.registration.last_error if self.registration else None
            return False, f"not registered: {error or 'registering'}"
        if self.keeper is not None and not self.keeper.valid():
            identity = self.keeper.identity
            why = self.keeper.last_error or "not issued yet"
            if identity is not None:
                until = identity.describe()["not_after"]
                why = f"certificate {identity.serial} not valid now (valid until {until})"
            return False, f"no valid identity: {why}"
        return True, "app healthy and registered"

    def status(self) -> dict[str, Any]:
        ready, reason = self.ready()
        state = self.health.state
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "ready": ready,
            "ready_reason": reason,
            "stopping": self.stopping,
            "config": self.config.summary(),
            "ports": {name: listener.port for name, listener in self.listeners.items()},
            "workers": self.workers.pids if self.workers else [],
            "addresses": {name: f"{lst.host}:{lst.port}" for name, lst in self.listeners.items()},
            "registry": self.registry.describe(),
            "registration": self.registration.describe() if self.registration else None,
            "app": {
                "healthy": state.healthy,
                "output": state.output,
                "consecutive_passes": state.passes,
                "consecutive_failures": state.failures,
                "probes": self.health.probes,
                "pid": self.app.pid if self.app else None,
            },
            "identity": self._identity(),
            "upstreams": self._upstreams(),
            "requests": {
                "inbound": self.inbound.requests,
                "outbound": self.outbound.requests,
                "inbound_active": self.inbound_forwarder.active,
                "outbound_active": self.outbound_forwarder.active,
                "inbound_h2_streams": self.inbound_forwarder.h2_streams,
                "outbound_h2_streams": self.outbound_forwarder.h2_streams,
            },
        }

    def _identity(self) -> dict[str, Any] | None:
        if self.keeper is None:
            return None
        described = self.keeper.describe()
        described["mtls"] = self.config.security.mtls
        described["authorizer"] = self.authorizer.describe() if self.authorizer is not None else None
        described["denied"] = self.inbound.denied
        server = self.listeners["inbound"].server
        described["tls_failures"] = server.tls_failures if server is not None else 0
        return described

    def metrics(self) -> tuple[bytes, str]:
        return self.metrics_registry.render()

    def _refresh_metrics(self) -> None:
        m = self.metrics_registry
        m.set_app_healthy(self.health.healthy)
        if self.keeper is not None:
            m.set_identity(self.keeper.seconds_to_expiry(), self.keeper.rotations)
        registration = self.registration
        m.set_registry(
            registration is not None and registration.last_error is None and registration.registered,
            registration.last_success if registration else None,
        )
        for name, watch in self.discovery.watches.items():
            total, ejected = self.balancer.counts(name)
            m.set_endpoints(name, len(watch.instances), ejected if total else 0)

    def _on_eject(self, service: str, instance: Instance, seconds: float) -> None:
        self.metrics_registry.inc_ejection(service)
        log.warning("ejected %s of %r for %.0fs after repeated failures", instance.endpoint, service, seconds)

    def _upstreams(self) -> dict[str, Any]:
        upstreams = self.discovery.describe()
        for name, entry in upstreams.items():
            if isinstance(entry, dict):
                entry["endpoints"] = self.balancer.describe(name)
                entry["outstanding"] = self.balancer.outstanding(name)
        return upstreams

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self._stop.set()

    # -- lifecycle ----------------------------------------------------------------------

    def _instance(self) -> Instance:
        svc = self.config.service
        port = self.listeners["inbound"].port
        instance_id = svc.id or f"{svc.name}-{svc.advertise_address}-{port}"
        meta = {
            "sidecar_version": __version__,
            "app_port": str(self.config.app.port),
            MTLS_META: self.config.security.mtls,
            H2_META: "1",
            APP_PROTOCOL_META: self.config.app.protocol,
            **svc.meta,
        }
        return Instance(
            id=instance_id, name=svc.name, address=svc.advertise_address, port=port, tags=svc.tags, meta=meta
        )

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        first_signal: tuple[int, float] | None = None

        def on_signal(signum: int) -> None:
            nonlocal first_signal
            now = loop.time()
            if first_signal is not None:
                # `timeout`, shells and some init systems signal the process and then its
                # group: the same signal twice within a moment is one stop request.
                if first_signal[0] == signum and now - first_signal[1] < DUPLICATE_SIGNAL_WINDOW:
                    return
                log.warning("second %s: exiting at once", signal.Signals(signum).name)
                if self.app is not None:
                    self.app.signal(signal.SIGKILL)
                if self.workers is not None:
                    self.workers.kill()
                os._exit(128 + signum)
            first_signal = (signum, now)
            log.info("%s received: draining", signal.Signals(signum).name)
            self.request_stop(signal.Signals(signum).name)

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)

        try:
            await self.registry.open()
        except RegistryError as exc:  # keep serving; the registration loop retries
            log.warning("%s", exc)
        if self.keeper is not None:
            await self.keeper.start()  # before the first handshake and the registration
        if self.authorizer is not None:
            await self.authorizer.open()  # starts keeping the rules current
        await self.inbound_forwarder.start()
        await self.outbound_forwarder.start()
        started: list[Listener] = []
        try:
            for listener in self.listeners.values():
                await listener.start()
                started.append(listener)
        except OSError as exc:
            log.error("%s", exc.strerror or exc)
            for listener in started:
                await listener.stop()
            await self._close()
            return 2
        cfg = self.config
        loop.call_later(CYCLES_CHECK_EVERY, collect_cycles, loop)
        if self.is_worker:
            return await self._run_worker()
        log.info(
            "micro-sidecar %s for service %r: inbound %s:%d -> app %s:%d, outbound %s:%d, admin %s:%d, "
            "registry %s",
            __version__,
            cfg.service.name,
            cfg.listen.inbound_host,
            self.listeners["inbound"].port,
            cfg.app.host,
            cfg.app.port,
            cfg.listen.outbound_host,
            self.listeners["outbound"].port,
            cfg.listen.admin_host,
            self.listeners["admin"].port,
            self.registry.kind,
        )
        check = CheckSpec(ttl=cfg.registry.ttl, deregister_after=cfg.registry.deregister_after)
        self.registration = Registration(self.registry, self._instance(), check, self.health)
        if cfg.listen.workers > 1:
            self.workers = Workers(cfg.listen.workers, sys.argv[1:], cfg.command)
            await self.workers.start(self.listeners["inbound"].port, self.listeners["outbound"].port)

        parts: dict[str, asyncio.Task[Any]] = {
            "health checker": asyncio.create_task(self.health.run(), name="health"),
            "registration": asyncio.create_task(self.registration.run(), name="registration"),
        }
        self._start_identity(parts)
        exit_code = 0
        if cfg.command:
            env = dict(os.environ)
            env["MICRO_SIDECAR_OUTBOUND"] = f"http://127.0.0.1:{self.listeners['outbound'].port}"
            env["PORT"] = str(cfg.app.port)
            self.app = AppProcess(cfg.command, env)
            try:
                await self.app.start()
            except AppStartError as exc:
                log.error("%s", exc)
                self.request_stop("app failed to start")
                exit_code = EXIT_APP_NOT_FOUND
            else:
                parts["app"] = asyncio.create_task(self.app.wait(), name="app")

        stop_wait = asyncio.create_task(self._stop.wait(), name="stop")
        done, _ = await asyncio.wait([stop_wait, *parts.values()], return_when=asyncio.FIRST_COMPLETED)
        for part, task in parts.items():
            if task in done:
                if part == "app":
                    code = task.result()
                    log.info("app exited with code %d", code)
                    parts["health checker"].cancel()
                    await self.health.mark_down(f"app exited with code {code}")
                    exit_code = code if code >= 0 else 128 - code
                    self.request_stop("app exited")
                else:
                    failure = task.exception()
                    log.error("part %r crashed: %r; shutting down", part, failure)
                    exit_code = EXIT_CRASH
                    self.request_stop(f"{part} crashed")
        stop_wait.cancel()

        code = await self._shutdown(parts)
        return exit_code if code is None else code

    async def _run_worker(self) -> int:
        """A forwarding worker of `--workers N`: no registration, no admin, no app."""
        log.info(
            "worker %d of %r (pid %d): inbound port %d, outbound port %d",
            self.config.listen.worker_index,
            self.config.service.name,
            os.getpid(),
            self.listeners["inbound"].port,
            self.listeners["outbound"].port,
        )
        parts = {
            "health checker": asyncio.create_task(self.health.run(), name="health"),
            "primary": asyncio.create_task(watch_primary(self.config.listen.primary_pid), name="primary"),
        }
        self._start_identity(parts)
        stop_wait = asyncio.create_task(self._stop.wait(), name="stop")
        done, _ = await asyncio.wait([stop_wait, *parts.values()], return_when=asyncio.FIRST_COMPLETED)
        if parts["primary"] in done:
            self.request_stop("the primary process is gone")
        stop_wait.cancel()
        self.stopping = True
        await self.listeners["inbound"].stop()
        await self._stop_outbound()
        for task in parts.values():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._close()
        return 0

    async def _stop_outbound(self) -> None:
        """The outbound listener and the --upstream ones, which follow its rules."""
        for part, listener in self.listeners.items():
            if part == "outbound" or part.startswith("upstream "):
                await listener.stop()

    async def _shutdown(self, parts: dict[str, asyncio.Task[Any]]) -> int | None:
        """The ordered stop; returns the app's exit code when it was stopped here."""
        self.stopping = True
        lifecycle = self.config.lifecycle
        log.info("stopping (%s)", self.stop_reason)
        assert self.registration is not None
        await self.registration.announce_stop()
        # Even when the app is already gone, keep the listeners for the drain delay: peers
        # that have not seen the news yet get a fast 503 from us instead of a refused
        # connection. Every answer from now on closes its connection, so that no caller
        # keeps one pooled that would be closed under its next request.
        for listener in self.listeners.values():
            if listener.server is not None:
                listener.server.draining = True
        if lifecycle.drain_delay > 0:
            await asyncio.sleep(lifecycle.drain_delay)
        workers_done = (
            asyncio.create_task(self.workers.stop(lifecycle.grace_period + 1.0)) if self.workers else None
        )
        await self.listeners["inbound"].stop()
        app_code: int | None = None
        if self.app is not None and self.app.proc is not None and self.app.proc.returncode is None:
            app_code = await self.app.stop(timeout=max(lifecycle.grace_period, 1.0))
            app_code = app_code if app_code is None or app_code >= 0 else 0
        await self._stop_outbound()
        if workers_done is not None:
            await workers_done
        for part in ("registration", "health checker", "identity"):
            if part in parts:
                parts[part].cancel()
        for task in parts.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.registration.deregister()
        await self._close()
        await self.listeners["admin"].stop()
        log.info("stopped")
        # An app we stopped ourselves with SIGTERM is a clean stop, not a failure.
        return 0 if app_code is not None else None

    def _start_identity(self, parts: dict[str, asyncio.Task[Any]]) -> None:
        if self.keeper is not None:
            parts["identity"] = asyncio.create_task(self.keeper.run(), name="identity")

    async def _close(self) -> None:
        if self.authorizer is not None:
            await self.authorizer.close()
        if self.keeper is not None:
            await self.keeper.close()
        if self.exporter is not None:
            await asyncio.to_thread(self.exporter.shutdown)  # flush queued spans
            self.exporter = None
        await self.discovery.close()
        await self.inbound_forwarder.close()
        await self.outbound_forwarder.close()
        await self.registry.close()


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s micro-sidecar %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def tune_gc() -> None:
    """Collect cyclic garbage less often: a proxy allocates many short-lived objects per
    request (freed by reference counting anyway), and the default thresholds made the
    collector re-scan a large heap (e.g. 10,000 instances) every few hundred allocations.
    Objects alive after start-up are frozen out of the collections altogether."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


# With those thresholds the oldest generation is seldom collected, and some garbage is
# cyclic: a TLS exchange given up on (a per-try timeout, a caller that left) leaves about
# 28 KiB in reference cycles that outlive the young collections, and a soak with mTLS grew
# the caller by ~0.7 MiB/s. So once a second, if any was given up on since the last look,
# a full collection runs; a sidecar without such faults never pays for one.
CYCLES_CHECK_EVERY = 1.0


def collect_cycles(loop: asyncio.AbstractEventLoop, seen: int = 0) -> None:
    now = Pool.abandoned_tls
    if now != seen:
        gc.collect()
    loop.call_later(CYCLES_CHECK_EVERY, collect_cycles, loop, now)


def run(config: Config) -> int:
    """Run the sidecar until it stops; returns the process exit code."""
    setup_logging(config.log_level)
    tune_gc()
    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - Windows
        pass

    async def main() -> int:
        return await Sidecar(config).run()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())
