"""The Consul registry backend: settings from flags and env, and real HTTP against the test agent."""

from __future__ import annotations

import pytest

from sidecar.registry.consul import ConsulSettings

SENTINEL = "s3cr3t-sentinel-5f0c1d2e"

# -- settings ------------------------------------------------------------------------------


def test_defaults_without_flags_or_env():
    s = ConsulSettings.from_sources({}, {})
    assert s.url == "http://127.0.0.1:8500"
    assert s.token is None and s.verify and not s.tls and s.datacenter is None


def test_env_follows_consul_conventions(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(f"  {SENTINEL}\n")
    s = ConsulSettings.from_sources(
        {},
        {
            "CONSUL_HTTP_ADDR": "consul.local:8501",
            "CONSUL_HTTP_SSL": "true",
            "CONSUL_HTTP_SSL_VERIFY": "false",
            "CONSUL_HTTP_TOKEN": "ignored-because-the-file-wins",
            "CONSUL_HTTP_TOKEN_FILE": str(token_file),
        },
    )
    assert s.url == "https://consul.local:8501"
    assert s.token == SENTINEL
    assert s.verify is False


def test_flags_win_over_env():
    s = ConsulSettings.from_sources(
        {"consul_addr": "http://10.0.0.1:9500", "consul_token": "flag-token", "datacenter": "dc2"},
        {"CONSUL_HTTP_ADDR": "127.0.0.1:1", "CONSUL_HTTP_TOKEN": "env-token", "CONSUL_HTTP_SSL": "true"},
    )
    assert s.url == "http://10.0.0.1:9500"  # an explicit scheme beats CONSUL_HTTP_SSL
    assert s.token == "flag-token"
    assert s.datacenter == "dc2"


def test_addr_forms():
    assert ConsulSettings("https://consul.local").url == "https://consul.local:443"
    assert ConsulSettings("[::1]:8500").hostport == "[::1]:8500"
    assert ConsulSettings.from_sources({"consul_addr": "127.0.0.1:8600"}, {"CONSUL_HTTP_SSL": "1"}).tls


@pytest.mark.parametrize(
    ("flags", "env", "names"),
    [
        ({"consul_addr": "127.0.0.1:99999"}, {}, "--consul-addr"),
        ({"consul_addr": "127.0.0.1:port"}, {}, "--consul-addr"),
        ({}, {"CONSUL_HTTP_ADDR": "ftp://x:1"}, "CONSUL_HTTP_ADDR"),
        ({"consul_ssl_verify": "maybe"}, {}, "--consul-ssl-verify"),
        ({}, {"CONSUL_HTTP_SSL": "yes please"}, "CONSUL_HTTP_SSL"),
        ({"consul_token_file": "/nonexistent/token"}, {}, "--consul-token-file"),
        ({}, {"CONSUL_HTTP_TOKEN_FILE": "/nonexistent/token"}, "CONSUL_HTTP_TOKEN_FILE"),
        ({"consul_cacert": "/nonexistent/ca.pem"}, {}, "--consul-cacert"),
        ({"consul_token": f"{SENTINEL} x"}, {}, "--consul-token"),
        ({"consul_token": SENTINEL, "consul_token_file": "/x"}, {}, "--consul-token"),
    ],
)
def test_bad_input_names_the_source_and_never_the_token(flags, env, names):
    with pytest.raises(ValueError) as info:
        ConsulSettings.from_sources(flags, env)
    assert str(info.value).startswith(names + ":"), str(info.value)
    assert SENTINEL not in str(info.value)


def test_empty_token_file_is_an_error(tmp_path):
    (tmp_path / "t").write_text("\n")
    with pytest.raises(ValueError, match=r"^--consul-token-file: .* is empty"):
        ConsulSettings.from_sources({"consul_token_file": str(tmp_path / "t")}, {})


def test_repr_hides_the_token():
    s = ConsulSettings(token=SENTINEL)
    assert SENTINEL not in repr(s) and SENTINEL not in str(s)
    assert "token=<set>" in repr(s)
