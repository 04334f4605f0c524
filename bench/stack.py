"""The processes under test: the upstream app, two sidecars on one local registry, nginx.

    direct      wrk -> app
    sidecar     wrk -> sidecar B inbound -> app                               (one hop)
    mesh        wrk -> sidecar A outbound (/upstream/...) -> sidecar B inbound -> app
    mesh-mtls   the same two hops, A -> B over mutual TLS (their own registry and mesh CA)
    workers     wrk -> sidecar W inbound (--workers N, on N cores) -> app    (scaling)
    nginx       wrk -> nginx keep-alive reverse proxy (1 worker) -> app        (the reference)
    nginx-2hop  wrk -> nginx front -> nginx back -> app            (two hops, like mesh)
    nginx-tls   the same two hops, front -> back over TLS with client certificates from a
                CA the bench makes                                 (like mesh-mtls)

Every sidecar but mesh-mtls's runs with `--mtls off`, so those rows measure what they
measured before mutual TLS existed.

The app is nginx too (1 worker): `return 200` for the small response, a static 10 MiB file
with sendfile for the download, and a sink that reads a whole upload before it answers.
It is the fastest upstream at hand, so it is not what limits any row.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import tls as tlsbench
from harness import BIG, SMALL_BODY, Harness, Proc, free_port, http_get, on_free_ports, wait_http, wait_port

UPSTREAM_NAME = "upstream"
CLIENT_NAME = "client"

_COMMON = """\
worker_processes 1;
daemon off;
master_process on;
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 8192; }}
http {{
  {access_log}
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  default_type application/octet-stream;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_timeout 120s;
  keepalive_requests 1000000;
  client_max_body_size 0;
{server}
}}
"""

# The upload sink: `mirror` reads the whole request body (in memory: buffer > 10 MiB) before
# the request goes on; POST on a static file is then a 405, turned into a 200 "ok".
# (A plain `return 200` would answer before the body is read, which breaks keep-alive
# clients that are still sending.)
_APP_SERVER = """\
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    root {dir}/www;
    client_body_buffer_size 16m;
    location = /small {{ default_type text/plain; return 200 "{small}"; }}
    location = /caller {{
      default_type text/plain;
      return 200 "$http_x_sidecar_caller$http_x_client_verify\\n";
    }}
    location = /health {{ return 200 "ok"; }}
    location = /10m {{ }}
    location = /upload {{ mirror /sink; error_page 405 =200 /ok; }}
    location = /sink {{ internal; return 204; }}
    location = /ok {{ default_type text/plain; }}
  }}
"""

# The reference: a keep-alive reverse proxy that streams both ways like the sidecar does
# (no response buffering, no request buffering, 64 KiB reads like the sidecar's chunks)
# and sets the same kind of forwarding headers. The two-hop rows chain two of these;
# nginx-tls adds TLS to the back's server and to the front's proxy_pass. The Host header
# goes on as it came; an HTTP/1.0 request without one (openssl s_time's) gets the address it
# came to instead of an empty Host, which the app (HTTP/1.1) would refuse with a 400.
_PROXY_SERVER = """\
  map $http_host $host_header {{ "" $server_addr:$server_port; default $http_host; }}
  upstream next_hop {{
    server 127.0.0.1:{next_port};
    keepalive 1024;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
  }}
  server {{
    listen 127.0.0.1:{port}{listen_opts} backlog=1024;
{server_tls}    location / {{
      proxy_pass {scheme}://next_hop;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host_header;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $http_host;
      proxy_set_header X-Request-Id $request_id;
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_buffer_size 64k;
      proxy_buffers 8 64k;
      client_body_buffer_size 64k;
      proxy_max_temp_file_size 0;
{location_tls}    }}
  }}
