-- Every change to the catalog is announced on one channel; the payload is the model id only,
-- and listeners read the row themselves.
CREATE FUNCTION models_notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('model_registry_catalog', OLD.id::text);
    ELSE
        PERFORM pg_notify('model_registry_catalog', NEW.id::text);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER models_notify_change
    AFTER INSERT OR UPDATE OR DELETE ON models
    FOR EACH ROW
    EXECUTE FUNCTION models_notify_change();
