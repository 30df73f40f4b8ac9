"""The open-file limit: raised to the hard limit at start, and what it leaves for clients."""

from __future__ import annotations

import contextlib
import resource

# Descriptors kept for everything that is not a client: the listener, the database pool and
# its dedicated connections, NVML, the journal, logs, and one spare for accept() itself.
RESERVED_FDS = 128
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
