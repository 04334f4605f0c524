import io
import json

import pytest

from sidecar.accesslog import AccessLog, loggable_path

T = 1_700_000_000.1234  # 2023-11-14T22:13:20.123Z


def one(fmt="json", **overrides) -> str:
    stream = io.StringIO()
    log = AccessLog(fmt, stream, clock=lambda: T)
    fields = dict(
        direction="outbound",
        method="GET",
        target="/v1/items?token=s3cret&user=bob",
        status=200,
        duration=0.0123456,
        service="orders",
        instance="orders-127.0.0.1-9001",
        attempts=2,
        request_id="req-1",
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
    )
    fields.update(overrides)
    log.log(**fields)
    return stream.getvalue()


def test_json_line_has_every_field_and_no_query():
    text = one()
    assert text.endswith("\n") and text.count("\n") == 1
    record = json.loads(text)
    assert record == {
        "time": "2023-11-14T22:13:20.123Z",
        "direction": "outbound",
        "method": "GET",
        "path": "/v1/items",
        "status": 200,
        "duration_ms": 12.346,
        "service": "orders",
        "instance": "orders-127.0.0.1-9001",
        "attempts": 2,
        "request_id": "req-1",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "caller": None,
        "protocol": "HTTP/1.1",
        "grpc_status": None,
    }
    assert "s3cret" not in text and "token" not in text


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("/a/b?x=1", "/a/b"),
        ("/a#frag", "/a"),
        ("/a?x=1#f", "/a"),
        ("/", "/"),
        ("?x=1", "/"),
        ("http://orders/v1/items?key=1", "/v1/items"),
        ("http://user:pw@orders:80/x", "/x"),
        ("https://orders", "/"),
        ("/" + "a" * 5000, "/" + "a" * 2047),
    ],
)
def test_loggable_path(target, path):
    assert loggable_path(target) == path


def test_hostile_values_cannot_forge_lines():
    text = one(target='/a"\n{"status":999}', request_id="x\ny" * 200)
    lines = text.splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["status"] == 200
    assert len(record["request_id"]) == 128
    text = one("text", target='/a b"\n\x1b[31m', request_id="r\n1")
    assert text.count("\n") == 1
    assert "\x1b" not in text and " b" not in text.split(" 200 ")[0]


def test_text_format():
    text = one("text")
    assert text == (
        "2023-11-14T22:13:20.123Z outbound GET /v1/items 200 12.346ms service=orders "
        "instance=orders-127.0.0.1-9001 attempts=2 request_id=req-1 "
        "trace_id=4bf92f3577b34da6a3ce929d0e0e4736 caller=- protocol=HTTP/1.1 grpc_status=-\n"
    )


def test_missing_fields_in_both_formats():
    fields = dict(service=None, instance=None, request_id=None, trace_id=None, attempts=1)
    record = json.loads(one(**fields))
    assert record["service"] is None and record["instance"] is None and record["attempts"] == 1
    assert "service=- instance=- attempts=1 request_id=- trace_id=-" in one("text", **fields)


def test_off_writes_nothing():
    assert one("off") == ""
    assert not AccessLog("off", io.StringIO()).enabled


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="unknown access log format 'xml'"):
        AccessLog("xml", io.StringIO())  # type: ignore[arg-type]


def test_write_errors_are_counted_not_raised():
    stream = io.StringIO()
    log = AccessLog("json", stream)
    stream.close()
    log.log(direction="inbound", method="GET", target="/", status=200, duration=0.001)
    assert log.dropped == 1 and log.lines == 0
    assert repr(log) == "<AccessLog json lines=0 dropped=1>"


def test_many_lines_each_valid_json():
    stream = io.StringIO()
    log = AccessLog("json", stream)
    for n in range(50):
        log.log(direction="inbound", method="POST", target=f"/n/{n}?q={n}", status=201, duration=n / 1000)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 50 == log.lines
    assert [json.loads(line)["path"] for line in lines] == [f"/n/{n}" for n in range(50)]
