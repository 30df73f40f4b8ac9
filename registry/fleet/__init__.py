"""The fleet: each daemon publishes its host's state to the shared PostgreSQL and reads every
host's on demand, so one query says which host can load a model now."""
