import pytest

from tests.helpers import App, Sidecar, start_supervised

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


@pytest.fixture
def start_supervised_sidecar(procs, registry_path):
    """A sidecar that runs `command` as its app (`-- cmd`), ready and with its app listening
    on the app port; started again on another port if the app finds its port taken."""

    def start(command: list[str], *args: str, **kwargs) -> Sidecar:
        kwargs.setdefault("registry_path", registry_path)

        def launch(app_port: int) -> Sidecar:
            sidecar = Sidecar(app_port, *args, command=command, **kwargs)
            procs.append(sidecar)
            return sidecar

        return start_supervised([launch])[0]

    return start
