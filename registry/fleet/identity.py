"""This host's identity in the fleet, held by a session advisory lock on a dedicated connection.

The lock makes a second live daemon with the same host id refuse to start; it goes with the
connection, so a daemon that was killed never blocks its successor (TCP keepalives make the
server notice a vanished host within about half a minute).
"""

from __future__ import annotations

import hashlib

import asyncpg

from registry.logs import get_logger

log = get_logger("registry.fleet")

# The server drops a dead peer's session, and with it the lock, within about 25 s.
_KEEPALIVES = {
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
}
_NAMESPACE = b"model-registry fleet host\x00"


class HostIdTaken(Exception):
    """Another live daemon holds this host id on this database."""


def lock_key(host_id: str) -> int:
    """A signed 64-bit advisory lock key for the host id."""
    digest = hashlib.blake2b(_NAMESPACE + host_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def connect_as_host(dsn: str, host_id: str) -> asyncpg.Connection:
    """A dedicated connection holding this host id's lock; HostIdTaken if another daemon has it."""
    conn = await asyncpg.connect(
        dsn,
        timeout=5,
        server_settings={"application_name": f"model-registry {host_id}"[:63], **_KEEPALIVES},
    )
    try:
        key = lock_key(host_id)
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
            # A bigint lock shows in pg_locks as its high and low 32 bits, objsubid 1.
            holder = await conn.fetchrow(
                """
                SELECT a.client_addr::text AS addr, a.backend_start
                  FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                   AND l.classid::bigint = $1 AND l.objid::bigint = $2
                """,
                (key >> 32) & 0xFFFFFFFF,
                key & 0xFFFFFFFF,
            )
            where = ""
            if holder is not None:
                where = f" (connected from {holder['addr'] or 'a local socket'} since "
                where += f"{holder['backend_start']:%Y-%m-%d %H:%M:%S %Z})"
            raise HostIdTaken(
                f"another model-registry daemon with host id {host_id!r} is running on this "
                f"database{where}; give each host its own MODEL_REGISTRY_HOST_ID"
            )
    except BaseException:
        await conn.close()
        raise
    return conn
