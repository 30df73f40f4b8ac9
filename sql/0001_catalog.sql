-- The model catalog: what an operator has registered, and whether it is switched on.
CREATE TABLE models (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL UNIQUE
        CONSTRAINT models_name_format CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$'),
    vram integer NOT NULL
        CONSTRAINT models_vram_range CHECK (vram BETWEEN 1 AND 10000000),
    enabled boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz
);

COMMENT ON COLUMN models.vram IS 'VRAM needed to load and run the model, in MiB';

-- updated_at is null until the first update, whoever makes it.
CREATE FUNCTION models_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

CREATE TRIGGER models_touch_updated_at
    BEFORE UPDATE ON models
    FOR EACH ROW
    EXECUTE FUNCTION models_touch_updated_at();

-- Facts about this database that must survive restarts (the default catalog was inserted, ...).
CREATE TABLE registry_meta (
    key text PRIMARY KEY,
    value jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
