-- compatible: adds columns with defaults; a daemon that does not know them keeps working.
-- Each host's row lists only its newest 100 reservations; these say how many are open in all
-- and how much memory they still hold.
ALTER TABLE fleet_hosts
    ADD COLUMN reservations_open integer NOT NULL DEFAULT 0,
    ADD COLUMN pending_mib bigint NOT NULL DEFAULT 0;
