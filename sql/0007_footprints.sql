-- compatible: a column with a default and a new table; daemons that do not know them keep working.
-- `learn`: whether loads of the model teach its footprint (off for servers that preallocate most
-- of a GPU, whose process memory says nothing about the model).
ALTER TABLE models ADD COLUMN learn boolean NOT NULL DEFAULT true;

-- What loads really took: one row per instance (its peak), per model and GPU product, so one
-- host's loads teach every host with that product. Only the newest 100 per key are kept.
CREATE TABLE footprint_samples (
    instance_id text PRIMARY KEY,
    model text NOT NULL,
    gpu_name text NOT NULL,
    peak_mib integer NOT NULL CHECK (peak_mib >= 0),
    host text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX footprint_samples_by_key ON footprint_samples (model, gpu_name, recorded_at DESC);