"""

# nginx-tls's back: TLS 1.2 or 1.3 as the sidecars take it, a client certificate from the
# bench CA required; X-Client-Verify (the app's /caller echoes it) shows that it was checked,
# and over which TLS version.
_SERVER_TLS = """\
    ssl_certificate {dir}/back.pem;
    ssl_certificate_key {dir}/back.key;
    ssl_client_certificate {dir}/ca.pem;
    ssl_verify_client on;
    ssl_protocols TLSv1.2 TLSv1.3;
"""
_BACK_CALLER = """\
      proxy_set_header X-Client-Verify "$ssl_client_verify $ssl_protocol";
"""

# nginx-tls's front: dials the back with its client certificate and checks the back's
# certificate and name (the sidecar checks the SPIFFE URI instead, which nginx cannot).
# nginx 1.22 leaves TLS 1.3 out of proxy_ssl_protocols by default: named here.
_UPSTREAM_TLS = """\
      proxy_ssl_certificate {dir}/front.pem;
      proxy_ssl_certificate_key {dir}/front.key;
      proxy_ssl_trusted_certificate {dir}/ca.pem;
      proxy_ssl_verify on;
      proxy_ssl_name {back_name};
      proxy_ssl_protocols TLSv1.2 TLSv1.3;
"""
NGINX_TLS_DOMAIN = "nginx-tls.bench"
NGINX_BACK_NAME = "back.nginx-tls.bench"


def _proxy_server(
    port: int,
    next_port: int,
    *,
    server_tls: str = "",
    location_tls: str = "",
    https: bool = False,
    http2: bool = False,
) -> str:
    """`http2`: the listener takes HTTP/2 (h2c with prior knowledge without TLS), not HTTP/1.1:
    the h2-nginx row (bench/h2stack.py). The upstream side stays HTTP/1.1."""
    return _PROXY_SERVER.format(
        port=port,
        next_port=next_port,
        listen_opts=(" ssl" if server_tls else "") + (" http2" if http2 else ""),
        server_tls=server_tls,
        scheme="https" if https else "http",
        location_tls=location_tls,
    )


def _nginx_conf(directory: Path, server: str, access_log: bool) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    # As root, nginx's worker would switch to `nobody`, which cannot read our 0700 temp dir.
    user = "user root;" if os.geteuid() == 0 else ""
    conf = directory / "nginx.conf"
    log = f"access_log {directory}/access.log;" if access_log else "access_log off;"
    conf.write_text(_COMMON.format(user=user, dir=directory, server=server, access_log=log))
    return conf


def _start_nginx(
    harness: Harness, name: str, directory: Path, server: str, core: int, access_log: bool = False
) -> Proc:
    conf = _nginx_conf(directory, server, access_log)
    argv = ["nginx", "-p", str(directory), "-c", str(conf), "-e", str(directory / "error.log")]
    # SIGQUIT would wait for keep-alive clients; SIGTERM is nginx's fast shutdown.
    return harness.start(name, argv, core=core, stop_signal=signal.SIGTERM)


@dataclass
class Target:
    name: str
    base: str  # URL prefix that paths are appended to
    port: int
    prefix: str  # path prefix inside `base` (the mesh's /<service>)
    procs: list[Proc] = field(default_factory=list)  # the proxy processes (none for direct)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def url(self, path: str) -> str:
        return f"{self.base}{path}"


@dataclass
class TlsServer:
    """A port that takes TLS with client certificates, for the handshake measurement.

    `ca_cert` signed the server's certificate; its key (`ca_cert` with the suffix `.key`)
    signs the client's."""

    label: str
    port: int
    procs: list[Proc]
    ca_cert: Path

    @property
    def ca_key(self) -> Path:
        return self.ca_cert.with_suffix(".key")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]


@dataclass
class Stack:
    app: Proc
    app_port: int
    targets: dict[str, Target]
    sidecars: dict[str, Proc]
    tls: dict[str, TlsServer] = field(default_factory=dict)  # by target: mesh-mtls, nginx-tls


