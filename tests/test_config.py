from __future__ import annotations

import dataclasses

import pytest

from sidecar.config import ConfigError, build_config, default_registry_path


def test_defaults_are_documented_values():
    config = build_config(app_port=8080)
    assert config.app.host == "127.0.0.1"
    assert config.listen.inbound_port == 15006
    assert config.listen.outbound_port == 15001
    assert config.listen.outbound_host == "127.0.0.1"
    assert config.listen.admin_port == 15020
    assert config.service.name == "app-8080"
    assert config.app.health_path == "/health"
    assert config.registry.kind == "local"
    assert config.registry.ttl >= 3 * config.app.health_interval


def test_config_is_frozen():
    config = build_config(app_port=8080)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.app.port = 1  # type: ignore[misc]


def test_outbound_must_stay_on_loopback():
    with pytest.raises(ConfigError, match="--outbound-host"):
        build_config(app_port=8080, outbound_host="0.0.0.0")


def test_meta_parsing():
    config = build_config(app_port=1, meta=["a=1", "b=x=y"])
    assert dict(config.service.meta) == {"a": "1", "b": "x=y"}
    with pytest.raises(ConfigError, match="--meta"):
        build_config(app_port=1, meta=["=v"])


def test_registry_path_default_under_runtime_dir(tmp_path):
    path = default_registry_path({"XDG_RUNTIME_DIR": str(tmp_path), "USER": "ann"})
    assert path == tmp_path / "micro-sidecar-ann" / "registry.sqlite3"
    fallback = default_registry_path({"XDG_RUNTIME_DIR": str(tmp_path / "missing"), "USER": "ann"})
    assert fallback.name == "registry.sqlite3" and "missing" not in str(fallback)
