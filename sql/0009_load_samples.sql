-- compatible: a new table; daemons that do not know it keep working.
-- How long loads took: one row per bound instance (from its reservation, or from the moment a
-- claim's room was freed, to `ready`), per model and GPU product, as footprint_samples keeps
-- what they took. Only the newest 100 per key are kept.
CREATE TABLE load_samples (
    instance_id text PRIMARY KEY,
    model text NOT NULL,
    gpu_name text NOT NULL,
    load_s real NOT NULL CHECK (load_s >= 0),
    host text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX load_samples_by_key ON load_samples (model, gpu_name, recorded_at DESC);
