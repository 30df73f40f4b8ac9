"""The open-file limit: raised to the hard limit at start, and what it leaves for clients."""

from __future__ import annotations

import contextlib
import resource

# Descriptors kept for what is not a settled client connection: the connections asyncio accepts
# in one go (up to the listen backlog, 128) before the cap can close any, the listener, the
# database pool and its dedicated connections, NVML, the journal and logs.
RESERVED_FDS = 256
MIN_CONNECTIONS = 16


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one; return (soft, hard) as they now are."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        # On failure keep what we have: the connection cap follows the limit we run with.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


def default_max_connections(soft_limit: int) -> int:
    """Client connections that fit under the limit, so that accept() never fails (EMFILE)."""
    return max(MIN_CONNECTIONS, soft_limit - RESERVED_FDS)
