"""Pytest fixtures around the Consul test agent (tests/consul_agent/).

Each fixture runs a fresh agent on an ephemeral loopback port, on its own thread and event loop,
so plain tests (that block on subprocesses or ``time.sleep``) and async tests can both use it.
Every method of the returned :class:`~tests.consul_agent.BackgroundAgent` is thread-safe:

    agent.addr / .url / .port / .token / .node_name / .index
    agent.set_fault("refuse" | "error500" | "hang" | "wipe" | "reset_index" | "none")
    agent.wipe(); agent.reset_index()
    agent.services(); agent.checks(); agent.health(name, passing=False); agent.kv()
    agent.add_token(secret, policy) -> accessor id; agent.remove_token(secret)
    agent.wait_for(lambda a: ..., timeout=5.0)

The agent is stopped in the fixture's finalizer, also when the test fails.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.consul_agent import BackgroundAgent


@pytest.fixture
def consul_agent_factory() -> Iterator[Callable[..., BackgroundAgent]]:
    """Start agents with options (``acl_token=``, ``enable_script_checks=``, ``self_aliases=``,
    ``node_name=``); all of them are stopped at the end of the test."""
    started: list[BackgroundAgent] = []

    def make(**options: Any) -> BackgroundAgent:
        agent = BackgroundAgent(**options).start()
        started.append(agent)
        return agent

    try:
        yield make
    finally:
        for agent in reversed(started):
            agent.stop()


@pytest.fixture
def consul_agent(consul_agent_factory: Callable[..., BackgroundAgent]) -> BackgroundAgent:
    """A Consul test agent with ACLs off."""
    return consul_agent_factory()


@pytest.fixture
def consul_agent_acl(consul_agent_factory: Callable[..., BackgroundAgent]) -> BackgroundAgent:
    """A Consul test agent with ACLs on (default deny); ``.token`` is the management token."""
    return consul_agent_factory(acl_token=str(uuid.uuid4()))
