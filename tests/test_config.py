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


def test_http2_and_grpc_options():
    cfg = build_config(app_port=50051, app_protocol="h2c", health_grpc=True, upstreams=["orders=15101"])
    assert cfg.app.protocol == "h2c" and cfg.app.health_grpc and cfg.listen.upstreams == (("orders", 15101),)
    # an h2c app without --health-grpc is probed by TCP: the HTTP probe speaks HTTP/1.1
    assert build_config(app_port=50051, app_protocol="h2c").app.health_path == ""
    assert build_config(app_port=8080).app.protocol == "http1"


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"app_protocol": "h3"}, "--app-protocol"),
        ({"health_grpc": True}, "--health-grpc"),
        ({"health_grpc_service": "x"}, "--health-grpc-service"),
        ({"app_protocol": "h2c", "health_path": "/ping"}, "--health-path"),
        ({"upstreams": ["orders"]}, "--upstream"),
        ({"upstreams": ["Orders=1"]}, "--upstream"),
        ({"upstreams": ["a=15101", "b=15101"]}, "--upstream"),
        ({"upstreams": ["a=15001"]}, "--upstream"),  # the outbound listener's port
        ({"upstreams": ["a=70000"]}, "--upstream"),
        ({"h2_max_streams": 0}, "--h2-max-streams"),
    ],
)
def test_bad_http2_and_grpc_options_name_their_flag(kwargs, flag):
    with pytest.raises(ConfigError) as caught:
        build_config(app_port=8080, **kwargs)
    assert caught.value.flag == flag