def start_stack(
    harness: Harness,
    names: list[str],
    proxy_core: int,
    app_core: int,
    access_log: bool = False,
    workers: int = 2,
    workers_cores: str = "0,1",
) -> Stack:
    """Start the app and the targets in `names`; the proxies log each request only with `access_log`.
    The `workers` target is one sidecar with `--workers` processes on `workers_cores`."""
    work = harness.workdir
    app_dir = work / "app"
    (app_dir / "www").mkdir(parents=True)
    with open(app_dir / "www" / "10m", "wb") as f:
        f.write(os.urandom(BIG))
    (app_dir / "www" / "upload").write_text("ok\n")
    (app_dir / "www" / "ok").write_text("ok\n")
    small = SMALL_BODY.decode().replace("\n", "\\n")

    # Each process binds ports chosen before it starts (free_port()): on_free_ports starts it
    # again on new ones when another process took one in between.
    def start_app() -> tuple[Proc, int]:
        port = free_port()
        server = _APP_SERVER.format(port=port, dir=app_dir, small=small)
        app = _start_nginx(harness, "app-nginx", app_dir, server, app_core)
        wait_http(f"http://127.0.0.1:{port}/small", app, want=SMALL_BODY)
        return app, port

    app, app_port = on_free_ports(start_app)

    targets: dict[str, Target] = {}
    sidecars: dict[str, Proc] = {}
    tls: dict[str, TlsServer] = {}
    if "direct" in names:
        targets["direct"] = Target("direct", f"http://127.0.0.1:{app_port}", app_port, "")

    if "sidecar" in names or "mesh" in names:
        b, b_ports = _start_b(
            harness, "sidecar-b", app_port, work / "registry.sqlite3", proxy_core, access_log
        )
        sidecars["b"] = b
        if "sidecar" in names:
            targets["sidecar"] = Target("sidecar", f"http://127.0.0.1:{b_ports[0]}", b_ports[0], "", [b])
        if "mesh" in names:
            a, a_ports = _start_a(
                harness, "sidecar-a", app_port, work / "registry.sqlite3", proxy_core, access_log
            )
            sidecars["a"] = a
            targets["mesh"] = _mesh_target("mesh", a_ports, [a, b], caller="")

    if "mesh-mtls" in names:
        # Its own registry, so that neither pair sees the other's B; the sidecars make the
        # mesh CA beside it (mesh-ca.pem, mesh-ca.key), where the handshake client gets a leaf.
        mtls_dir = work / "mesh-mtls"
        mtls_dir.mkdir(mode=0o700)
        registry = mtls_dir / "registry.sqlite3"
        mb, mb_ports = _start_b(
            harness, "sidecar-b-mtls", app_port, registry, proxy_core, access_log, "permissive"
        )
        ma, ma_ports = _start_a(
            harness, "sidecar-a-mtls", app_port, registry, proxy_core, access_log, "permissive"
        )
        sidecars["b-mtls"], sidecars["a-mtls"] = mb, ma
        # B tells the app who called: A's verified identity proves that A dialled B over mTLS.
        targets["mesh-mtls"] = _mesh_target("mesh-mtls", ma_ports, [ma, mb], caller=CLIENT_NAME)
        tls["mesh-mtls"] = TlsServer("sidecar B inbound", mb_ports[0], [mb], mtls_dir / "mesh-ca.pem")

    if "workers" in names:
        # its own registry file: another instance of the same name would join the mesh row
        def start_w() -> tuple[Proc, tuple[int, int, int]]:
            ports = _sidecar_ports()
            w = _start_sidecar(
                harness,
                "sidecar-workers",
                UPSTREAM_NAME,
                app_port,
                ports,
                work / "registry-workers.sqlite3",
                workers_cores,
                access_log,
                "off",
                extra=["--workers", str(workers)],
            )
            wait_http(f"http://127.0.0.1:{ports[2]}/ready", w)
            wait_http(f"http://127.0.0.1:{ports[0]}/small", w, want=SMALL_BODY)
            return w, ports

        w, w_ports = on_free_ports(start_w)
        sidecars["workers"] = w
        targets["workers"] = Target("workers", f"http://127.0.0.1:{w_ports[0]}", w_ports[0], "", [w])

    if "nginx" in names:

        def start_proxy() -> tuple[Proc, int]:
            port = free_port()
            proxy = _start_nginx(
                harness,
                "proxy-nginx",
                work / "proxy",
                _proxy_server(port, app_port),
                proxy_core,
                access_log,
            )
            wait_http(f"http://127.0.0.1:{port}/small", proxy, want=SMALL_BODY)
            return proxy, port

        proxy, port = on_free_ports(start_proxy)
        targets["nginx"] = Target("nginx", f"http://127.0.0.1:{port}", port, "", [proxy])

    if "nginx-2hop" in names:
        front, back, port, _ = _start_nginx_pair(
            harness, work / "nginx-2hop", app_port, proxy_core, access_log
        )
        target = Target("nginx-2hop", f"http://127.0.0.1:{port}", port, "", [front, back])
        targets["nginx-2hop"] = _checked(target, "")

    if "nginx-tls" in names:
        tls_dir = work / "nginx-tls"
        ca = tlsbench.make_bench_ca(tls_dir, NGINX_TLS_DOMAIN)
        tlsbench.mint_leaf(ca, "nginx-front", tls_dir / "front")
        tlsbench.mint_leaf(ca, "nginx-back", tls_dir / "back", dns_name=NGINX_BACK_NAME)
        front, back, port, back_port = _start_nginx_pair(
            harness, tls_dir, app_port, proxy_core, access_log, tls=True
        )
        target = Target("nginx-tls", f"http://127.0.0.1:{port}", port, "", [front, back])
        targets["nginx-tls"] = _checked(target, "SUCCESS TLSv1.3")
        tls["nginx-tls"] = TlsServer("nginx back", back_port, [back], ca)

    return Stack(app, app_port, {n: targets[n] for n in names if n in targets}, sidecars, tls)


