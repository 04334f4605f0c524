import pytest

from tests.helpers import App, Sidecar

pytest_plugins = ["tests.consul_fixtures"]


@pytest.fixture
def registry_path(tmp_path):
    return tmp_path / "registry.sqlite3"


@pytest.fixture
def procs():
    """Start processes through this list; all of them are stopped when the test ends, pass or fail."""
    started: list = []
    yield started
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def start_app(procs):
    def start(name: str = "echo", port: int | None = None) -> App:
        app = App(name, port)
        procs.append(app)
        return app.wait_up()

    return start


@pytest.fixture
def start_sidecar(procs, registry_path):
    def start(app_port: int, *args: str, ready: bool = True, **kwargs) -> Sidecar:
        kwargs.setdefault("registry_path", registry_path)
        sidecar = Sidecar(app_port, *args, **kwargs)
        procs.append(sidecar)
        return sidecar.wait_ready() if ready else sidecar.wait_started()

    return start
