"""A pytest plugin that runs py-consul's own test suite against the Consul test agent.

py-consul's suite starts real Consul containers through its top-level conftest.py; this plugin
replaces that conftest (scripts/pyconsul-suite keeps it from loading) with the same fixture
names, each backed by a fresh :class:`BackgroundAgent` per test, as the suite expects. It also
deselects, with a reason each, the tests that need Consul features the agent does not have.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

_AGENT_PACKAGE = Path(__file__).resolve().parent.parent / "consul_agent"


def _load_agent_module() -> Any:
    # py-consul's tests are a package named "tests", like ours: load the agent by path instead.
    name = "micro_sidecar_consul_agent"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, _AGENT_PACKAGE / "__init__.py", submodule_search_locations=[str(_AGENT_PACKAGE)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


consul_agent_module = _load_agent_module()

# What the Consul container of py-consul's CI looks like from the tests: a dev agent of this
# version, script checks on, and reachable as localhost:8500 from inside its own container (the
# suite's HTTP checks probe that address).
AGENT_OPTIONS = {
    "enable_script_checks": True,
    "self_aliases": ("localhost:8500", "127.0.0.1:8500"),
}

DESELECTED = {
    "tests/test_aio.py::TestAsyncioConsul::test_transaction": "needs transactions (/v1/txn)",
    "tests/test_aio.py::TestAsyncioConsul::test_session": "needs sessions (/v1/session)",
    "tests/api/test_kv.py::TestConsul::test_kv_acquire_release": "needs sessions (KV lock acquire/release)",
    "tests/api/test_catalog.py::TestCatalog::test_catalog_gateway_services": (
        "needs Connect ingress gateways and config entries (/v1/config)"
    ),
}


class ConsulInstance(NamedTuple):
    container: Any
    port: int
    version: str


def _start(acl_token: str | None = None) -> Any:
    return consul_agent_module.BackgroundAgent(
        acl_token=acl_token, node_name=uuid.uuid4().hex[:12], **AGENT_OPTIONS
    ).start()


@pytest.fixture(scope="session", autouse=True)
def _unset_consul_token() -> None:
    os.environ.pop("CONSUL_HTTP_TOKEN", None)


@pytest.fixture
def consul_instance() -> Iterator[ConsulInstance]:
    agent = _start()
    try:
        yield ConsulInstance(agent, agent.port, consul_agent_module.VERSION)
    finally:
        agent.stop()


@pytest.fixture
def acl_consul_instance() -> Iterator[tuple[ConsulInstance, str]]:
    token = uuid.uuid4().hex
    agent = _start(acl_token=token)
    try:
        yield ConsulInstance(agent, agent.port, consul_agent_module.VERSION), token
    finally:
        agent.stop()


@pytest.fixture
def consul_port(consul_instance: ConsulInstance) -> tuple[int, str]:
    return consul_instance.port, consul_instance.version


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep, dropped = [], []
    for item in items:
        (dropped if item.nodeid in DESELECTED else keep).append(item)
    missing = set(DESELECTED) - {item.nodeid for item in dropped}
    if missing:
        raise pytest.UsageError(f"deselection list names tests that do not exist: {sorted(missing)}")
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    stats = terminalreporter.stats
    counts = {key: len(stats.get(key, [])) for key in ("passed", "failed", "error", "skipped", "deselected")}
    terminalreporter.section("py-consul suite against the Consul test agent")
    for nodeid, reason in DESELECTED.items():
        terminalreporter.write_line(f"deselected {nodeid}: {reason}")
    terminalreporter.write_line(
        f"py-consul: {counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
        f"{counts['skipped']} skipped, {counts['deselected']} deselected"
    )
