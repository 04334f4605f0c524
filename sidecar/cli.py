"""The command line: flags and MICRO_SIDECAR_* env vars -> Config -> runtime.run()."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from . import __version__
from .config import (
    DEFAULT_ADMIN_PORT,
    DEFAULT_INBOUND_PORT,
    DEFAULT_OUTBOUND_PORT,
    LOG_LEVELS,
    ConfigError,
    build_config,
)

ENV_PREFIX = "MICRO_SIDECAR"
CONSUL_FLAGS = (
    "consul_addr",
    "consul_token",
    "consul_token_file",
    "consul_cacert",
    "consul_client_cert",
    "consul_client_key",
    "consul_ssl_verify",
    "datacenter",
)


@click.command(
    context_settings={"auto_envvar_prefix": ENV_PREFIX, "help_option_names": ["-h", "--help"]},
    epilog="Every flag also reads MICRO_SIDECAR_<FLAG> (e.g. MICRO_SIDECAR_APP_PORT=8080). "
    "With '-- CMD ARGS', the sidecar starts the app itself and stops it when it stops.",
)
@click.version_option(__version__, "--version", prog_name="micro-sidecar")
@click.option("--app-port", type=int, required=True, help="Port the app listens on.")
@click.option("--app-host", default="127.0.0.1", show_default=True, help="Address the app listens on.")
@click.option("--name", default=None, help="Service name (default: the command's name, else app-<port>).")
@click.option("--id", "id_", default=None, help="Instance id (default: <name>-<address>-<inbound port>).")
@click.option("--tag", "tags", multiple=True, help="Service tag (repeatable).")
@click.option("--meta", "meta", multiple=True, metavar="KEY=VALUE", help="Service metadata (repeatable).")
@click.option("--inbound-host", default="0.0.0.0", show_default=True, help="Address for mesh traffic.")
@click.option(
    "--inbound-port",
    type=int,
    default=DEFAULT_INBOUND_PORT,
    show_default=True,
    help="Port for mesh traffic (0: pick a free one).",
)
@click.option(
    "--outbound-port",
    type=int,
    default=DEFAULT_OUTBOUND_PORT,
    show_default=True,
    help="Loopback port the app calls other services through (0: pick a free one).",
)
@click.option(
    "--admin-host",
    default="127.0.0.1",
    show_default=True,
    help="Address of /live, /ready, /status, /metrics (/shutdown stays loopback-only).",
)
@click.option(
    "--admin-port",
    type=int,
    default=DEFAULT_ADMIN_PORT,
    show_default=True,
    help="Port of the admin listener (0: pick a free one).",
)
@click.option(
    "--workers",
    type=int,
    default=1,
    show_default=True,
    help="Processes sharing the inbound and outbound ports (SO_REUSEPORT); one registration.",
)
@click.option("--worker-index", type=int, default=0, hidden=True)
@click.option("--primary-pid", type=int, default=0, hidden=True)
@click.option(
    "--advertise-address",
    default=None,
    help="Address peers use to reach the inbound listener (default: inbound host, or this host's).",
)
@click.option(
    "--health-path",
    default="/health",
    show_default=True,
    help="HTTP path probed on the app; empty for a TCP-connect probe.",
)
@click.option("--health-interval", type=float, default=2.0, show_default=True, help="Seconds between probes.")
@click.option("--health-timeout", type=float, default=1.0, show_default=True, help="Seconds per probe.")
@click.option(
    "--healthy-threshold",
    type=int,
    default=1,
    show_default=True,
    help="Passing probes in a row to become healthy.",
)
@click.option(
    "--unhealthy-threshold",
    type=int,
    default=2,
    show_default=True,
    help="Failing probes in a row to become unhealthy.",
)
@click.option(
    "--request-timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds to wait for an upstream's response (504 after).",
)
@click.option(
    "--max-request-body",
    type=int,
    default=1024**3,
    show_default=True,
    help="Largest request body in bytes (413 beyond; counted while streaming).",
)
@click.option(
    "--app-protocol",
    default="http1",
    show_default=True,
    help="What the app speaks: http1, or h2c (HTTP/2 without TLS: gRPC apps).",
)
@click.option(
    "--health-grpc",
    is_flag=True,
    default=False,
    help="Probe the app with grpc.health.v1.Health/Check instead of --health-path (needs h2c).",
)
@click.option(
    "--health-grpc-service",
    default="",
    help="The service --health-grpc asks about (default: the whole server).",
)
@click.option(
    "--upstream",
    "upstreams",
    multiple=True,
    metavar="NAME=PORT",
    help="A loopback port that always calls service NAME (repeatable), for clients that cannot name it.",
)
@click.option(
    "--h2-max-streams",
    type=int,
    default=1000,
    show_default=True,
    help="HTTP/2 streams a client may open at once on one connection.",
)
@click.option("--registry", default="local", show_default=True, help="Registry backend: local or consul.")
@click.option("--registry-path", default=None, help="SQLite file of the local registry.")
@click.option(
    "--registry-ttl",
    type=float,
    default=None,
    help="Seconds the registry waits for news before it calls this instance gone "
    "(default: 3 probe intervals, at least 3).",
)
@click.option(
    "--deregister-critical-after",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds after which the registry removes an instance that stayed critical.",
)
@click.option(
    "--consul-addr", default=None, help="Consul agent address (default: CONSUL_HTTP_ADDR or 127.0.0.1:8500)."
)
@click.option(
    "--consul-token", default=None, help="Consul ACL token (prefer CONSUL_HTTP_TOKEN or a token file)."
)
@click.option("--consul-token-file", default=None, help="File holding the Consul ACL token.")
@click.option("--consul-cacert", default=None, help="CA certificate for Consul's HTTPS.")
@click.option("--consul-client-cert", default=None, help="Client certificate for Consul's HTTPS.")
@click.option("--consul-client-key", default=None, help="Client key for Consul's HTTPS.")
@click.option(
    "--consul-ssl-verify",
    default=None,
    type=click.Choice(["true", "false"]),
    help="Verify Consul's certificate.",
)
@click.option("--datacenter", default=None, help="Consul datacenter.")
@click.option(
    "--drain-delay",
    type=float,
    default=2.0,
    show_default=True,
    help="Seconds to keep serving after announcing the stop.",
)
@click.option(
    "--grace-period",
    type=float,
    default=20.0,
    show_default=True,
    help="Seconds in-flight requests get to finish when stopping.",
)
@click.option("--lb", default="p2c", show_default=True, help="Outbound balancing: p2c or round_robin.")
@click.option("--connect-timeout", type=float, default=2.0, show_default=True, help="Seconds to connect.")
@click.option(
    "--per-try-timeout",
    type=float,
    default=0.0,
    show_default=True,
    help="Seconds per outbound attempt (0: only the request timeout).",
)
@click.option(
    "--retries", type=int, default=2, show_default=True, help="Outbound retries beyond the first try."
)
@click.option(
    "--retry-budget",
    type=float,
    default=0.2,
    show_default=True,
    help="Retries allowed as a share of recent requests (plus --retry-min-per-second).",
)
@click.option(
    "--retry-min-per-second", type=float, default=3.0, show_default=True, help="Retry budget floor."
)
@click.option(
    "--outlier-failures",
    type=int,
    default=5,
    show_default=True,
    help="Consecutive failures that eject an endpoint.",
)
@click.option(
    "--outlier-ejection-time",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds of the first ejection (grows with each repeat).",
)
@click.option(
    "--max-ejection-percent",
    type=float,
    default=50.0,
    show_default=True,
    help="Largest share of a service's instances ejected at once.",
)
@click.option(
    "--max-outstanding",
    type=int,
    default=0,
    show_default=True,
    help="Outbound requests in flight per service before a fast 503 (0: no limit).",
)
@click.option(
    "--access-log",
    default="json",
    show_default=True,
    help="Access log on stdout: json, text or off.",
)
@click.option(
    "--header-timeout",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds for a client to send a request head (408 after).",
)
@click.option(
    "--idle-timeout",
    type=float,
    default=75.0,
    show_default=True,
    help="Seconds an idle client keep-alive connection stays open.",
)
@click.option(
    "--body-timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds without request-body bytes before the request is cut off.",
)
@click.option(
    "--write-timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds a client may stop reading a response before it is dropped.",
)
@click.option(
    "--tunnel-idle-timeout",
    type=float,
    default=300.0,
    show_default=True,
    help="Seconds a WebSocket tunnel may stay silent both ways before it is closed.",
)
@click.option(
    "--max-connections",
    type=int,
    default=10_000,
    show_default=True,
    help="Client connections per listener (503 and close beyond).",
)
@click.option(
    "--upstream-max-connections",
    type=int,
    default=256,
    show_default=True,
    help="Pooled connections per upstream endpoint.",
)
@click.option(
    "--upstream-max-pending",
    type=int,
    default=1024,
    show_default=True,
    help="Requests waiting for a pooled connection per endpoint (fast 503 beyond).",
)
@click.option(
    "--mtls",
    default="permissive",
    show_default=True,
    help="Mutual TLS between sidecars: permissive (the inbound port also takes plaintext), "
    "strict (plaintext callers get 403 mtls_required) or off.",
)
@click.option(
    "--identity",
    default=None,
    help="Where this sidecar's certificate comes from: local, consul or files (default: as --registry).",
)
@click.option(
    "--trust-domain",
    default="micro-sidecar.local",
    show_default=True,
    help="SPIFFE trust domain of the local CA.",
)
@click.option(
    "--cert-ttl",
    type=float,
    default=86400.0,
    show_default=True,
    help="Seconds a local leaf certificate is valid (renewed at 60-90%% of it).",
)
@click.option("--tls-cert", default=None, help="PEM leaf certificate (chain) for --identity files.")
@click.option("--tls-key", default=None, help="PEM private key for --identity files.")
@click.option("--tls-ca", default=None, help="PEM trusted roots for --identity files.")
@click.option(
    "--allow-from",
    "allow_from",
    multiple=True,
    help="A service that may call this one (repeatable; default: any service of the mesh).",
)
@click.option("--log-level", default="info", show_default=True, help="debug, info, warning or error.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def cli(**opts: Any) -> None:
    """Run a sidecar next to an app: register it, health-check it, forward its HTTP."""
    consul_flags = {key: opts.pop(key) for key in CONSUL_FLAGS}
    try:
        config = build_config(
            app_port=opts["app_port"],
            app_host=opts["app_host"],
            name=opts["name"],
            id=opts["id_"],
            tags=opts["tags"],
            meta=opts["meta"],
            inbound_host=opts["inbound_host"],
            inbound_port=opts["inbound_port"],
            outbound_port=opts["outbound_port"],
            admin_host=opts["admin_host"],
            admin_port=opts["admin_port"],
            workers=opts["workers"],
            worker_index=opts["worker_index"],
            primary_pid=opts["primary_pid"],
            advertise_address=opts["advertise_address"],
            health_path=opts["health_path"],
            health_interval=opts["health_interval"],
            health_timeout=opts["health_timeout"],
            healthy_threshold=opts["healthy_threshold"],
            unhealthy_threshold=opts["unhealthy_threshold"],
            request_timeout=opts["request_timeout"],
            max_request_body=opts["max_request_body"],
            app_protocol=opts["app_protocol"],
            health_grpc=opts["health_grpc"],
            health_grpc_service=opts["health_grpc_service"],
            upstreams=opts["upstreams"],
            h2_max_streams=opts["h2_max_streams"],
            registry=opts["registry"],
            registry_path=opts["registry_path"],
            registry_ttl=opts["registry_ttl"],
            deregister_after=opts["deregister_critical_after"],
            consul_flags=consul_flags,
            drain_delay=opts["drain_delay"],
            grace_period=opts["grace_period"],
            lb=opts["lb"],
            connect_timeout=opts["connect_timeout"],
            per_try_timeout=opts["per_try_timeout"],
            retries=opts["retries"],
            retry_budget=opts["retry_budget"],
            retry_min_per_second=opts["retry_min_per_second"],
            outlier_failures=opts["outlier_failures"],
            outlier_ejection_time=opts["outlier_ejection_time"],
            max_ejection_percent=opts["max_ejection_percent"],
            max_outstanding=opts["max_outstanding"],
            access_log=opts["access_log"],
            header_timeout=opts["header_timeout"],
            idle_timeout=opts["idle_timeout"],
            body_timeout=opts["body_timeout"],
            write_timeout=opts["write_timeout"],
            tunnel_idle_timeout=opts["tunnel_idle_timeout"],
            max_connections=opts["max_connections"],
            upstream_max_connections=opts["upstream_max_connections"],
            upstream_max_pending=opts["upstream_max_pending"],
            log_level=opts["log_level"],
            mtls=opts["mtls"],
            identity=opts["identity"],
            trust_domain=opts["trust_domain"],
            cert_ttl=opts["cert_ttl"],
            tls_cert=opts["tls_cert"],
            tls_key=opts["tls_key"],
            tls_ca=opts["tls_ca"],
            allow_from=opts["allow_from"],
            command=opts["command"],
        )
        if config.registry.kind == "consul":
            from .registry.consul_settings import ConsulSettings

            ConsulSettings.from_sources(consul_flags, os.environ)  # validate now, fail at startup
    except (ConfigError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    problem = _c_parser_problem()
    if problem:
        click.echo(f"micro-sidecar: error: {problem}", err=True)
        sys.exit(2)
    from .runtime import run

    sys.exit(run(config))


def _c_parser_problem() -> str | None:
    """The sidecar relies on llhttp, aiohttp's C parser, for strict HTTP/1.1 parsing; the
    pure-Python fallback is not what the hardening corpus was proven against."""
    from aiohttp import http_parser

    if http_parser.HttpRequestParser.__module__.endswith("_http_parser"):
        return None
    if os.environ.get("AIOHTTP_NO_EXTENSIONS"):
        return "AIOHTTP_NO_EXTENSIONS is set: refusing to run without aiohttp's C HTTP parser (unset it)"
    return "aiohttp's C HTTP parser is not available: reinstall aiohttp from a binary wheel"


def main(argv: list[str] | None = None) -> None:
    """Entry point: click's parsing, but every usage error is one line and exit code 2."""
    args = sys.argv[1:] if argv is None else argv
    command: click.Command = cli
    prog_name = "micro-sidecar"
    if args and not args[0].startswith("-"):
        from .commands import COMMANDS

        if args[0] in COMMANDS:  # micro-sidecar services|call|status ...
            command, prog_name, args = COMMANDS[args[0]], f"micro-sidecar {args[0]}", args[1:]
    try:
        command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        sys.exit(2)
    except click.UsageError as exc:
        click.echo(f"micro-sidecar: error: {_one_line(exc)}", err=True)
        sys.exit(2)
    except click.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"micro-sidecar: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)


def _one_line(exc: click.UsageError) -> str:
    message = exc.format_message()
    if isinstance(exc, click.MissingParameter) and exc.param is not None and exc.param.opts:
        return f"{max(exc.param.opts, key=len)}: is required"
    if isinstance(exc, click.BadParameter) and exc.param is not None and exc.param.opts:
        return f"{max(exc.param.opts, key=len)}: {exc.message}"
    return " ".join(message.split())


__all__ = ["LOG_LEVELS", "cli", "main"]
