"""The health state machine (pure) and the probe against real listeners."""

from __future__ import annotations

import asyncio

from aiohttp import web

from sidecar.config import build_config
from sidecar.health import HealthChecker, HealthState, transition


def run(results, rise=2, fall=3):
    state = HealthState()
    seen = []
    for i, passed in enumerate(results):
        state = transition(state, passed, "x", rise, fall, float(i))
        seen.append(state.healthy)
    return seen


def test_starts_unhealthy_and_needs_rise_passes():
    assert HealthState().healthy is False
    assert run([True, True, True]) == [False, True, True]


def test_needs_fall_failures_in_a_row():
    assert run([True, True, False, False, True, False, False, False]) == [
        False,
        True,
        True,
        True,
        True,
        True,
        True,
        False,
    ]


def test_changed_at_only_moves_on_change():
    state = HealthState()
    state = transition(state, True, "ok", 1, 1, 5.0)
    assert state.healthy and state.changed_at == 5.0
    state = transition(state, True, "ok", 1, 1, 6.0)
    assert state.changed_at == 5.0


async def test_http_probe_and_listener_called_once_per_change():
    status = {"code": 200}

    async def health(request):
        return web.Response(status=status["code"])

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        config = build_config(app_port=site.port, health_timeout=0.5, unhealthy_threshold=2)
        checker = HealthChecker(config.app)
        changes = []
        checker.subscribe(lambda s: changes.append(s.healthy))
        task = asyncio.create_task(checker.run())
        await asyncio.sleep(0.05)
        for _ in range(3):
            await checker.check_once()
        assert checker.healthy and changes == [True]
        status["code"] = 500
        await checker.check_once()
        assert checker.healthy  # one failure is not enough
        await checker.check_once()
        assert not checker.healthy
        assert "500" in checker.state.output
        assert changes == [True, False]
        task.cancel()
    finally:
        await runner.cleanup()


async def test_tcp_probe_and_refused_connection_is_a_failure():
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = build_config(app_port=port, health_path="", health_timeout=0.5, unhealthy_threshold=1)
    checker = HealthChecker(config.app)
    state = await checker.check_once()
    assert state.healthy and "TCP connect" in state.output
    server.close()
    await server.wait_closed()
    state = await checker.check_once()
    assert not state.healthy
    assert "failed" in state.output
