-- compatible: adds columns with defaults; a daemon that does not know them keeps working.
-- Where each host has models loaded now: [{"model", "gpu", "index", "count"}], one entry per
-- model and device, so GET /fleet/models can say where a model is warm.
ALTER TABLE fleet_hosts ADD COLUMN instances jsonb NOT NULL DEFAULT '[]';

-- Each host's admission policy, so a daemon answering for the fleet books as that host would:
-- what it books of a model (max, declared, observed) and the samples an observed size needs.
ALTER TABLE fleet_hosts
    ADD COLUMN vram_source text NOT NULL DEFAULT 'max',
    ADD COLUMN footprint_min_samples integer NOT NULL DEFAULT 3;
