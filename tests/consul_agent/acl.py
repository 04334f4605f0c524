"""ACL tokens: making them from a policy (:meth:`ACLAPI.add_token`) and the ACL API's
``/v1/acl/token/self``. The rest of the ACL API (policies, roles, token CRUD) is not implemented;
checking a request's token against its rules is shared by every area and lives in core.py.

Intention permissions are part of service rules in Consul (``service "web" { policy = "write"
intentions = "read" }``), and a service rule of ``read`` or ``write`` without ``intentions``
grants ``intentions = "read"`` on the same names: the rules are kept under the resource
``intention`` (Consul's name for it in a 403), one per service rule."""

from __future__ import annotations

import re
import uuid
from typing import Any

from aiohttp import web

from .core import LEVELS, AgentCore, Route, Token
from .protocol import ConsulError, _json

NAMED_RESOURCES = ("service", "node", "key", "agent", "session", "event", "query", "intentions")
UNNAMED_RESOURCES = ("operator", "acl", "keyring", "mesh", "peering")


def parse_policy(policy: Any) -> tuple[bool, dict[str, list[tuple[str, bool, str]]]]:
    """Rules for :meth:`ConsulTestAgent.add_token`.

    ``"management"`` allows everything. A dict takes either the short form
    ``{"service_write": ["web"], "service_read": ["*"], "node_read": True, "key_read": ["app/*"]}``
    (a name ending in ``*`` is a prefix, ``"*"`` or ``True`` means all; ``intentions_write: ["db"]``
    sets the intentions level of service rules) or Consul's JSON rule form
    ``{"service_prefix": {"": {"policy": "read", "intentions": "write"}}, "key": {"cfg": {"policy":
    "write"}}, "operator": "read"}``.
    """
    if policy == "management":
        return True, {}
    if policy is None:
        return False, {}
    if not isinstance(policy, dict):
        raise ValueError("policy must be 'management' or a dict")
    rules: dict[str, list[tuple[str, bool, str]]] = {}

    explicit_intentions: set[tuple[str, bool]] = set()

    def add(resource: str, name: str, prefix: bool, level: str) -> None:
        if level not in LEVELS:
            raise ValueError(f"unknown access level {level!r}")
        if resource == "intentions":
            resource = "intention"
            explicit_intentions.add((name, prefix))
        rules.setdefault(resource, []).append((name, prefix, level))

    for key, value in policy.items():
        short = re.fullmatch(r"(\w+?)_(read|write|deny|list)", key)
        if short and short.group(1) not in NAMED_RESOURCES + UNNAMED_RESOURCES:
            short = None
        if short:
            resource, level = short.group(1), short.group(2)
            if value is False:
                names = []
            elif value is True or resource in UNNAMED_RESOURCES:
                names = ["*"]
            else:
                names = value
            if isinstance(names, str):
                names = [names]
            for name in names:
                if name == "*":
                    add(resource, "", True, level)
                elif name.endswith("*"):
                    add(resource, name[:-1], True, level)
                else:
                    add(resource, name, False, level)
            continue
        if key in UNNAMED_RESOURCES:
            add(key, "", True, value if isinstance(value, str) else value.get("policy", "deny"))
            continue
        prefix = key.endswith("_prefix")
        resource = key.removesuffix("_prefix")
        if not isinstance(value, dict):
            raise ValueError(f"rule {key!r} must map names to {{'policy': level}}")
        for name, spec in value.items():
            add(resource, name, prefix, spec if isinstance(spec, str) else spec.get("policy", "deny"))
            if resource == "service" and isinstance(spec, dict) and "intentions" in spec:
                add("intentions", name, prefix, spec["intentions"])
    # A service rule without its own intentions level grants intentions:read with read or write.
    for name, prefix, level in rules.get("service", []):
        if (name, prefix) not in explicit_intentions:
            implied = "read" if LEVELS[level] >= LEVELS["read"] else "deny"
            rules.setdefault("intention", []).append((name, prefix, implied))
    return False, rules


class ACLAPI(AgentCore):
    """Making and dropping ACL tokens, and ``/v1/acl/token/self``."""

    def add_token(self, secret: str | None = None, policy: Any = None, *, description: str = "") -> str:
        """Create an ACL token; returns its AccessorID. See :func:`parse_policy` for ``policy``."""
        management, rules = parse_policy(policy)
        secret = secret or str(uuid.uuid4())
        token = Token(str(uuid.uuid4()), secret, description, management, rules)
        self.tokens[secret] = token
        return token.accessor_id

    def remove_token(self, secret: str) -> None:
        self.tokens.pop(secret, None)

    async def h_acl_token_self(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        if not self.acl_enabled:
            raise ConsulError(401, "ACL support disabled")
        authz, _secret = self._authz(request)
        token = authz.token
        if token is None:
            raise ConsulError(403, "ACL not found")
        policies = [{"ID": "00000000-0000-0000-0000-000000000001", "Name": "global-management"}]
        return _json(
            {
                "AccessorID": token.accessor_id,
                "SecretID": token.secret_id,
                "Description": token.description,
                "Policies": policies if token.management else [],
                "Local": False,
                "CreateIndex": 1,
                "ModifyIndex": 1,
            }
        )

    def routes(self) -> list[Route]:
        return [*super().routes(), Route("/v1/acl/token/self", ("GET",), self.h_acl_token_self)]
