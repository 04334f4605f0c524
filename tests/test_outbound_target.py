"""Which service an outbound request names (pure parsing, no sockets)."""

from __future__ import annotations

import pytest

from sidecar.errors import BadRequest, MisdirectedRequest
from sidecar.outbound import parse_target


@pytest.mark.parametrize(
    ("target", "host", "expected"),
    [
        ("/orders/v1/items", "127.0.0.1:15001", ("orders", "/v1/items")),
        ("/orders", "127.0.0.1:15001", ("orders", "/")),
        ("/orders?x=1", "localhost:15001", ("orders", "/?x=1")),
        ("/v1/items", "orders", ("orders", "/v1/items")),
        ("/v1/items", "Orders:80", ("orders", "/v1/items")),
        ("http://orders/v1/items?a=b", "orders", ("orders", "/v1/items?a=b")),
        ("http://orders", None, ("orders", "/")),
        ("http://orders:8080/x", "orders:8080", ("orders", "/x")),
    ],
)
def test_addressing_forms(target, host, expected):
    assert parse_target(target, host) == expected


@pytest.mark.parametrize(
    ("target", "host", "error"),
    [
        ("http://127.0.0.1:8500/v1/agent/self", "127.0.0.1:8500", MisdirectedRequest),
        ("http://169.254.169.254/latest/meta-data", None, MisdirectedRequest),
        ("http://localhost/x", "localhost", MisdirectedRequest),
        ("http://[::1]/x", "[::1]", MisdirectedRequest),
        ("http://orders/x", "payments", BadRequest),
        ("http://user@orders/x", "orders", BadRequest),
        ("/", "127.0.0.1", MisdirectedRequest),
        ("/x#frag", "orders", BadRequest),
        ("*", "orders", BadRequest),
    ],
)
def test_refusals(target, host, error):
    with pytest.raises(error):
        parse_target(target, host)
