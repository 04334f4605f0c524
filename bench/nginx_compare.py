"""Side by side: what the sidecar and nginx answer to the same hardening-corpus bytes.

    python bench/nginx_compare.py [--cases NAME,NAME...] [--markdown]

Installs nginx from Debian when it is missing (apt-get; needs root), starts the crafted-bytes
app (tests/apps/raw_app.py), one sidecar in front of it (inbound listener) and nginx as a
reverse proxy in front of the same app, all on loopback ports, with a temporary prefix
directory. Each request case of tests/http/test_corpus.py and each malformed-response case
is sent to both; the table shows status, whether the connection was closed, and whether
anything reached the app. Everything started here is stopped by PID at the end.
Not part of the test command: it feeds the closing note of issue 5.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.faultproxy import RawApp, exchange  # noqa: E402
from tests.helpers import ADDRESS_IN_USE_RE, Proc, Sidecar, free_port, wait_for  # noqa: E402
from tests.http.test_corpus import BODY_LIMIT, CASES, RESPONSE_CASES, fill  # noqa: E402

NGINX_CONF = """
worker_processes 1;
daemon off;
user root;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size {body_limit};
    upstream app {{ server 127.0.0.1:{app_port}; keepalive 16; }}
    map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            proxy_read_timeout 5s;
        }}
    }}
}}
"""


def ensure_nginx() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found:
        return found
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    # keep the package's own service from starting on port 80 while installing
    policy = Path("/usr/sbin/policy-rc.d")
    created = not policy.exists()
    if created:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        subprocess.run(["apt-get", "install", "-y", "-q", "nginx-light"], check=True, env=env)
    finally:
        if created:
            policy.unlink()
    return shutil.which("nginx") or "/usr/sbin/nginx"


def start_nginx(binary: str, tmp: Path, app_port: int, attempts: int = 5) -> tuple[Proc, int]:
    """nginx on a port from free_port(); on a new one when another process took that port
    before nginx could bind it (nginx writes its pid file once its listeners are bound)."""
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / sub).mkdir(exist_ok=True)
    conf, pid_file = tmp / "nginx.conf", tmp / "nginx.pid"
    for attempt in range(1, attempts + 1):
        port = free_port()
        conf.write_text(NGINX_CONF.format(tmp=tmp, app_port=app_port, port=port, body_limit=BODY_LIMIT))
        pid_file.unlink(missing_ok=True)
        proc = Proc([binary, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")])
        try:
            wait_for(functools.partial(_nginx_settled, proc, port, pid_file), 10, what="nginx")
        except AssertionError:
            proc.stop()
            raise
        if ADDRESS_IN_USE_RE.search(proc.output()):
            proc.stop()  # it would retry the bind for 2.5 s; no need to wait for that
            if attempt < attempts:
                continue
        if proc.popen.poll() is not None:
            proc.stop()
            raise SystemExit(f"nginx did not start:\n{proc.output()}")
        return proc, port
    raise AssertionError("unreachable")


def _nginx_settled(proc: Proc, port: int, pid_file: Path) -> bool:
    """nginx listens on `port`, or it said it cannot bind it, or it exited."""
    if pid_file.exists() and _connects(port):
        return True
    return proc.popen.poll() is not None or bool(ADDRESS_IN_USE_RE.search(proc.output()))


def _connects(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def probe(port: int, data: bytes, app: RawApp) -> str:
    before = len(app.seen())
    ex = exchange(port, data, timeout=6, close_wait=0.5)
    time.sleep(0.05)
    reached = len(app.seen()) - before
    first = ex.first
    if first.status is None:
        status = "reset" if ex.reset else ("closed" if ex.closed else "timeout")
    else:
        status = str(first.status) + ("" if first.complete else " (truncated)")
    return f"{status:<16} {'closed' if ex.closed else 'open':<6} app:{reached}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args()
    wanted = {c for c in args.cases.split(",") if c}

    binary = ensure_nginx()
    tmp = Path(tempfile.mkdtemp(prefix="nginx-compare-"))
    started: list[Proc] = []
    try:
        app = RawApp(tmp / "seen.jsonl")
        started.append(app)
        app.wait_up()
        sidecar = Sidecar(
            app.port,
            "--name",
            "corpus",
            "--health-path",
            "",
            "--request-timeout",
            "5",
            registry_path=tmp / "registry.sqlite3",
            env={"MICRO_SIDECAR_MAX_REQUEST_BODY": str(BODY_LIMIT)},
        )
        started.append(sidecar)
        sidecar.wait_ready()
        nginx, nginx_port = start_nginx(binary, tmp, app.port)
        started.append(nginx)

        rows: list[tuple[str, str, str, str]] = []
        for case in CASES:
            if wanted and case.name not in wanted:
                continue
            expected = "/".join(map(str, case.status)) + (" closed" if case.close else "")
            cells = []
            for port in (sidecar.inbound_port, nginx_port):
                host = f"127.0.0.1:{port}"
                data = fill(case.data, {"host": host, "authority": host, "pfx": ""})
                cells.append(probe(port, data, app))
            rows.append((case.name, expected, *cells))
        for name, path, clean in RESPONSE_CASES:
            if wanted and f"response_{name}" not in wanted:
                continue
            cells = []
            for port in (sidecar.inbound_port, nginx_port):
                data = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
                cells.append(probe(port, data, app))
            expected = "502" if clean else "502 or truncated"
            if name == "obs_fold":
                expected = "502 or unfolded"  # RFC 9112 section 5.2 allows either
            rows.append((f"response_{name}", expected, *cells))

        head = ("case", "expected", "sidecar (status conn app)", "nginx (status conn app)")
        if args.markdown:
            print("| " + " | ".join(head) + " |")
            print("|" + "---|" * len(head))
            for row in rows:
                print("| " + " | ".join(row) + " |")
        else:
            print(f"{head[0]:<32} {head[1]:<18} {head[2]:<34} {head[3]}")
            for row in rows:
                print(f"{row[0]:<32} {row[1]:<18} {row[2]:<34} {row[3]}")
        version = subprocess.run([binary, "-v"], capture_output=True, text=True).stderr.strip()
        print(f"\n{version}; app:N = requests that reached the app; sidecar on its inbound listener")
    finally:
        for proc in reversed(started):
            proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
