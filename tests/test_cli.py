"""The command line: bad input is one line naming the flag and exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from sidecar import __version__
from sidecar.cli import cli


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MICRO_SIDECAR_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=30, env=full_env
    )


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert __version__ in result.stdout


@pytest.mark.parametrize(
    ("args", "env", "flag"),
    [
        ([], {}, "--app-port"),
        (["--app-port", "70000"], {}, "--app-port"),
        (["--app-port", "abc"], {}, "--app-port"),
        (["--app-port", "80", "--meta", "novalue"], {}, "--meta"),
        (["--app-port", "80", "--registry", "zookeeper"], {}, "--registry"),
        (["--app-port", "80", "--inbound-port", "-1"], {}, "--inbound-port"),
        (["--app-port", "80", "--health-interval", "0"], {}, "--health-interval"),
        (["--app-port", "80", "--health-path", "health"], {}, "--health-path"),
        (["--app-port", "80", "--name", "bad name!"], {}, "--name"),
        (["--app-port", "80", "--log-level", "loud"], {}, "--log-level"),
        (["--app-port", "80"], {"MICRO_SIDECAR_HEALTH_TIMEOUT": "soon"}, "--health-timeout"),
        (["--app-port", "80", "--no-such-flag"], {}, "--no-such-flag"),
        (["--app-port", "80", "--mtls", "sometimes"], {}, "--mtls"),
        (["--app-port", "80", "--identity", "vault"], {}, "--identity"),
        (["--app-port", "80", "--identity", "files"], {}, "--tls-cert"),
        (["--app-port", "80", "--tls-key", "k.pem"], {}, "--tls-key"),
        (["--app-port", "80", "--cert-ttl", "0.5"], {}, "--cert-ttl"),
        (["--app-port", "80", "--trust-domain", "Not A Domain"], {}, "--trust-domain"),
        (["--app-port", "80", "--allow-from", "bad name"], {}, "--allow-from"),
        (["--app-port", "80", "--mtls", "off", "--allow-from", "web"], {}, "--allow-from"),
        (["--app-port", "80", "--identity", "consul"], {}, "--identity"),
    ],
)
def test_bad_values_exit_2_with_one_line_naming_the_flag(args, env, flag):
    result = run_cli(*args, env=env)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert flag in lines[0]
    assert "Traceback" not in result.stderr


def test_env_vars_feed_every_flag(monkeypatch):
    captured = {}

    def fake_run(config):
        captured["config"] = config
        return 0

    monkeypatch.setattr("sidecar.runtime.run", fake_run)
    runner = CliRunner()
    result = runner.invoke(
        cli,
        ["--tag", "v1"],
        env={
            "MICRO_SIDECAR_APP_PORT": "3000",
            "MICRO_SIDECAR_NAME": "greeter",
            "MICRO_SIDECAR_HEALTH_INTERVAL": "0.5",
            "MICRO_SIDECAR_META": "team=web",
            "MICRO_SIDECAR_REGISTRY_PATH": "/tmp/x.sqlite3",
        },
        auto_envvar_prefix="MICRO_SIDECAR",
    )
    assert result.exit_code == 0, result.output
    config = captured["config"]
    assert config.app.port == 3000
    assert config.service.name == "greeter"
    assert config.app.health_interval == 0.5
    assert dict(config.service.meta) == {"team": "web"}
    assert config.service.tags == ("v1",)
    assert str(config.registry.path) == "/tmp/x.sqlite3"


def test_default_name_comes_from_the_command(monkeypatch):
    captured = {}
    monkeypatch.setattr("sidecar.runtime.run", lambda config: captured.setdefault("c", config) and 0)
    result = CliRunner().invoke(cli, ["--app-port", "3000", "--", "node", "server.js"])
    assert result.exit_code == 0, result.output
    assert captured["c"].service.name == "node"
    assert captured["c"].command == ("node", "server.js")


def test_busy_port_is_a_clear_error(registry_path):
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        result = run_cli(
            "--app-port",
            "9",
            "--inbound-host",
            "127.0.0.1",
            "--inbound-port",
            str(port),
            "--outbound-port",
            "0",
            "--admin-port",
            "0",
            "--registry-path",
            str(registry_path),
        )
    finally:
        holder.close()
    assert result.returncode == 2
    assert f"inbound listener cannot bind 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
