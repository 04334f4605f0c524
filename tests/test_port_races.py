"""A supervised app whose port another process took first still comes up (on another port).

The sidecar tells its app which port to bind (PORT, from --app-port), so that port is chosen
before the app starts and can be taken in between; tests.helpers.start_supervised starts
the service again on a new port when the app exits with "address already in use".
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.helpers import ADDRESS_IN_USE_RE, Sidecar, free_port, http, start_supervised


class _Impostor(BaseHTTPRequestHandler):
    """Answers 200 to everything, so the sidecar's probes of the taken port pass."""

    def do_GET(self) -> None:
        body = b"not the app\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def impostor() -> Iterator[int]:
    """Another process's HTTP server on a loopback port: the port the app is first given."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Impostor)
    thread = threading.Thread(target=server.serve_forever, name="impostor", daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_supervised_app_whose_port_is_taken_is_started_again_on_another(procs, registry_path, impostor):
    picked: list[int] = []

    def pick() -> int:  # the first pick is a port someone else took after free_port() saw it free
        picked.append(free_port() if picked else impostor)
        return picked[-1]

    launched: list[Sidecar] = []

    def launch(app_port: int) -> Sidecar:
        sidecar = Sidecar(
            app_port,
            "--name",
            "racer",
            registry_path=registry_path,
            command=[sys.executable, "-m", "tests.apps.echo_app", "--name", "racer"],
        )
        procs.append(sidecar)
        launched.append(sidecar)
        return sidecar

    (sc,) = start_supervised([launch], pick=pick)

    assert len(launched) == 2 and picked[0] == impostor
    first = launched[0]
    assert first.popen.poll() is not None, "the first attempt's app could not bind: its sidecar ends"
    assert ADDRESS_IN_USE_RE.search(first.output()), first.output()
    assert sc is launched[1] and sc.app_port == picked[1] != impostor
    # the app itself answers through its sidecar, not the impostor
    status, _, body = http("GET", f"{sc.inbound}/through-the-sidecar")
    assert status == 200, body
    answer = json.loads(body)
    assert answer["app"] == "racer" and answer["pid"] == sc.status()["app"]["pid"]
