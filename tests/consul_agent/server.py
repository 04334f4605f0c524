"""The Consul test agent: the shared core plus one mixin per API area.

Each area module holds a mixin of :class:`~.core.AgentCore` with its handlers and its part of the
route table (``routes()``); :class:`ConsulTestAgent` is their sum. A new area is one new module
and one more base class here.
"""

from __future__ import annotations

from .acl import ACLAPI
from .agent import AgentAPI
from .catalog import CatalogAPI
from .connect import ConnectAPI
from .control import ControlAPI
from .faults import FaultSwitches
from .health import HealthAPI
from .kv import KVAPI
from .status import StatusAPI
from .ui import UIPages


class ConsulTestAgent(
    AgentAPI,
    CatalogAPI,
    HealthAPI,
    KVAPI,
    StatusAPI,
    ControlAPI,
    FaultSwitches,
    ConnectAPI,
    ACLAPI,
    UIPages,
):
    """The agent. Create and use it on one event loop; ``await start()`` then ``await stop()``."""
