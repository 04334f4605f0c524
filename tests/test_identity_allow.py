"""--allow-from as a pure decision on the caller's verified SPIFFE ID."""

from __future__ import annotations

import pytest

from sidecar.identity.allow import AllowList
from sidecar.identity.base import Decision, SpiffeId

MESH = "micro-sidecar.local"


def caller(service: str, trust_domain: str = MESH) -> SpiffeId:
    return SpiffeId(trust_domain, service)


def test_without_names_any_caller_of_the_mesh_may_call():
    allow = AllowList([], {MESH})
    decision = allow.decide(caller("web"))
    assert decision == Decision(True, "service 'web' is in this mesh and no --allow-from is set")


def test_with_names_only_those_may_call():
    allow = AllowList(["orders", "billing", "orders"], [MESH])
    assert allow.decide(caller("orders")).allowed
    assert allow.decide(caller("billing")) == Decision(True, "service 'billing' is in --allow-from")
    assert allow.decide(caller("web")) == Decision(
        False, "service 'web' is not in --allow-from (orders, billing)"
    )
    assert allow.describe() == {
        "kind": "allow-list",
        "allow_from": ["orders", "billing"],
        "trust_domains": [MESH],
    }
    assert repr(allow) == f"<AllowList orders, billing of {MESH}>"


def test_a_caller_of_another_trust_domain_is_refused_even_when_named():
    allow = AllowList(["orders"], {MESH})
    decision = allow.decide(caller("orders", "evil.example"))
    assert not decision.allowed
    assert decision.reason == "service 'orders' is of trust domain 'evil.example', which is not this mesh's"
    assert not AllowList([], {MESH}).decide(caller("web", "evil.example")).allowed


def test_trust_domains_are_asked_on_each_decision():
    # a live view: for --identity files the trust domain is known once the files are read
    domains: set[str] = set()
    allow = AllowList([], domains)
    assert allow.decide(caller("web")) == Decision(
        False, "service 'web' cannot be checked: no trust domain yet"
    )
    domains.add(MESH)
    assert allow.decide(caller("web")).allowed


def test_a_single_string_is_not_a_list_of_names():
    with pytest.raises(TypeError):
        AllowList("orders", {MESH})
    with pytest.raises(TypeError):
        AllowList([], MESH)
