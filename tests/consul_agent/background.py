"""The agent on a thread of its own (:class:`BackgroundAgent`), for sync and async tests alike."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .server import ConsulTestAgent


class BackgroundAgent:
    """A :class:`ConsulTestAgent` on a private event loop in a daemon thread.

    Every method is thread-safe and blocks until done, so plain tests, tests that block on
    ``time.sleep`` or subprocesses, and async tests on another loop can all use it.
    """

    call_timeout = 10.0

    def __init__(
        self, *, acl_token: str | None = None, host: str = "127.0.0.1", port: int = 0, **options: Any
    ):
        self._options = dict(options, acl_token=acl_token, host=host, port=port)
        self.token = acl_token
        self.host = host
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.agent: ConsulTestAgent | None = None

    def __repr__(self) -> str:
        return f"<BackgroundAgent {self.agent!r}>"

    def start(self) -> BackgroundAgent:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="consul-test-agent", daemon=True)
        self._thread.start()

        async def create() -> ConsulTestAgent:
            agent = ConsulTestAgent(**self._options)
            await agent.start()
            return agent

        try:
            self.agent = self._submit(create())
        except BaseException:
            self._shutdown_loop()
            raise
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        if self.agent is not None:
            with contextlib.suppress(Exception):
                self._submit(self.agent.stop())
        self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return

        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(drain(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        if not loop.is_running():
            loop.close()

    def __enter__(self) -> BackgroundAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _submit(self, coro: Awaitable[Any]) -> Any:
        if self._loop is None:
            raise RuntimeError("the Consul test agent is not running")
        if threading.current_thread() is self._thread:
            raise RuntimeError("call the ConsulTestAgent directly from its own loop")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self.call_timeout)  # type: ignore[arg-type]

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        async def call() -> Any:
            return fn(*args, **kwargs)

        return self._submit(call())

    @property
    def _agent(self) -> ConsulTestAgent:
        if self.agent is None:
            raise RuntimeError("the Consul test agent is not running")
        return self.agent

    @property
    def port(self) -> int:
        return self._agent.port

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.addr}"

    @property
    def node_name(self) -> str:
        return self._agent.node_name

    @property
    def index(self) -> int:
        return self._call(lambda: self._agent.index)

    @property
    def fault(self) -> str:
        return self._agent.fault

    def set_fault(self, mode: str) -> None:
        self._submit(self._agent.set_fault(mode))

    def clear_fault(self) -> None:
        self.set_fault("none")

    def wipe(self) -> None:
        self._call(self._agent.wipe)

    def reset_index(self) -> None:
        self._call(self._agent.reset_index)

    def services(self) -> dict[str, Any]:
        return self._call(self._agent.services_view)

    def checks(self) -> dict[str, Any]:
        return self._call(self._agent.checks_view)

    def health(self, name: str, passing: bool = False) -> list[dict[str, Any]]:
        return self._call(self._agent.health_view, name, passing)

    def kv(self) -> dict[str, bytes]:
        return self._call(self._agent.kv_view)

    def add_token(self, secret: str | None = None, policy: Any = None, *, description: str = "") -> str:
        return self._call(self._agent.add_token, secret, policy, description=description)

    def remove_token(self, secret: str) -> None:
        self._call(self._agent.remove_token, secret)

    def wait_for(self, predicate: Callable[[BackgroundAgent], Any], timeout: float = 5.0) -> Any:
        """Poll ``predicate(self)`` until it returns something truthy; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate(self)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout}s on {self!r}")
            time.sleep(0.02)
