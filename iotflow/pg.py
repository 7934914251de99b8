"""PostgreSQL plumbing shared by the sink and the device registry: a lazily opened, bounded pool
with explicit timeouts, and which failures are worth retrying."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg

# SQLSTATE classes after which the same statement can succeed: connection exceptions (08),
# transaction rollback (40: serialization, deadlock), insufficient resources (53), operator
# intervention (57: shutdown, cancel by statement_timeout), system errors (58).
_RETRIABLE_CLASSES = ("08", "40", "53", "57", "58")


def is_transient(exc: BaseException) -> bool:
    """Whether a failed database call may succeed if tried again unchanged."""
    if isinstance(exc, asyncpg.PostgresError):
        code = getattr(exc, "sqlstate", None) or ""
        return code[:2] in _RETRIABLE_CLASSES
    return isinstance(exc, OSError | asyncio.TimeoutError | asyncpg.InterfaceError)


class LazyPool:
    """An asyncpg pool opened on first use (so a worker starts while its database is away).

    ``statement_timeout`` is set on the server too, so a query cut off by the client's timeout does
    not keep running there.
    """

    def __init__(self, dsn: str, *, size: int, connect_timeout_s: float, command_timeout_s: float,
                 application_name: str, init: Callable[[asyncpg.Connection], Awaitable[None]] | None = None) -> None:
        self.dsn = dsn
        self.size = size
        self.connect_timeout_s = connect_timeout_s
        self.command_timeout_s = command_timeout_s
        self.application_name = application_name
        self.init = init
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> asyncpg.Pool:
        """The pool, opened now if it is not yet; raises what asyncpg raises when it cannot open."""
        async with self._lock:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self.dsn,
                    min_size=1,
                    max_size=self.size,
                    timeout=self.connect_timeout_s,
                    command_timeout=self.command_timeout_s,
                    max_inactive_connection_lifetime=60.0,
                    server_settings={
                        "application_name": self.application_name,
                        "statement_timeout": str(int(self.command_timeout_s * 1000)),
                    },
                    init=self.init,
                )
            return self._pool

    def acquire(self, pool: asyncpg.Pool) -> asyncpg.pool.PoolAcquireContext:
        """A connection from ``pool``, waiting at most the connect timeout for one to be free."""
        return pool.acquire(timeout=self.connect_timeout_s)

    async def ping(self, timeout_s: float) -> None:
        """Raise unless the database answers ``SELECT 1`` within ``timeout_s`` (pool opening included)."""
        async def probe() -> None:
            async with self.acquire(await self.get()) as conn:
                await conn.fetchval("SELECT 1", timeout=timeout_s)
        await asyncio.wait_for(probe(), timeout_s)

    def usage(self) -> tuple[int, int, int]:
        """(in use, idle, max) connections; all 0 but max while the pool is not open."""
        pool = self._pool
        if pool is None:
            return 0, 0, self.size
        idle = pool.get_idle_size()
        return pool.get_size() - idle, idle, pool.get_max_size()

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.shield(pool.close())
