"""The KV store API, ``/v1/kv``: read (one key, ``?recurse``, ``?keys`` with ``?separator``,
``?raw``) as blocking queries, write (``?flags``, ``?cas``) and delete (``?recurse``, ``?cas``).
Sessions are not implemented, so ``?acquire`` and ``?release`` fail as on an unknown session."""

from __future__ import annotations

from aiohttp import web

from .core import AgentCore, Result, Route
from .model import KVEntry
from .protocol import ConsulError, _json

KV_MAX_VALUE = 512 * 1024


class KVAPI(AgentCore):
    """The ``/v1/kv`` endpoints."""

    def _kv_table_index(self) -> int:
        return max(self._tables["kvs"], self._tables["tombstones"])

    def _kv_prefix_index(self, prefix: str, entries: list[KVEntry]) -> int:
        index = max((e.modify_index for e in entries), default=0)
        index = max(index, max((i for k, i in self._tombstones.items() if k.startswith(prefix)), default=0))
        return index or self._kv_table_index()

    async def h_kv(self, request: web.BaseRequest, key: str) -> web.StreamResponse:
        self._check_dc(request.query.get("dc"))
        if request.method == "GET":
            return await self._kv_get(request, key)
        if request.method == "PUT":
            return await self._kv_put(request, key)
        return await self._kv_delete(request, key)

    async def _kv_get(self, request: web.BaseRequest, key: str) -> web.StreamResponse:
        authz, secret = self._authz(request)
        query = request.query
        if "keys" in query:
            separator = query.get("separator", "")

            def compute_keys() -> Result:
                entries = [e for k, e in sorted(self._kv.items()) if k.startswith(key)]
                readable = [e for e in entries if authz.allowed("key", "read", e.key)]
                keys: list[str] = []
                for entry in readable:
                    name = entry.key
                    after = name[len(key) :]
                    if separator and separator in after:
                        name = key + after[: after.index(separator) + len(separator)]
                    if not keys or keys[-1] != name:
                        keys.append(name)
                index = self._kv_prefix_index(key, entries)
                filtered = len(readable) != len(entries)
                if not keys and key:  # Consul answers the root listing with [] rather than 404
                    return Result(index, None, status=404, empty=True, filtered=filtered)
                return Result(index, keys, empty=not keys, filtered=filtered)

            return await self._query(request, compute_keys, secret)
        if "recurse" in query:

            def compute_tree() -> Result:
                entries = [e for k, e in sorted(self._kv.items()) if k.startswith(key)]
                readable = [e for e in entries if authz.allowed("key", "read", e.key)]
                index = self._kv_prefix_index(key, entries)
                if not readable:
                    return Result(index, None, status=404, empty=True, filtered=bool(entries))
                return Result(index, [e.to_json() for e in readable], filtered=len(readable) != len(entries))

            return await self._query(request, compute_tree, secret)
        if not key:
            raise ConsulError(400, "Missing key name")
        authz.require("key", "read", key)
        raw = "raw" in query

        def compute_one() -> Result:
            entry = self._kv.get(key)
            if entry is None:
                return Result(self._kv_table_index(), None, status=404, empty=True)
            if raw:
                return Result(
                    entry.modify_index,
                    raw=entry.value,
                    headers={
                        "Content-Type": "text/plain",
                        "X-Content-Type-Options": "nosniff",
                        "Content-Security-Policy": "sandbox",
                    },
                )
            return Result(entry.modify_index, [entry.to_json()])

        return await self._query(request, compute_one, secret)

    async def _kv_put(self, request: web.BaseRequest, key: str) -> web.StreamResponse:
        authz, _secret = self._authz(request)
        if not key:
            raise ConsulError(400, "Missing key name")
        query = request.query
        _conflicting_flags(request, "cas", "acquire", "release")
        if "acquire" in query or "release" in query:
            session = query.get("acquire") or query.get("release") or ""
            raise ConsulError(500, f'invalid session "{session}"')
        flags = _parse_uint(query["flags"]) if "flags" in query else 0
        cas = _parse_uint(query["cas"]) if "cas" in query else None
        authz.require("key", "write", key)
        value = await request.read()
        if len(value) > KV_MAX_VALUE:
            raise ConsulError(
                413, f"Request body({len(value)} bytes) too large, max size: {KV_MAX_VALUE} bytes."
            )
        existing = self._kv.get(key)
        if cas is not None:
            if (cas == 0 and existing is not None) or (
                cas != 0 and (existing is None or existing.modify_index != cas)
            ):
                return _json(False)
        index = self._next_index()
        entry = KVEntry(key, value, flags, existing.create_index if existing else index, index)
        self._kv[key] = entry
        self._tombstones.pop(key, None)
        self._tables["kvs"] = index
        self._notify()
        return _json(True)

    async def _kv_delete(self, request: web.BaseRequest, key: str) -> web.StreamResponse:
        authz, _secret = self._authz(request)
        query = request.query
        _conflicting_flags(request, "recurse", "cas")
        recurse = "recurse" in query
        if not key and not recurse:
            raise ConsulError(400, "Missing key name")
        if recurse:
            targets = [k for k in self._kv if k.startswith(key)]
            authz.require("key", "write", key)
        else:
            authz.require("key", "write", key)
            targets = [key] if key in self._kv else []
            if "cas" in query:
                cas = _parse_uint(query["cas"])
                entry = self._kv.get(key)
                if entry is None or entry.modify_index != cas:
                    return _json(False)
        if targets:
            index = self._next_index()
            for target in targets:
                del self._kv[target]
                self._tombstones[target] = index
            self._tables["tombstones"] = index
            self._notify()
        return _json(True)

    def routes(self) -> list[Route]:
        return [*super().routes(), Route("/v1/kv/", ("GET", "PUT", "DELETE"), self.h_kv, prefix=True)]


def _conflicting_flags(request: web.BaseRequest, *flags: str) -> None:
    if sum(1 for flag in flags if flag in request.query) > 1:
        raise ConsulError(400, f"Conflicting flags: {request.query_string}\n")


def _parse_uint(text: str) -> int:
    if not text.isdigit():
        raise ConsulError(500, f'strconv.ParseUint: parsing "{text}": invalid syntax')
    return int(text)
