"""``python -m tests.consul_agent``: run the Consul test agent on its own until SIGTERM, SIGINT
or ``PUT /v1/agent/leave``. It prints ``consul test agent listening on HOST:PORT`` once it
listens (and ``consul test agent control on HOST:PORT`` with ``--control-port``)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from . import __doc__ as package_doc
from .server import ConsulTestAgent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.consul_agent", description=(package_doc or "").split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument(
        "--acl-token", default=None, help="turn ACLs on (default deny); this is the management token"
    )
    parser.add_argument(
        "--control-port", type=int, default=None, help="serve the fault/token control API here"
    )
    parser.add_argument("--node-name", default="consul-test-agent")
    parser.add_argument("--enable-script-checks", action="store_true")
    parser.add_argument(
        "--self-alias", action="append", default=[], help="HOST:PORT that checks should treat as this agent"
    )
    parser.add_argument(
        "--default-intention-policy",
        choices=("", "allow", "deny"),
        default="",
        help="the agent's default_intention_policy (empty: the ACL default decides)",
    )
    parser.add_argument(
        "--leaf-cert-ttl", type=float, default=72 * 3600.0, help="the CA's leaf TTL in seconds"
    )
    args = parser.parse_args(argv)

    async def run() -> None:
        agent = ConsulTestAgent(
            host=args.host,
            port=args.port,
            acl_token=args.acl_token,
            node_name=args.node_name,
            enable_script_checks=args.enable_script_checks,
            self_aliases=args.self_alias,
            default_intention_policy=args.default_intention_policy,
            leaf_cert_ttl=args.leaf_cert_ttl,
        )
        await agent.start()
        print(f"consul test agent listening on {args.host}:{agent.port}", flush=True)
        if args.control_port is not None:
            control = await agent.start_control(args.control_port)
            print(f"consul test agent control on {args.host}:{control}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        left = asyncio.ensure_future(agent.left.wait())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([left, stopped], return_when=asyncio.FIRST_COMPLETED)
        left.cancel()
        stopped.cancel()
        await agent.stop()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
