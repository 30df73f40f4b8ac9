-- compatible: a column with a default; daemons that do not know it keep working.
-- How far each host lets a learned size take its effective one below the declared size
-- (MODEL_REGISTRY_FOOTPRINT_MAX_SHRINK), so that a daemon asked for the fleet books as that
-- host would. Rows of hosts that do not write it read as the default.
ALTER TABLE fleet_hosts ADD COLUMN footprint_max_shrink real NOT NULL DEFAULT 0.5;
