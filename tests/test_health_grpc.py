"""The health checker with --health-grpc against a real grpc.aio server."""

from __future__ import annotations

import logging
import socket

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from sidecar.config import build_config
from sidecar.health import HealthChecker


def grpc_checker(port: int, service: str = "") -> HealthChecker:
    config = build_config(
        app_port=port,
        app_protocol="h2c",
        health_grpc=True,
        health_grpc_service=service,
        health_timeout=1.0,
        unhealthy_threshold=2,
    )
    return HealthChecker(config.app)


async def test_serving_then_not_serving_flips_unhealthy():
    server = grpc.aio.server()
    servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        await servicer.set("orders.Orders", health_pb2.HealthCheckResponse.SERVING)
        checker = grpc_checker(port, "orders.Orders")
        changes: list[bool] = []
        checker.subscribe(lambda s: changes.append(s.healthy))
        state = await checker.check_once()
        assert state.healthy and state.output == "grpc health: SERVING"
        await servicer.set("orders.Orders", health_pb2.HealthCheckResponse.NOT_SERVING)
        state = await checker.check_once()
        assert state.healthy  # one failure is not enough
        state = await checker.check_once()
        assert not state.healthy and state.answering
        assert state.output == "grpc health: NOT_SERVING"
        assert changes == [True, False]
    finally:
        await server.stop(None)
    state = await checker.check_once()  # the server is gone: refused, not answering
    assert not state.answering and "failed" in state.output


async def test_unimplemented_is_a_configuration_error_logged_once(caplog):
    server = grpc.aio.server()  # no health service
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        checker = grpc_checker(port)
        with caplog.at_level(logging.WARNING, logger="sidecar.health"):
            for _ in range(3):
                state = await checker.check_once()
    finally:
        await server.stop(None)
    assert not state.healthy and state.answering
    assert state.output.startswith("grpc health: UNIMPLEMENTED")
    config_errors = [r for r in caplog.records if "configuration error" in r.getMessage()]
    assert len(config_errors) == 1 and config_errors[0].levelno == logging.WARNING
    assert "--health-grpc" in config_errors[0].getMessage()


async def test_closed_port_is_a_failed_probe_not_answering():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    state = await grpc_checker(port).check_once()
    assert not state.healthy and not state.answering and "failed" in state.output
