-- The fleet: one row per host, written by that host's daemon (its devices as it measures them,
-- with its own margins and reservations applied) and read by every daemon on demand.
-- Times are the database's own (now()), so hosts' clocks never need to agree.
CREATE TABLE fleet_hosts (
    host text PRIMARY KEY,
    url text NOT NULL,
    version text NOT NULL,
    gpu_state text NOT NULL,
    devices jsonb NOT NULL,
    reservations jsonb NOT NULL,
    heartbeat_interval_s double precision NOT NULL CHECK (heartbeat_interval_s > 0),
    started_at timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    stopped_at timestamptz -- set by a clean shutdown: the host is offline
);
