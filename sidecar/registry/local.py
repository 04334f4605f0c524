"""The embedded registry: one SQLite file shared by every sidecar on a host.

Each row is one instance with a heartbeat. A row whose heartbeat is older than its TTL
counts as gone (a crashed sidecar stops heartbeating, so peers stop routing to it after
one TTL), also for panic routing; a row stale for longer than its deregister-after is
deleted by whoever looks. A row with a fresh heartbeat is passing (status "passing") or
critical (any other status); a query answers with both sets (see `QueryResult`).
WAL mode and a busy timeout make several processes writing at once safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from .base import (
    CheckSpec,
    Instance,
    QueryResult,
    RegistrationLost,
    Registry,
    RegistryUnavailable,
    Status,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    address TEXT NOT NULL,
    port INTEGER NOT NULL,
    tags TEXT NOT NULL,
    meta TEXT NOT NULL,
    status TEXT NOT NULL,
    note TEXT NOT NULL,
    heartbeat REAL NOT NULL,
    ttl REAL NOT NULL,
    deregister_after REAL NOT NULL,
    pid INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_name ON instances (name);
"""

POLL_INTERVAL = 0.25
CLEAN_INTERVAL = 1.0


class LocalRegistry(Registry):
    kind = "local"

    def __init__(self, path: Path, poll_interval: float = POLL_INTERVAL) -> None:
        self.path = Path(path)
        self._poll = poll_interval
        self._db: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()
        # name -> (last answer: passing, critical, known; its index): the index grows each
        # time the answer changes.
        self._answers: dict[str, tuple[tuple[Instance, ...], tuple[Instance, ...], bool, int]] = {}
        self._counter = 0
        self._inode = 0
        self._cleaned_at = 0.0

    def __repr__(self) -> str:
        return f"<LocalRegistry path={str(self.path)!r} watched={len(self._answers)}>"

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "path": str(self.path)}

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout = 5000")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.executescript(SCHEMA)
        try:
            os.chmod(self.path, 0o600)
        except OSError:
            pass
        return db

    def _same_file(self) -> bool:
        """Whether the open connection still writes to the file at `path` (someone may have
        deleted or replaced it: an open SQLite handle would keep writing to the old inode)."""
        try:
            return os.stat(self.path).st_ino == self._inode
        except OSError:
            return False

    def _call(self, fn: Any, *args: Any) -> Any:
        """In a worker thread: (re)connect when needed, then run `fn(db, *args)`."""
        if self._db is not None and not self._same_file():
            self._close_db()
        if self._db is None:
            self._db = self._connect()
            self._inode = os.stat(self.path).st_ino
        return fn(self._db, *args)

    def _close_db(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()

    def _call_or_reset(self, fn: Any, *args: Any) -> Any:
        try:
            return self._call(fn, *args)
        except (sqlite3.Error, OSError):
            self._close_db()  # start from a fresh connection next time
            raise

    async def _run(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return await self._in_thread(self._call_or_reset, fn, *args)
        except (sqlite3.Error, OSError) as exc:
            raise RegistryUnavailable(f"{what} in local registry {self.path}: {exc}") from exc

    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        """`fn(*args)` in a worker thread, one at a time. A caller that is cancelled stops
        waiting, but the lock is held until the thread is done with the connection, so
        that `close()` (or the next call) never touches it while a thread still does."""
        await self._lock.acquire()
        try:
            work = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        except BaseException:
            self._lock.release()
            raise
        work.add_done_callback(self._thread_done)
        return await asyncio.shield(work)

    def _thread_done(self, work: asyncio.Future[Any]) -> None:
        self._lock.release()
        if not work.cancelled():
            work.exception()  # seen here even when the caller was cancelled and left

    async def open(self) -> None:
        await self._run("opening", lambda db: None)

    async def close(self) -> None:
        await self._in_thread(self._close_db)

    async def register(self, instance: Instance, check: CheckSpec, status: Status, note: str) -> None:
        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT OR REPLACE INTO instances VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    instance.id,
                    instance.name,
                    instance.address,
                    instance.port,
                    json.dumps(list(instance.tags)),
                    json.dumps(dict(instance.meta)),
                    status,
                    note,
                    time.time(),
                    check.ttl,
                    check.deregister_after,
                    os.getpid(),
                ),
            )

        await self._run(f"registering {instance.id!r}", write)

    async def report(self, instance_id: str, status: Status, note: str) -> None:
        def write(db: sqlite3.Connection) -> int:
            cur = db.execute(
                "UPDATE instances SET status = ?, note = ?, heartbeat = ? WHERE id = ?",
                (status, note, time.time(), instance_id),
            )
            return cur.rowcount

        if await self._run(f"updating {instance_id!r}", write) == 0:
            raise RegistrationLost(f"local registry {self.path} no longer holds {instance_id!r}")

    async def deregister(self, instance_id: str) -> None:
        await self._run(
            f"deregistering {instance_id!r}",
            lambda db: db.execute("DELETE FROM instances WHERE id = ?", (instance_id,)),
        )

    def _read(
        self, db: sqlite3.Connection, name: str
    ) -> tuple[tuple[Instance, ...], tuple[Instance, ...], bool]:
        """(passing, critical, known) for `name`: live rows split by status; known when
        any row exists (a stale one too, until it is cleaned)."""
        now = time.time()
        if now - self._cleaned_at >= CLEAN_INTERVAL:  # a write: not on every poll
            self._cleaned_at = now
            db.execute("DELETE FROM instances WHERE ? - heartbeat > ttl + deregister_after", (now,))
        rows = db.execute(
            "SELECT id, name, address, port, tags, meta, status, heartbeat, ttl FROM instances "
            "WHERE name = ? ORDER BY id",
            (name,),
        ).fetchall()
        passing: list[Instance] = []
        critical: list[Instance] = []
        for r in rows:
            if now - r[7] > r[8]:  # heartbeat older than the TTL: gone, not critical
                continue
            instance = Instance(
                id=r[0],
                name=r[1],
                address=r[2],
                port=r[3],
                tags=tuple(json.loads(r[4])),
                meta=json.loads(r[5]),
            )
            (passing if r[6] == "passing" else critical).append(instance)
        return tuple(passing), tuple(critical), bool(rows)

    async def query(self, name: str, index: int, wait: float) -> QueryResult:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            instances, critical, known = await self._run(f"looking up {name!r}", self._read, name)
            last = self._answers.get(name)
            if last is None or last[0] != instances or last[1] != critical or last[2] != known:
                self._counter += 1
                last = (instances, critical, known, self._counter)
                self._answers[name] = last
            if index == 0 or last[3] != index or loop.time() >= deadline:
                return QueryResult(index=last[3], known=known, instances=instances, critical=critical)
            await asyncio.sleep(min(self._poll, max(0.0, deadline - loop.time())))

    async def all_instances(self) -> list[dict[str, object]]:
        """Every row, for tests and /status of the local registry."""

        def read(db: sqlite3.Connection) -> list[dict[str, object]]:
            cur = db.execute("SELECT id, name, address, port, status, note, heartbeat, ttl FROM instances")
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

        result: list[dict[str, object]] = await self._run("listing", read)
        return result
