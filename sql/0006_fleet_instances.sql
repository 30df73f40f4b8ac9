-- compatible: adds a column with a default; a daemon that does not know it keeps working.
-- Where each host has models loaded now: [{"model", "gpu", "index", "count"}], one entry per
-- model and device, so GET /fleet/models can say where a model is warm.
ALTER TABLE fleet_hosts ADD COLUMN instances jsonb NOT NULL DEFAULT '[]';
