"""A Consul test agent: a stateful stand-in for ``consul agent -dev`` speaking Consul's HTTP API.

Rules of this package:

- It is a test fixture, not product code. It follows Consul's HTTP API documentation
  (https://developer.hashicorp.com/consul/api-docs) and, where the documentation is silent, what
  Consul's own source does (status codes, plain-text error bodies, the index rules of blocking
  queries) for the subset micro-sidecar and py-consul use.
- One agent is one node that is also the only server of datacenter ``dc1``, like ``-dev`` mode:
  the agent's local services and checks *are* that node's catalog entries (anti-entropy is
  instantaneous).
- All state lives on the agent's event loop. Other threads go through :class:`BackgroundAgent`.
- It never dials anything but loopback: HTTP and TCP checks against other hosts fail.
- Deliberate deviations from Consul, each because a test fixture needs it:
  * ``DeregisterCriticalServiceAfter`` has no one-minute floor and the reaper runs every 100 ms
    (Consul: >= 1 m, reaped every 30 s), so tests can watch it happen.
  * Interval checks (HTTP, TCP, script) run once right away, then on their interval
    (Consul staggers the first run randomly within the interval).
  * Check output is synced to the catalog at once (Consul defers output-only changes by
    ``check_update_interval``, 5 m by default).
  * Sessions, transactions, prepared queries, config entries, snapshots and ACL administration
    endpoints are not implemented (404). Limited ACL tokens are made with :meth:`add_token`.
  * A ``wipe`` makes a new CA and trust domain (a restarted dev agent is a new cluster) and
    ``leaf_ttl`` re-issues cached leaves at once; the Connect CA configuration endpoints, CA
    sign and intentions by ID are not implemented.
- Its modules use relative imports only: tests/pyconsul/pyconsul_agent_plugin.py loads the
  package by path, under another name, for py-consul's suite (where ``tests`` is py-consul's
  package).

Modules, one per API area of Consul's documentation, over a shared core:

- ``core.py``: :class:`~.core.AgentCore`, the shared core: the state store, the Raft-like index,
  blocking queries, ACL token checking, request plumbing and routing, the API socket, lifecycle.
- ``protocol.py``: Consul's conventions: version, datacenter, check statuses, plain-text errors
  (:class:`ConsulError`), Go durations, JSON request bodies, responses.
- ``model.py``: the records: nodes, services, checks and their definitions, KV entries.
- ``filter.py``: the ``?filter=`` expression language (:class:`Filter`).
- ``agent.py``: ``/v1/agent``: local services and checks, maintenance, local health, TTL
  updates, self, members, reload, leave, force-leave, metrics, monitor, host, agent ACL tokens.
- ``checks.py``: running checks: TTL timers, HTTP, TCP and script probes.
- ``catalog.py``: ``/v1/catalog``.
- ``health.py``: ``/v1/health``.
- ``kv.py``: ``/v1/kv``.
- ``status.py``: ``/v1/status``.
- ``acl.py``: making ACL tokens from a policy (:func:`parse_policy`); ``/v1/acl/token/self``.
- ``connect.py``: the Connect CA with real certificates (``/v1/agent/connect/ca/roots``,
  ``/v1/connect/ca/roots``, ``/v1/agent/connect/ca/leaf/<service>``), ``/v1/agent/connect/authorize``
  and intentions by name (``/v1/connect/intentions``, ``/exact``, ``/match``, ``/check``).
- ``ui.py``: ``/`` and ``/ui/``.
- ``faults.py``: the fault switches (below).
- ``control.py``: the control API on its own port.
- ``server.py``: :class:`ConsulTestAgent`, the core plus every area's mixin. A new API area is a
  new module with a mixin whose ``routes()`` extends the route table, plus one base class there.
- ``background.py``: :class:`BackgroundAgent`, the agent on a thread of its own.
- ``__main__.py``: the command line.

Faults (see :meth:`ConsulTestAgent.set_fault`): ``refuse`` closes the listening socket and drops
open connections (clients get "connection refused"), ``error500`` answers every API call with a
plain-text 500, ``hang`` accepts requests and never answers them while the fault lasts, ``wipe``
forgets all state like a restarted dev agent (the index keeps rising), ``reset_index`` moves the
Raft index back to a low value (like a snapshot restore: blocked queries return at once with the
lower index), ``rotate_root`` makes a new active CA root (the old one stays in ``Roots`` for twice
the leaf TTL, cached leaves are issued again under the new root and blocked leaf queries return),
``leaf_ttl=<seconds>`` sets the CA's leaf TTL (cached leaves that would outlive it are issued again
at once), ``none`` (or ``clear``) ends ``refuse``/``error500``/``hang``.

Run it alone with ``python -m tests.consul_agent --port 8500 [--acl-token T] [--control-port N]``;
the control port (never affected by faults) takes ``PUT /fault/<mode>``, ``PUT /tokens`` and
``GET /state``.
"""

from .acl import parse_policy
from .background import BackgroundAgent
from .faults import FAULTS, ONE_SHOT_FAULTS
from .filter import Filter, FilterError
from .protocol import DATACENTER, VERSION, ConsulError, format_duration, parse_duration
from .server import ConsulTestAgent

__all__ = [
    "DATACENTER",
    "FAULTS",
    "ONE_SHOT_FAULTS",
    "VERSION",
    "BackgroundAgent",
    "ConsulError",
    "ConsulTestAgent",
    "Filter",
    "FilterError",
    "format_duration",
    "parse_duration",
    "parse_policy",
]
