-- A bulk apply (PUT /models, `models apply`) announces itself once, with all its ids, instead
-- of once per row: it sets model_registry.bulk_apply for its own transaction.
CREATE OR REPLACE FUNCTION models_notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('model_registry.bulk_apply', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('model_registry_catalog', OLD.id::text);
    ELSE
        PERFORM pg_notify('model_registry_catalog', NEW.id::text);
    END IF;
    RETURN NULL;
END;
$$;
