"""Who may call, for the local and files identities: `--allow-from` names, or anyone in
the mesh. A pure decision on the caller's verified SPIFFE ID, no I/O."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from .base import Authorizer, Decision, SpiffeId


class AllowList(Authorizer):
    """With no names, any caller whose trust domain is one of ours; with names, only
    callers of our trust domains whose service is one of them.

    `trust_domains` is asked on every decision, not copied: it may be a live view, such
    as the trust domain of the current identity (for files, known only once they are
    read). Empty, it denies everyone. Its entries are compared as given; SPIFFE IDs
    carry their trust domain in lower case.
    """

    kind = "allow-list"

    def __init__(self, names: Sequence[str], trust_domains: Collection[str]) -> None:
        if isinstance(names, str) or isinstance(trust_domains, str):
            raise TypeError("names and trust_domains are collections of names, not one string")
        self.names = tuple(dict.fromkeys(names))
        self.trust_domains = trust_domains
        self._names = frozenset(self.names)
        self._listed = ", ".join(self.names)

    def __repr__(self) -> str:
        names = self._listed or "any service"
        return f"<AllowList {names} of {', '.join(sorted(self.trust_domains))}>"

    def decide(self, caller: SpiffeId) -> Decision:
        if caller.trust_domain not in self.trust_domains:
            if not self.trust_domains:
                return Decision(False, f"service {caller.service!r} cannot be checked: no trust domain yet")
            return Decision(
                False,
                f"service {caller.service!r} is of trust domain {caller.trust_domain!r}, "
                "which is not this mesh's",
            )
        if not self._names:
            return Decision(True, f"service {caller.service!r} is in this mesh and no --allow-from is set")
        if caller.service in self._names:
            return Decision(True, f"service {caller.service!r} is in --allow-from")
        return Decision(False, f"service {caller.service!r} is not in --allow-from ({self._listed})")

    def describe(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "allow_from": list(self.names),
            "trust_domains": sorted(self.trust_domains),
        }