def _start_nginx_pair(
    harness: Harness, directory: Path, app_port: int, core: int, access_log: bool, tls: bool = False
) -> tuple[Proc, Proc, int, int]:
    """A back nginx in front of the app and a front nginx in front of it (over TLS with
    client certificates when `tls`): the processes, the front's port and the back's."""
    prefix = directory.name

    def start_back() -> tuple[Proc, int]:
        port = free_port()
        if tls:
            server = _proxy_server(
                port, app_port, server_tls=_SERVER_TLS.format(dir=directory), location_tls=_BACK_CALLER
            )
        else:
            server = _proxy_server(port, app_port)
        back = _start_nginx(harness, f"{prefix}-back", directory / "back", server, core, access_log)
        if tls:  # it takes only TLS with a client certificate: the front's check below tries that
            wait_port(port, back)
        else:
            wait_http(f"http://127.0.0.1:{port}/small", back, want=SMALL_BODY)
        return back, port

    back, back_port = on_free_ports(start_back)

    def start_front() -> tuple[Proc, int]:
        port = free_port()
        if tls:
            upstream_tls = _UPSTREAM_TLS.format(dir=directory, back_name=NGINX_BACK_NAME)
            server = _proxy_server(port, back_port, location_tls=upstream_tls, https=True)
        else:
            server = _proxy_server(port, back_port)
        front = _start_nginx(harness, f"{prefix}-front", directory / "front", server, core, access_log)
        wait_http(f"http://127.0.0.1:{port}/small", front, want=SMALL_BODY)
        return front, port

    front, port = on_free_ports(start_front)
    return front, back, port, back_port


