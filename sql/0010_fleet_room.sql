-- compatible: a column with a default; daemons that do not know it keep working.
-- What each host's instances offer to make room, per process: its device, its memory, and per
-- instance its model, priority, when it was last active and from when it may be asked to go
-- under that host's own settings (null: never, as it stands: pinned, busy, or promised).
ALTER TABLE fleet_hosts ADD COLUMN room jsonb NOT NULL DEFAULT '[]'::jsonb;
