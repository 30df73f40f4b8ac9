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


def listen_backlog(soft_limit: int) -> int:
    """The listen backlog, which is also how many connections asyncio accepts in one go. Each
    is a descriptor before the cap sees it, and the connections the cap closes are closed a few
    loop iterations later, so a flood holds a few bursts at once: under a small limit, smaller
    bursts, so that they fit in the reserve."""
    return max(16, min(128, soft_limit // 8))


def default_max_connections(soft_limit: int) -> int:
    """Client connections that fit under the limit, so that accept() never fails (EMFILE)."""
    return max(MIN_CONNECTIONS, soft_limit - RESERVED_FDS)
