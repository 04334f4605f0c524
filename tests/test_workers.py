"""--workers N: several processes share the listeners (SO_REUSEPORT), one registration."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

from tests.helpers import http, wait_for


def listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(inode)
    return inodes


def socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[8:-1])
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_workers_share_the_ports_and_stop_with_the_primary(start_app, start_sidecar):
    app = start_app("w")
    sc = start_sidecar(app.port, "--name", "w", "--workers", "3")
    workers = sc.status()["workers"]
    assert len(workers) == 2
    for port in (sc.inbound_port, sc.outbound_port):
        wait_for(lambda port=port: len(listening_inodes(port)) == 3, 30, what=f"3 sockets on {port}")
        shared = listening_inodes(port)
        for pid in [sc.pid, *workers]:
            assert socket_inodes(pid) & shared, f"process {pid} does not listen on {port}"

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda i: http("GET", f"{sc.inbound}/x{i}")[0], range(60)))
        outbound = list(pool.map(lambda i: http("GET", f"{sc.outbound}/w/y{i}")[0], range(60)))
    assert statuses == [200] * 60
    assert outbound == [200] * 60

    sc.signal(signal.SIGTERM)
    assert sc.wait(20) == 0
    wait_for(lambda: not any(alive(pid) for pid in workers), 10, what="workers gone")
    assert sc.output().count("deregistered") == 1  # one registration for all processes


def test_workers_stop_when_the_primary_is_killed(start_app, start_sidecar):
    app = start_app("w")
    sc = start_sidecar(app.port, "--name", "w", "--workers", "2")
    (worker,) = sc.status()["workers"]
    sc.signal(signal.SIGKILL)
    sc.wait(5)
    wait_for(lambda: not alive(worker), 10, what="the orphaned worker to stop")


def test_worker_command_line_drops_the_app_command_and_sets_the_role():
    from sidecar.workers import worker_argv

    argv = ["--app-port", "3000", "--workers", "4", "--", "node", "server.js"]
    args = worker_argv(argv, ("node", "server.js"), 15006, 15001, 2)
    assert "node" not in args and "--" not in args
    assert args[:4] == ["--app-port", "3000", "--workers", "4"]
    tail = dict(zip(args[4::2], args[5::2], strict=True))
    assert tail["--inbound-port"] == "15006" and tail["--outbound-port"] == "15001"
    assert tail["--workers"] == "1" and tail["--worker-index"] == "2"
    assert tail["--primary-pid"] == str(os.getpid())