def _checked(target: Target, caller: str) -> Target:
    """`target`, once the app's /caller echo through it is `caller`: proof that the second hop
    is what the row says. Sidecar B sets X-Sidecar-Caller to the service of a caller it
    verified over mutual TLS; nginx-tls's back sets X-Client-Verify (SUCCESS and the TLS
    version); a plaintext second hop sets neither."""
    status, body = http_get(target.url("/caller"))
    if status != 200 or body != f"{caller}\n".encode():
        how = f"with a verified client certificate ({caller})" if caller else "in plaintext"
        raise RuntimeError(
            f"{target.name}: the second hop was not reached {how}: HTTP {status} {body[:200]!r}"
        )
    return target


def _sidecar_ports() -> tuple[int, int, int]:
    return free_port(), free_port(), free_port()


def _start_hop(
    harness: Harness,
    label: str,
    service: str,
    app_port: int,
    registry: Path,
    core: int,
    access_log: bool,
    mtls: str,
    ready_path: tuple[int, str],
) -> tuple[Proc, tuple[int, int, int]]:
    """One sidecar of the mesh pair, ready once `ready_path` (which of its ports, path)
    answers the small body; started again on new ports when one was taken."""

    def start() -> tuple[Proc, tuple[int, int, int]]:
        ports = _sidecar_ports()
        proc = _start_sidecar(harness, label, service, app_port, ports, registry, core, access_log, mtls)
        wait_http(f"http://127.0.0.1:{ports[2]}/ready", proc)
        wait_http(f"http://127.0.0.1:{ports[ready_path[0]]}{ready_path[1]}", proc, want=SMALL_BODY)
        return proc, ports

    return on_free_ports(start)


def _start_b(
    harness: Harness,
    label: str,
    app_port: int,
    registry: Path,
    core: int,
    access_log: bool,
    mtls: str = "off",
) -> tuple[Proc, tuple[int, int, int]]:
    """Sidecar B: `upstream` in front of the app; ready once its inbound port serves."""
    return _start_hop(
        harness, label, UPSTREAM_NAME, app_port, registry, core, access_log, mtls, (0, "/small")
    )


def _start_a(
    harness: Harness,
    label: str,
    app_port: int,
    registry: Path,
    core: int,
    access_log: bool,
    mtls: str = "off",
) -> tuple[Proc, tuple[int, int, int]]:
    """Sidecar A: `client`, whose outbound port reaches B by name; ready once it does."""
    where = (1, f"/{UPSTREAM_NAME}/small")
    return _start_hop(harness, label, CLIENT_NAME, app_port, registry, core, access_log, mtls, where)


def _mesh_target(name: str, a_ports: tuple[int, int, int], procs: list[Proc], caller: str) -> Target:
    """The two-hop target through A's outbound port (B's service name as the path prefix)."""
    base = f"http://127.0.0.1:{a_ports[1]}/{UPSTREAM_NAME}"
    return _checked(Target(name, base, a_ports[1], f"/{UPSTREAM_NAME}", procs), caller)


def _start_sidecar(
    harness: Harness,
    label: str,
    name: str,
    app_port: int,
    ports: tuple[int, int, int],
    registry: Path,
    core: int | str,
    access_log: bool,
    mtls: str,
    extra: list[str] | None = None,
    health_path: str = "/health",
) -> Proc:
    """`health_path` "": the sidecar probes its app by TCP connect (a gRPC app has no /health)."""
    inbound, outbound, admin = ports
    argv = [
        sys.executable,
        "-m",
        "sidecar",
        "--name",
        name,
        "--app-port",
        str(app_port),
        "--inbound-host",
        "127.0.0.1",
        "--inbound-port",
        str(inbound),
        "--outbound-port",
        str(outbound),
        "--admin-port",
        str(admin),
        "--registry-path",
        str(registry),
        "--health-path",
        health_path,
        "--log-level",
        "warning",
        "--drain-delay",
        "0",
        "--access-log",
        "json" if access_log else "off",
        "--mtls",
        mtls,
        *(extra or []),
    ]
    return harness.start(label, argv, core=core, second_signal=True)
